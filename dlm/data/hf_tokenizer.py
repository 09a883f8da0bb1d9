"""Hugging Face ``tokenizer.json`` (through ``tokenizers``) and chat templates (jinja2), for LLaDA/Dream."""

from __future__ import annotations

import json
import os
import pathlib
import re
import sys
import time
from collections.abc import Sized
from typing import Any, Iterable

import numpy as np

from dlm import jsonfile
from dlm.errors import UserError

CHAT_MAX_CHARS = 1_000_000  # the most a chat template may render (and any value it builds)
CHAT_TIME_LIMIT_S = 5.0  # wall clock for parsing and rendering it


def _unicode_to_byte() -> dict[str, int]:
  """The inverse of GPT-2's byte-to-unicode table (printable bytes as themselves, the rest
  shifted past 255), which byte-level BPE vocabularies are written in."""
  keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
          *range(ord("\xae"), ord("\xff") + 1)]
  chars, n = {}, 0
  for b in range(256):
    if b in keep:
      chars[chr(b)] = b
    else:
      chars[chr(256 + n)] = b
      n += 1
  return chars


class HFTokenizer:
  """The interface the sampler uses (encode, decode, ids) over a ``tokenizers.Tokenizer``."""

  def __init__(self, folder: str | os.PathLike, *, vocab_size: int | None = None,
               mask_id: int | None = None, eos_id: int | None = None,
               pad_id: int | None = None, bos_id: int | None = None):
    import tokenizers

    from dlm.convert.safetensors_io import inside  # links out of a model folder are refused
    self.folder = pathlib.Path(folder)
    path = inside(self.folder, "tokenizer.json", self.folder)
    try:
      self._tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001  (the library raises bare Exceptions)
      msg = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise UserError(f"{path} is not a tokenizers file ({msg}); download it again") from None
    self.vocab_size = vocab_size or self._tok.get_vocab_size(with_added_tokens=True)
    self.mask_id, self.eos_id, self.pad_id, self.bos_id = mask_id, eos_id, pad_id, bos_id
    config = self.folder / "tokenizer_config.json"
    self.config: dict[str, Any] = _read_config(
        inside(self.folder, config.name, self.folder) if config.is_file() else config)

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def encode_chunks(self, pieces: Iterable[str], *, chunk_chars: int) -> Iterable[np.ndarray]:
    """int32 ids of the text made of ``pieces``, chunk by chunk (``tokenizer.text_chunks``)."""
    from dlm.data.tokenizer import text_chunks
    for chunk in text_chunks(pieces, chunk_chars):
      yield np.asarray(self.encode(chunk), dtype=np.int32)

  def fingerprint(self) -> str:
    """crc32 of tokenizer.json, to tie token caches to this exact tokenizer."""
    import zlib
    return f"{zlib.crc32((self.folder / 'tokenizer.json').read_bytes()):08x}"

  def decode(self, ids: Iterable[int]) -> str:
    drop = {self.mask_id, self.pad_id} - {None}
    return self._tok.decode([int(i) for i in ids if int(i) not in drop],
                            skip_special_tokens=False)

  def piece_bytes(self) -> np.ndarray:
    """[vocab_size] UTF-8 bytes each token id stands for in text (0 for special and unused ids).

    Byte-level BPE (GPT-2, LLaDA, Dream): each character of a token is one byte
    through the GPT-2 byte-to-unicode table; sentencepiece-style vocabularies:
    ``<0xNN>`` is one byte and the ``\u2581`` word marker a space.
    """
    spec = json.loads(self._tok.to_str())
    decoders = spec.get("decoder") or {}
    kinds = [d.get("type") for d in decoders.get("decoders", [decoders])]
    table = _unicode_to_byte() if "ByteLevel" in kinds else None
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    special |= {i for i in (self.mask_id, self.eos_id, self.pad_id, self.bos_id) if i is not None}
    out = np.zeros(self.vocab_size, np.int64)
    for i in range(min(self.vocab_size, self._tok.get_vocab_size(with_added_tokens=True))):
      piece = self._tok.id_to_token(i)
      if piece is None or i in special:
        continue
      if table is not None and all(c in table for c in piece):
        out[i] = len(piece)
      elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
        out[i] = 1
      else:
        out[i] = len(piece.replace("\u2581", " ").encode("utf-8"))
    return out

  def _special(self, key: str) -> str:
    value = self.config.get(key)
    return value.get("content", "") if isinstance(value, dict) else (value or "")

  def apply_chat_template(self, messages: list[dict[str, str]],
                          add_generation_prompt: bool = True, *,
                          max_chars: int = CHAT_MAX_CHARS,
                          time_limit_s: float = CHAT_TIME_LIMIT_S) -> str:
    """The prompt text of ``messages`` under tokenizer_config.json's ``chat_template``.

    The template is data from elsewhere: it renders in jinja's immutable sandbox, its
    output is streamed and stops past ``max_chars``, no string, list or number it builds
    may exceed ``max_chars``, and the whole render stops after ``time_limit_s`` seconds.
    """
    where = self.folder / "tokenizer_config.json"
    template = self.config.get("chat_template")
    if isinstance(template, list):  # named templates: the default one
      template = next((t.get("template") for t in template
                       if isinstance(t, dict) and t.get("name") == "default"), None)
    if not template:
      raise UserError(f"{where} has no chat_template: drop --chat or use the instruct model")
    if not isinstance(template, str):
      raise UserError(f"{where}: chat_template is not a string: fix the file or drop --chat")
    specials = {k: self._special(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return render_chat_template(template, where, max_chars=max_chars, time_limit_s=time_limit_s,
                                messages=messages, add_generation_prompt=add_generation_prompt,
                                **specials)


def _read_config(path: pathlib.Path) -> dict[str, Any]:
  return jsonfile.read_object(path, fix="download it again") if path.is_file() else {}


class _OutOfTime(BaseException):
  """Raised inside the template by the tracer: a BaseException, so nothing in jinja catches it."""


class _Deadline:
  """A trace function that stops the thread's Python code once ``seconds`` have passed.

  Every line the template runs (its loops included, even those that print nothing) passes
  here; a single C operation cannot grow large because the environment bounds sizes.
  """

  def __init__(self, seconds: float):
    self.end = time.monotonic() + seconds
    self.events = 0

  def __call__(self, frame: Any, event: str, arg: Any) -> "_Deadline":
    self.events += 1
    if not self.events & 255 and time.monotonic() > self.end:
      raise _OutOfTime
    return self

  def check(self) -> None:
    if time.monotonic() > self.end:
      raise _OutOfTime


def _bounded_environment(max_chars: int) -> Any:
  """An immutable sandbox whose values stay under ``max_chars`` (strings, lists, numbers)."""
  from jinja2 import compiler
  from jinja2.exceptions import SecurityError
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def refuse(what: str) -> SecurityError:
    return SecurityError(f"{what} exceeds the limit of {max_chars} characters")

  def check_size(value: Any, what: str) -> Any:
    if isinstance(value, (str, bytes, list, tuple, dict)) and len(value) > max_chars:
      raise refuse(what)
    if isinstance(value, int) and value.bit_length() > 4 * max_chars:
      raise refuse(what)
    return value

  def check_args(name: str, args: tuple, kwargs: dict, owner: Any = None) -> None:
    values = [owner, *args, *kwargs.values()]
    if any(isinstance(v, int) and not isinstance(v, bool) and abs(v) > max_chars for v in values):
      raise refuse(f"an argument of {name}")
    if name in ("replace", "join"):  # amplifiers: the result grows as a product of two sizes
      sizes = sorted(len(v) for v in values if isinstance(v, Sized))
      if len(sizes) > 1 and sizes[-1] * (sizes[-2] + 1) > max_chars:
        raise refuse(f"the result of {name}")

  def guarded(name: str, fn: Any) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
      check_args(name, args, kwargs)
      return check_size(fn(*args, **kwargs), f"the result of {name}")
    call.__dict__.update(getattr(fn, "__dict__", {}))  # keeps jinja's pass_context marks
    return call

  class Generator(compiler.CodeGenerator):
    def visit_Concat(self, node: Any, frame: Any) -> None:  # `a ~ b`: bounded before joining
      self.write("environment.bounded_concat((")
      for arg in node.nodes:
        self.visit(arg, frame)
        self.write(", ")
      self.write("))")

  class Env(ImmutableSandboxedEnvironment):
    code_generator_class = Generator
    intercepted_binops = frozenset(["+", "*", "**", "%"])

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
      if operator == "**" and isinstance(right, (int, float)) and abs(right) > 1024:
        raise refuse("an exponent")
      if operator == "*" and isinstance(left, int) and hasattr(right, "__len__"):
        left, right = right, left
      if (operator == "*" and hasattr(left, "__len__") and isinstance(right, int)
          and len(left) * right > max_chars):
        raise refuse("a repeated value")
      if operator == "%" and isinstance(left, str):
        check_args("%", _widths(_PERCENT_SPEC, left), {})
      return check_size(super().call_binop(context, operator, left, right), "a value")

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
      owner = getattr(__obj, "__self__", None)
      check_args(getattr(__obj, "__name__", "a call"), args, kwargs, owner)
      return check_size(super().call(__context, __obj, *args, **kwargs), "the result of a call")

    def getattr(self, obj: Any, attribute: str) -> Any:
      if isinstance(obj, str) and attribute in ("format", "format_map"):
        check_args("format", _widths(_FORMAT_SPEC, obj), {})
      return super().getattr(obj, attribute)

    def bounded_concat(self, values: tuple) -> str:
      parts = [str(v) for v in values]
      if sum(map(len, parts)) > max_chars:
        raise refuse("a joined string")
      return "".join(parts)

  env = Env(trim_blocks=True, lstrip_blocks=True, optimized=False)
  env.filters = {name: guarded(name, fn) for name, fn in env.filters.items()}
  return env


_PERCENT_SPEC = re.compile(r"%[-#0 +]*(\d*)(?:\.(\d*))?")  # '%-08.3f': width, precision
_FORMAT_SPEC = re.compile(r"\{[^{}:]*:[^{}\d]*(\d*)(?:[,_]?\.(\d*))?")  # '{0:>8.3}'


def _widths(spec: re.Pattern, text: str) -> tuple[int, ...]:
  """The widths and precisions of the format fields in ``text`` (huge ones capped at 10**20)."""
  digits = [d for m in spec.finditer(text) for d in m.groups() if d]
  return tuple(int(d) if len(d) < 20 else 10**20 for d in digits)


def render_chat_template(template: str, where: pathlib.Path, *, max_chars: int = CHAT_MAX_CHARS,
                         time_limit_s: float = CHAT_TIME_LIMIT_S, **variables: Any) -> str:
  """``template`` rendered with ``variables`` under the size and time limits, or one UserError."""
  from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError

  def raise_exception(message: str) -> None:
    raise UserError(f"the chat template of {where} refused the messages: {message}")

  env = _bounded_environment(max_chars)
  env.globals["raise_exception"] = raise_exception
  deadline = _Deadline(time_limit_s)
  previous = sys.gettrace()
  pieces: list[str] = []
  size = 0
  sys.settrace(deadline)
  try:
    for piece in env.from_string(template).generate(**variables):
      size += len(piece)
      if size > max_chars:
        raise UserError(f"the chat_template of {where} renders more than {max_chars} characters:"
                        " fix the template or drop --chat")
      deadline.check()
      pieces.append(piece)
  except _OutOfTime:
    raise UserError(f"the chat_template of {where} did not finish within {time_limit_s:g} s:"
                    " fix the template or drop --chat") from None
  except SecurityError as e:
    raise UserError(f"the chat_template of {where} was stopped by the sandbox"
                    f" ({_first_line(e)}): fix the template or drop --chat") from None
  except TemplateSyntaxError as e:
    raise UserError(f"the chat_template of {where} does not parse (line {e.lineno}:"
                    f" {_first_line(e)}): fix the template or drop --chat") from None
  except UserError:
    raise
  except (TemplateError, ArithmeticError, LookupError, TypeError, ValueError, RecursionError,
          MemoryError) as e:
    raise UserError(f"the chat_template of {where} failed ({type(e).__name__}: {_first_line(e)}):"
                    " fix the template or drop --chat") from None
  finally:
    sys.settrace(previous)
  return "".join(pieces)


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return lines[0] if lines else type(e).__name__


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
