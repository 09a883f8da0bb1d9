"""Supervised fine-tuning data: conversations -> packed rows with a response-only loss mask.

LLaDA's SFT (Nie et al. 2025, sec. 2.3, Alg. 2): the prompt p0 stays clean, only response
tokens r0 are noised and scored; each response is followed by EOS and rows are padded with
EOS, which is scored too, so the model learns to end its answer.  Here:

  conversation -> chat template -> [(prompt text, 0), (response text, 1), ...] + EOS (1)
  rows = conversations packed whole, in order, while they fit in ``seq_len``; the row's tail
         is EOS (scored), in the segment of the row's last conversation

Each conversation is one segment (``segment_ids`` 1, 2, ...; attention stays inside it) with
positions from 0.  Batches are {"tokens", "loss_mask", "segment_ids", "positions"} [B, L];
the losses keep every position with loss_mask 0 clean (``common.keep_clean``).

Data (``config.data.sft``): ``train_files`` / ``val_files`` (comma-separated globs of JSON
Lines: ``{"messages": [{"role", "content"}, ...]}`` or ``{"prompt": ..., "response": ...}``);
without ``val_files`` a ``val_permille`` share of the conversations (by crc32 of the line)
is held out.  With no files, the embedded default: each documented function of the Python
standard library, its signature as the prompt and its docstring's first paragraph as the
response (``stdlib_conversations``).
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import glob
import inspect
import json
import os
import pathlib
import zlib
from typing import Any, Iterator

import numpy as np

from dlm.data import chat, corpora
from dlm.errors import UserError

KEYS = ("tokens", "loss_mask", "segment_ids", "positions")
MAX_FILE_BYTES = 4 << 30
SIGNATURE_TASK = "Write the docstring of this function.\n"


@dataclasses.dataclass(frozen=True)
class SFTData:
  tokenizer: Any
  train_rows: dict[str, np.ndarray]  # KEYS -> [N, L]
  val_rows: dict[str, np.ndarray]
  meta: dict[str, Any]


# ------------------------------------------------------------------ reading --


def _conversation(obj: Any, where: str) -> chat.Messages:
  if not isinstance(obj, dict):
    raise UserError(f"{where}: each line must be a JSON object with \"messages\" or"
                    " \"prompt\" and \"response\"")
  if "messages" in obj:
    return chat.check_conversation(obj["messages"], where)
  response = obj.get("response", obj.get("completion"))
  if isinstance(obj.get("prompt"), str) and response is None:
    raise UserError(f"{where}: the conversation has no assistant turn (\"prompt\" without"
                    " \"response\"); add a \"response\" or drop the line")
  if not isinstance(obj.get("prompt"), str) or not isinstance(response, str):
    raise UserError(f"{where}: need \"messages\" (a list of {{role, content}}) or string"
                    " \"prompt\" and \"response\" fields")
  messages = [{"role": "user", "content": obj["prompt"]},
              {"role": "assistant", "content": response}]
  if isinstance(obj.get("system"), str):
    messages.insert(0, {"role": "system", "content": obj["system"]})
  return messages


def files_of(globs: str | None, what: str) -> list[pathlib.Path]:
  """Comma-separated globs -> the sorted files they match (each glob must match one)."""
  out: list[pathlib.Path] = []
  for pattern in filter(None, (p.strip() for p in (globs or "").split(","))):
    found = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    if not found:
      raise UserError(f"data.sft.{what}={pattern!r} matches no file; fix the path or glob")
    out.extend(pathlib.Path(f) for f in found if os.path.isfile(f))
  return out


def read_conversations(path: str | os.PathLike) -> list[tuple[chat.Messages, int]]:
  """[(messages, crc32 of the line)] of one JSON Lines file; one error per bad line."""
  path = pathlib.Path(path)
  if path.stat().st_size > MAX_FILE_BYTES:
    raise UserError(f"{path} is over {MAX_FILE_BYTES >> 30} GiB; split it into several files")
  out = []
  with open(path, "rb") as f:
    for i, raw in enumerate(f, 1):
      where = f"{path}:{i}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError:
        raise UserError(f"{where} is not UTF-8; save the file as UTF-8") from None
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except ValueError as e:
        raise UserError(f"{where} is not JSON ({str(e)[:80]}); write one object per line"
                        ) from None
      out.append((_conversation(obj, where), zlib.crc32(raw.strip())))
  return out


def _signature(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
  """``def name(args) -> ret:`` of a function (no decorators, no body)."""
  head = copy.copy(fn)
  head.body, head.decorator_list = [ast.Pass()], []
  return ast.unparse(head).rstrip().removesuffix("pass").rstrip()


def stdlib_conversations(texts: list[str], *, max_conversations: int = 0,
                         max_chars: int = 400) -> list[chat.Messages]:
  """Each documented public function of ``texts`` (stdlib sources): signature -> docstring.

  The prompt is ``SIGNATURE_TASK`` + ``def name(args) -> ret:``; the response the first
  paragraph of its docstring (``inspect.cleandoc``), kept when at most ``max_chars`` long.
  """
  out: list[chat.Messages] = []
  for text in texts:
    try:
      tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError):
      continue
    for node in ast.walk(tree):
      if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      if node.name.startswith("_"):
        continue
      doc = ast.get_docstring(node, clean=True)
      if not doc:
        continue
      summary = inspect.cleandoc(doc).split("\n\n")[0].strip()
      if not summary or len(summary) > max_chars:
        continue
      try:
        signature = _signature(node)
      except (ValueError, TypeError, RecursionError):
        continue
      out.append([{"role": "user", "content": SIGNATURE_TASK + signature},
                  {"role": "assistant", "content": summary}])
      if max_conversations and len(out) >= max_conversations:
        return out
  return out


# ------------------------------------------------------------- tokenizing --


def tokenize(messages: chat.Messages, template: chat.Template, tok: Any, eos_id: int,
             where: str = "conversation") -> tuple[np.ndarray, np.ndarray]:
  """(ids int32 [n], counted bool [n]): the turns' pieces tokenized one by one, then EOS."""
  ids: list[int] = []
  counted: list[bool] = []
  for text, is_response in chat.turns(messages, template, tok, where):
    piece = tok.encode(text)
    ids.extend(piece)
    counted.extend([is_response] * len(piece))
  ids.append(eos_id)
  counted.append(True)
  return np.asarray(ids, np.int32), np.asarray(counted, bool)


