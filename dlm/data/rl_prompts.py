"""Prompts for reinforcement learning (``configs/grpo.py``): texts, their extra fields, token ids.

``config.data.grpo.train_files`` / ``val_files``: comma-separated globs of JSON Lines, each line
``{"prompt": str, ...}`` or ``{"messages": [...], ...}`` (rendered with the chat template and
its generation prompt); every other field (``answer``, ``target_length``, ...) is passed to
the reward functions.  Without files, the embedded default: each documented function of the
Python standard library as its header and one-line docstring, the body left to the model
(the ``python_parses`` reward scores it).  Prompts are left-padded (or cut from the left) to
``grpo.max_prompt_length`` tokens.
"""

from __future__ import annotations

import dataclasses
import json
import zlib
from typing import Any

import numpy as np

from dlm.data import chat, corpora, sft
from dlm.errors import UserError


@dataclasses.dataclass(frozen=True)
class PromptSet:
  texts: list[str]
  columns: list[dict[str, Any]]  # each prompt's other fields
  ids: np.ndarray  # int32 [N, P], left-padded
  attention: np.ndarray  # int32 [N, P], 1 = real token


def read_prompts(path: Any, template: chat.Template | None, tok: Any
                 ) -> list[tuple[str, dict[str, Any], int]]:
  """[(prompt text, other fields, crc32 of the line)]; one error per bad line."""
  out = []
  with open(path, "rb") as f:
    for i, raw in enumerate(f, 1):
      where = f"{path}:{i}"
      if not raw.strip():
        continue
      try:
        obj = json.loads(raw.decode("utf-8"))
      except (UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{where} is not a JSON object ({str(e)[:80]}); write one per line"
                        ) from None
      if not isinstance(obj, dict):
        raise UserError(f"{where}: each line must be an object with \"prompt\" or \"messages\"")
      columns = {k: v for k, v in obj.items() if k not in ("prompt", "messages")}
      if isinstance(obj.get("prompt"), str):
        text = obj["prompt"]
      elif "messages" in obj:
        text = chat.render(template or chat.plain, chat.check_messages(obj["messages"], where),
                           True, tok)
      else:
        raise UserError(f"{where}: need a string \"prompt\" or \"messages\"")
      out.append((text, columns, zlib.crc32(raw.strip())))
  return out


def stdlib_prompts(texts: list[str], *, max_prompts: int = 0) -> list[str]:
  """Each documented public stdlib function as ``def name(args):`` + its one-line docstring,
  ending at the body's indentation."""
  out = []
  for conv in sft.stdlib_conversations(texts, max_conversations=0, max_chars=120):
    signature = conv[0]["content"].removeprefix(sft.SIGNATURE_TASK)
    doc = conv[1]["content"]
    if "\n" in doc or '"""' in doc or "\\" in doc:
      continue
    out.append(f'{signature}\n    """{doc}"""\n    ')
    if max_prompts and len(out) >= max_prompts:
      break
  return out


def encode(texts: list[str], tok: Any, max_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """Left-padded ids and attention [N, max_len]; a longer prompt keeps its last tokens."""
  ids = np.full((len(texts), max_len), pad_id, np.int32)
  attention = np.zeros((len(texts), max_len), np.int32)
  for i, text in enumerate(texts):
    row = tok.encode(text)[-max_len:] or [pad_id]
    ids[i, max_len - len(row):] = row
    attention[i, max_len - len(row):] = 1
  return ids, attention


def load(data_cfg: Any, tok: Any, *, max_prompt_length: int, pad_id: int,
         template: chat.Template | None) -> tuple[PromptSet, PromptSet, dict[str, Any]]:
  """(train, validation) prompt sets and their provenance."""
  gc = data_cfg.grpo
  limit = int(gc.get("max_prompts", 0) or 0)
  files = sft.files_of(gc.get("train_files"), "grpo.train_files")
  if files:
    items = [x for f in files for x in read_prompts(f, template, tok)]
    val_files = sft.files_of(gc.get("val_files"), "grpo.val_files")
    if val_files:
      val = [x for f in val_files for x in read_prompts(f, template, tok)]
      train = items
    else:
      permille = int(gc.get("val_permille", 50))
      train = [x for x in items if x[2] % 1000 >= permille]
      val = [x for x in items if x[2] % 1000 < permille]
    meta = {"prompt_source": ",".join(map(str, files))}
  else:
    corpus = corpora.load_corpus("stdlib", root=data_cfg.get("root"),
                                 val_permille=int(data_cfg.get("val_permille", 50)),
                                 invalid_utf8=data_cfg.get("invalid_utf8", "fail"))
    train = [(p, {}, 0) for p in stdlib_prompts(corpus.train, max_prompts=limit)]
    val = [(p, {}, 0) for p in stdlib_prompts(corpus.val, max_prompts=64)]
    meta = {"prompt_source": "stdlib function headers and docstrings",
            "python_version": corpus.meta["python_version"]}
  if limit:
    train = train[:limit]
  val = val[:int(gc.get("max_val_prompts", 32))]
  if not train or not val:
    raise UserError(f"{len(train)} training and {len(val)} validation prompts: give more"
                    " prompts (data.grpo.train_files) or data.grpo.val_files")

  def make(items: list[tuple[str, dict[str, Any], int]]) -> PromptSet:
    texts = [t for t, _, _ in items]
    ids, attention = encode(texts, tok, max_prompt_length, pad_id)
    return PromptSet(texts, [c for _, c, _ in items], ids, attention)

  meta.update(train_prompts=len(train), val_prompts=len(val))
  return make(train), make(val), meta
