"""Chat templates: conversation -> text, and the split of that text into prompt and response.

A template is ``template(messages, add_generation_prompt, tokenizer) -> str`` (the Hugging
Face ``apply_chat_template`` contract), registered by name in ``CHAT_TEMPLATES`` or given as
``module:function`` in a recipe.  ``"tokenizer"`` renders with the tokenizer's own
``chat_template`` (sandboxed jinja, ``hf_tokenizer.render_chat_template``); ``"plain"`` is
dlm's for tokenizers without one.  ``config.data.sft.chat_template = "auto"`` picks the
tokenizer's when it has one, else ``"plain"``.

``turns`` splits a rendered conversation the way LLaDA's SFT needs it (Nie et al. 2025,
sec. 2.3): every assistant turn's text is response (noised and counted), the rest prompt
(kept clean), found by rendering the conversation's prefixes.
"""

from __future__ import annotations

from typing import Any, Callable

from dlm.errors import UserError
from dlm.registry import Registry

Messages = list[dict[str, str]]
Template = Callable[[Messages, bool, Any], str]

CHAT_TEMPLATES: Registry[Template] = Registry("chat template")
ROLES = ("system", "user", "assistant")


@CHAT_TEMPLATES.register("plain")
def plain(messages: Messages, add_generation_prompt: bool, tokenizer: Any = None) -> str:
  """``System: ...`` / ``User: ...`` / ``Assistant: ...`` lines, one turn each."""
  del tokenizer
  names = {"system": "System", "user": "User", "assistant": "Assistant"}
  text = "".join(f"{names.get(m['role'], m['role'].title())}: {m['content']}\n" for m in messages)
  return text + ("Assistant: " if add_generation_prompt else "")


def has_template(tokenizer: Any) -> bool:
  """Whether ``tokenizer`` (an HF tokenizer folder's) carries a chat_template."""
  return bool(getattr(tokenizer, "config", {}).get("chat_template"))


@CHAT_TEMPLATES.register("tokenizer")
def from_tokenizer(messages: Messages, add_generation_prompt: bool, tokenizer: Any) -> str:
  """The tokenizer's own ``chat_template`` (tokenizer_config.json)."""
  if not has_template(tokenizer):
    where = getattr(tokenizer, "folder", None) or getattr(tokenizer, "path", "the tokenizer")
    raise UserError(f"chat template 'tokenizer': {where} has no chat_template; set"
                    " --config.data.sft.chat_template=plain (or give one in tokenizer_config.json)")
  return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)


def resolve(name: str, tokenizer: Any) -> Template:
  """``name`` ("auto", a registered name or module:function) -> the template function."""
  if name == "auto":
    name = "tokenizer" if has_template(tokenizer) else "plain"
  try:
    return CHAT_TEMPLATES.get(name)
  except ValueError as e:
    raise UserError(f"data.sft.chat_template: {e}") from None


def for_model(config: Any, tokenizer: Any) -> Template | None:
  """The template a model's prompts are wrapped in (``dlm sample --chat``): the one its SFT
  run used (``config.data.sft.chat_template``), else the tokenizer's own, else None."""
  name = (config.get("data", {}).get("sft", {}) or {}).get("chat_template")
  if name:
    return resolve(str(name), tokenizer)
  return from_tokenizer if has_template(tokenizer) else None


def render(template: Template, messages: Messages, add_generation_prompt: bool,
           tokenizer: Any) -> str:
  out = template(messages, add_generation_prompt, tokenizer)
  if not isinstance(out, str):
    raise UserError(f"chat template {getattr(template, '__name__', template)!r} returned"
                    f" {type(out).__name__}, not str; fix it to return the text")
  return out


def check_messages(value: Any, where: str) -> Messages:
  """A non-empty list of {role, content} strings (file data: checked, copied)."""
  if not isinstance(value, list) or not value:
    raise UserError(f"{where}: \"messages\" must be a non-empty list of {{role, content}}")
  for m in value:
    if (not isinstance(m, dict) or not isinstance(m.get("role"), str)
        or not isinstance(m.get("content"), str)):
      raise UserError(f"{where}: each message needs string \"role\" and \"content\" fields")
  return [{"role": m["role"], "content": m["content"]} for m in value]


def check_conversation(messages: Any, where: str) -> Messages:
  """A conversation: a list of {role, content} strings with at least one assistant turn."""
  messages = check_messages(messages, where)
  if not any(m["role"] == "assistant" for m in messages):
    raise UserError(f"{where}: the conversation has no assistant turn, so nothing to learn;"
                    " add a {\"role\": \"assistant\", \"content\": ...} message or drop the line")
  return messages


def turns(messages: Messages, template: Template, tokenizer: Any,
          where: str = "conversation") -> list[tuple[str, bool]]:
  """[(text, is_response)]: the rendered conversation up to its last assistant turn.

  The prompt before assistant turn i is render(messages[:i], add_generation_prompt=True)
  minus what came before; the response is render(messages[:i+1]) minus that prompt (the
  template's end-of-turn marker included, so the model learns to close its turn).
  Turns after the last assistant turn teach nothing and are left out.
  """
  out: list[tuple[str, bool]] = []
  done = ""
  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    prompt = render(template, messages[:i], True, tokenizer)
    full = render(template, messages[:i + 1], False, tokenizer)
    if not prompt.startswith(done) or not full.startswith(prompt):
      raise UserError(f"{where}: the chat template does not render the conversation's turns as"
                      " prefixes of each other (it rewrites earlier turns), so prompt and"
                      " response cannot be split; set --config.data.sft.chat_template=plain")
    if prompt != done:
      out.append((prompt[len(done):], False))
    out.append((full[len(prompt):], True))
    done = full
  return out