def pack(conversations: list[tuple[np.ndarray, np.ndarray]], *, seq_len: int, eos_id: int,
         packing: bool = True) -> tuple[dict[str, np.ndarray], int]:
  """Rows (KEYS -> [N, seq_len]) of whole conversations, and how many were too long to fit.

  ``packing``: several conversations per row while they fit (else one per row, the LLaDA
  layout); a row's tail is EOS, scored, continuing its last conversation's segment.
  """
  rows: list[dict[str, np.ndarray]] = []
  dropped = 0
  row = None
  fill = segment = 0

  def close() -> None:
    if row is None:
      return
    tail = seq_len - fill
    row["tokens"][fill:] = eos_id
    row["loss_mask"][fill:] = 1.0
    row["segment_ids"][fill:] = segment
    last = row["positions"][fill - 1] if fill else -1
    row["positions"][fill:] = last + 1 + np.arange(tail, dtype=np.int32)
    rows.append(row)

  for ids, counted in conversations:
    n = ids.shape[0]
    if n > seq_len:
      dropped += 1
      continue
    if row is None or not packing or fill + n > seq_len:
      close()
      row = {"tokens": np.zeros(seq_len, np.int32), "loss_mask": np.zeros(seq_len, np.float32),
             "segment_ids": np.zeros(seq_len, np.int32), "positions": np.zeros(seq_len, np.int32)}
      fill = segment = 0
    segment += 1
    row["tokens"][fill:fill + n] = ids
    row["loss_mask"][fill:fill + n] = counted
    row["segment_ids"][fill:fill + n] = segment
    row["positions"][fill:fill + n] = np.arange(n, dtype=np.int32)
    fill += n
  close()
  if not rows:
    return {k: np.zeros((0, seq_len), np.float32 if k == "loss_mask" else np.int32)
            for k in KEYS}, dropped
  return {k: np.stack([r[k] for r in rows]) for k in KEYS}, dropped


# -------------------------------------------------------------- preparing --


def _split(items: list[tuple[chat.Messages, int]], val_permille: int
           ) -> tuple[list[tuple[chat.Messages, str]], list[tuple[chat.Messages, str]]]:
  train, val = [], []
  for i, (messages, crc) in enumerate(items):
    (val if crc % 1000 < val_permille else train).append((messages, f"conversation {i}"))
  return train, val


