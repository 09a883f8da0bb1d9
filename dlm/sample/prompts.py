"""`dlm sample --prompts=FILE --output=FILE.jsonl`: prompts from a file, samples to JSON Lines.

A prompts file is untrusted text: plain lines (one prompt each, ``\\n`` escapes
allowed) or JSON Lines whose objects have ``"prompt"`` (a string) or
``"messages"`` (chat turns: ``{"role", "content"}``, rendered with the model's
chat template).  Bad lines are one error naming ``FILE:LINE``.  The output file
is new (never overwritten) and gets one object per sample as it is made.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Iterator

from dlm.data import chat
from dlm.errors import UserError

MAX_BYTES = 256 << 20  # a prompts file larger than this is refused (it is read whole)


def read_prompts(path: str | os.PathLike) -> list[str | list[dict[str, str]]]:
  """Each prompt of the file: a string, or a list of chat messages."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise UserError(f"--prompts={path} is not a file")
  if path.stat().st_size > MAX_BYTES:
    raise UserError(f"--prompts={path} is over {MAX_BYTES >> 20} MiB; split it")
  raw = path.read_bytes()
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise UserError(f"--prompts={path} is not UTF-8 text (byte {raw[e.start]:#04x} at offset"
                    f" {e.start}); save it as UTF-8") from None
  lines = [(i, l) for i, l in enumerate(text.splitlines(), 1) if l.strip()]
  if not lines:
    raise UserError(f"--prompts={path} holds no prompt (one per line, or JSON Lines)")
  jsonl = lines[0][1].lstrip().startswith("{")
  out: list[str | list[dict[str, str]]] = []
  for i, line in lines:
    where = f"{path}:{i}"
    if not jsonl:
      out.append(line.replace("\\n", "\n"))
      continue
    try:
      obj = json.loads(line)
    except ValueError as e:
      raise UserError(f"{where} is not JSON ({str(e)[:80]}); write one object per line, or"
                      " plain prompts") from None
    if not isinstance(obj, dict):
      raise UserError(f"{where} is not a JSON object")
    if "messages" in obj:
      out.append(chat.check_messages(obj["messages"], where))
    elif isinstance(obj.get("prompt"), str):
      out.append(obj["prompt"])
    else:
      raise UserError(f"{where} has neither a string \"prompt\" nor \"messages\"")
  return out


class Output:
  """``--output=FILE.jsonl``: created new (an existing file is never overwritten), one object
  per sample, flushed as each batch finishes."""

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    if self.path.exists():
      raise UserError(f"--output={self.path} exists; samples are never written over a file:"
                      " pick a new name")
    if not self.path.parent.is_dir():
      raise UserError(f"the folder of --output={self.path} does not exist; create it first")
    self._f = open(self.path, "x", encoding="utf-8")

  def write(self, record: dict[str, Any]) -> None:
    self._f.write(json.dumps(record, ensure_ascii=False) + "\n")

  def flush(self) -> None:
    self._f.flush()

  def close(self) -> None:
    self._f.close()


def rows(num_prompts: int, num_samples: int) -> Iterator[tuple[int, int]]:
  """(prompt index, sample index) of every output row, prompt-major."""
  for p in range(num_prompts):
    for s in range(num_samples):
      yield p, s
