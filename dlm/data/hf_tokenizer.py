"""Hugging Face ``tokenizer.json`` (through ``tokenizers``) and chat templates (jinja2), for LLaDA/Dream."""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Iterable

from dlm.errors import UserError


class HFTokenizer:
  """The interface the sampler uses (encode, decode, ids) over a ``tokenizers.Tokenizer``."""

  def __init__(self, folder: str | os.PathLike, *, vocab_size: int | None = None,
               mask_id: int | None = None, eos_id: int | None = None,
               pad_id: int | None = None, bos_id: int | None = None):
    import tokenizers
    self.folder = pathlib.Path(folder)
    path = self.folder / "tokenizer.json"
    try:
      self._tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001  (the library raises bare Exceptions)
      msg = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise UserError(f"{path} is not a tokenizers file ({msg}); download it again") from None
    self.vocab_size = vocab_size or self._tok.get_vocab_size(with_added_tokens=True)
    self.mask_id, self.eos_id, self.pad_id, self.bos_id = mask_id, eos_id, pad_id, bos_id
    cfg_path = self.folder / "tokenizer_config.json"
    self.config: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def decode(self, ids: Iterable[int]) -> str:
    drop = {self.mask_id, self.pad_id} - {None}
    return self._tok.decode([int(i) for i in ids if int(i) not in drop],
                            skip_special_tokens=False)

  def _special(self, key: str) -> str:
    value = self.config.get(key)
    return value.get("content", "") if isinstance(value, dict) else (value or "")

  def apply_chat_template(self, messages: list[dict[str, str]],
                          add_generation_prompt: bool = True) -> str:
    """The prompt text of ``messages`` under tokenizer_config.json's ``chat_template``."""
    template = self.config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
      template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not template:
      raise UserError(f"{self.folder / 'tokenizer_config.json'} has no chat_template: drop --chat"
                      " or use the instruct model")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
      raise UserError(f"the chat template refused the messages: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    specials = {k: self._special(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return env.from_string(template).render(messages=messages,
                                            add_generation_prompt=add_generation_prompt,
                                            **specials)


def load_any_tokenizer(folder: str | os.PathLike, *, vocab_size: int | None = None,
                       mask_id: int | None = None, eos_id: int | None = None,
                       pad_id: int | None = None, bos_id: int | None = None) -> Any:
  """The folder's sentencepiece ``tokenizer.model`` (dlm runs), else ``tokenizer.json``, else None."""
  folder = pathlib.Path(folder)
  if (folder / "tokenizer.model").is_file():
    from dlm.data import tokenizer
    return tokenizer.load_tokenizer(folder / "tokenizer.model")
  if (folder / "tokenizer.json").is_file():
    return HFTokenizer(folder, vocab_size=vocab_size, mask_id=mask_id, eos_id=eos_id,
                       pad_id=pad_id, bos_id=bos_id)
  return None