def conversations(data_cfg: Any) -> tuple[list[tuple[chat.Messages, str]],
                                          list[tuple[chat.Messages, str]], dict[str, Any]]:
  """(train, val) conversations with where each came from, and their provenance."""
  sc = data_cfg.sft
  limit = int(sc.get("max_conversations", 0) or 0)
  val_permille = int(sc.get("val_permille", 50))
  train_files = files_of(sc.get("train_files"), "train_files")
  if not train_files:  # the embedded default
    if sc.get("val_files"):
      raise UserError("data.sft.val_files needs data.sft.train_files; give both or neither")
    corpus = corpora.load_corpus("stdlib", root=data_cfg.get("root"),
                                 val_permille=int(data_cfg.get("val_permille", 50)),
                                 invalid_utf8=data_cfg.get("invalid_utf8", "fail"))
    train = stdlib_conversations(corpus.train, max_conversations=limit,
                                 max_chars=int(sc.get("max_response_chars", 400)))
    val = stdlib_conversations(corpus.val, max_conversations=max(limit // 10, 64) if limit else 0,
                               max_chars=int(sc.get("max_response_chars", 400)))
    meta = {"sft_source": "stdlib functions: signature -> docstring",
            "python_version": corpus.meta["python_version"]}
    return ([(m, f"stdlib function {i}") for i, m in enumerate(train)],
            [(m, f"stdlib function {i} (val)") for i, m in enumerate(val)], meta)
  read = lambda files: [(m, crc, f) for f in files for m, crc in read_conversations(f)]
  train_items = read(train_files)
  val_files = files_of(sc.get("val_files"), "val_files")
  if val_files:
    val_items = read(val_files)
    train = [(m, str(f)) for m, _, f in train_items]
    val = [(m, str(f)) for m, _, f in val_items]
  else:
    train, val = _split([(m, crc) for m, crc, _ in train_items], val_permille)
  if limit:
    train = train[:limit]
  meta = {"sft_source": ",".join(map(str, train_files)),
          "sft_val": ",".join(map(str, val_files)) or f"{val_permille} permille held out"}
  return train, val, meta


def prepare(data_cfg: Any, tok: Any, eos_id: int) -> SFTData:
  """Conversations -> tokenized -> packed train and validation rows."""
  seq_len = int(data_cfg.seq_len)
  sc = data_cfg.sft
  template = chat.resolve(str(sc.get("chat_template", "auto")), tok)
  train, val, meta = conversations(data_cfg)
  if not train:
    raise UserError("no training conversations: give data.sft.train_files (JSON Lines)")
  if not val:
    raise UserError("no validation conversations: give data.sft.val_files or raise"
                    " data.sft.val_permille")
  packing = bool(sc.get("packing", True))

  def rows_of(items: list[tuple[chat.Messages, str]], split: str) -> dict[str, np.ndarray]:
    tokenized = [tokenize(m, template, tok, eos_id, where) for m, where in items]
    rows, dropped = pack(tokenized, seq_len=seq_len, eos_id=eos_id, packing=packing)
    meta[f"{split}_conversations"] = len(items) - dropped
    meta[f"{split}_too_long"] = dropped
    if not rows["tokens"].shape[0]:
      longest = max(t[0].shape[0] for t in tokenized)
      raise UserError(f"every {split} conversation is longer than data.seq_len={seq_len} tokens"
                      f" (longest {longest}); raise --config.data.seq_len")
    return rows

  train_rows, val_rows = rows_of(train, "train"), rows_of(val, "val")
  meta.update(train_rows=int(train_rows["tokens"].shape[0]),
              val_rows=int(val_rows["tokens"].shape[0]), seq_len=seq_len,
              response_tokens=int(train_rows["loss_mask"].sum()),
              chat_template=str(sc.get("chat_template", "auto")))
  return SFTData(tok, train_rows, val_rows, meta)


def texts_for_tokenizer(data_cfg: Any) -> Iterator[str]:
  """The plain-template texts of the training conversations (to train a tokenizer on)."""
  train, _, _ = conversations(data_cfg)
  for messages, _ in train:
    yield chat.plain(messages, False)
