"""From corpus to training batches: tokenize, cache, pack, shard, shuffle.

``prepare`` is the one call the trainer makes. It loads the corpus, loads or
trains ``workdir/tokenizer.model`` (never overwriting an existing one),
tokenizes both splits into int32 token streams cached under ``workdir/data/``
and packs them into rows:

  stream = doc_0 + [eos] + doc_1 + [eos] + ...   ("concat" packing)
  rows   = stream[:N * seq_len].reshape(N, seq_len)   (remainder dropped)

Rows may start or end mid-document; the eos after each document marks the
boundary. ``train_iterator`` turns rows into an endless, checkpointable grain
iterator of per-process batches; ``eval_batches`` walks rows in order.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
import zlib
from typing import Any, Iterator

import chex
import grain
import ml_collections
import numpy as np

from dlm import errors
from dlm.data import corpora
from dlm.data import tokenizer as tokenizer_lib

TOKENIZER_FILE = "tokenizer.model"
DATA_DIR = "data"
CACHE_VERSION = 1
REQUIRED_FIELDS = ("source", "root", "vocab_size", "seq_len", "val_permille",
                   "tokenizer_max_chars")
# Iterator prefetch: batches are slices of in-memory arrays, so a couple of
# threads and a short buffer are plenty.
PREFETCH_THREADS = 2
PREFETCH_BUFFER = 8


@dataclasses.dataclass(frozen=True)
class PreparedData:
  """Everything the trainer needs from the data side.

  Attributes:
    tokenizer: the loaded tokenizer.
    train_rows: int32 [N, seq_len] packed training rows.
    val_rows: int32 [M, seq_len] packed validation rows.
    meta: corpus meta, token counts, tokenizer vocab size and cache key.
  """
  tokenizer: tokenizer_lib.Tokenizer
  train_rows: np.ndarray
  val_rows: np.ndarray
  meta: dict[str, Any]


# ----------------------------------------------------------------- prepare --


def _check_config(data_cfg: ml_collections.ConfigDict) -> None:
  missing = [f for f in REQUIRED_FIELDS if f not in data_cfg]
  if missing:
    raise ValueError(f"data config lacks {', '.join(missing)}; add them to"
                     " config.data")
  if data_cfg.seq_len < 1:
    raise ValueError(f"data.seq_len={data_cfg.seq_len} must be >= 1")


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
  """Writes ``data`` to a temp file next to ``path`` and renames it over."""
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def load_or_train_tokenizer(path: pathlib.Path, texts: list[str], *,
                            vocab_size: int, max_chars: int
                            ) -> tokenizer_lib.Tokenizer:
  """Loads the tokenizer at ``path``, training it there first if absent."""
  if not path.exists():
    try:
      return tokenizer_lib.train_tokenizer(
          texts, path, vocab_size=vocab_size, max_chars=max_chars)
    except FileExistsError:  # Another process won the race; use theirs.
      pass
  tok = tokenizer_lib.load_tokenizer(path)
  if tok.vocab_size != vocab_size:
    raise ValueError(
        f"{path} has vocab_size {tok.vocab_size} but data.vocab_size is"
        f" {vocab_size}; use a fresh workdir or set data.vocab_size to match")
  return tok


def pack_stream(docs: list[list[int]], eos_id: int) -> np.ndarray:
  """int32 stream: each document's ids followed by ``eos_id``."""
  out = np.empty(sum(len(d) + 1 for d in docs), dtype=np.int32)
  pos = 0
  for doc in docs:
    out[pos:pos + len(doc)] = doc
    out[pos + len(doc)] = eos_id
    pos += len(doc) + 1
  return out


def to_rows(stream: np.ndarray, seq_len: int) -> np.ndarray:
  """Splits a stream into [N, seq_len] rows, dropping the remainder."""
  chex.assert_rank(stream, 1)
  n = stream.shape[0] // seq_len
  return stream[:n * seq_len].reshape(n, seq_len)


def _cache_key(data_cfg: ml_collections.ConfigDict, corpus: corpora.Corpus,
               tok: tokenizer_lib.Tokenizer, chunk_chars: int) -> dict[str, Any]:
  """What the cached streams depend on; a mismatch forces a rebuild."""
  return {
      "cache_version": CACHE_VERSION,
      "source": data_cfg.source,
      "root": None if data_cfg.root is None else str(data_cfg.root),
      "val_permille": int(data_cfg.val_permille),
      "corpus": corpus.meta,
      "train_crc32": _texts_crc32(corpus.train, chunk_chars),
      "val_crc32": _texts_crc32(corpus.val, chunk_chars),
      "tokenizer_vocab_size": tok.vocab_size,
      "tokenizer_crc32": tok.fingerprint(),
  }


def _texts_crc32(texts: list[str],
                 chunk_chars: int = tokenizer_lib.TOKENIZE_CHUNK_CHARS) -> str:
  """crc32 of the texts' UTF-8, each followed by a NUL, encoded in slices.

  Slicing by characters keeps the bytes (and the crc) of encoding each text
  whole, without a copy of a long text.
  """
  crc = 0
  for text in texts:
    for start in range(0, len(text), chunk_chars):
      crc = zlib.crc32(text[start:start + chunk_chars].encode("utf-8"), crc)
    crc = zlib.crc32(b"\x00", crc)  # Separator: docs ["ab"] != ["a", "b"].
  return f"{crc:08x}"


def _load_cached_streams(data_dir: pathlib.Path, key: dict[str, Any]
                         ) -> tuple[np.ndarray, np.ndarray, dict] | None:
  """The cached (train, val, meta) if present and built with ``key``."""
  try:
    meta = json.loads((data_dir / "meta.json").read_text())
    if meta.get("key") != key:
      return None
    train = np.load(data_dir / "train.npy", allow_pickle=False)
    val = np.load(data_dir / "val.npy", allow_pickle=False)
  except (OSError, ValueError):
    return None
  if (train.dtype != np.int32 or val.dtype != np.int32
      or train.shape != (meta["train_tokens"],)
      or val.shape != (meta["val_tokens"],)):
    return None
  return train, val, meta


def _write_stream(path: pathlib.Path, texts: list[str],
                  tok: tokenizer_lib.Tokenizer, chunk_chars: int) -> int:
  """Tokenizes ``texts`` (each + eos) into the int32 ``.npy`` at ``path``.

  Ids go to a raw temp file chunk by chunk (``Tokenizer.encode_chunks``), then
  behind an npy header, so memory holds one chunk, never the whole stream or
  a copy of a long text. Returns the token count.
  """
  path.parent.mkdir(parents=True, exist_ok=True)
  eos = np.array([tok.eos_id], dtype=np.int32).tobytes()
  count = 0
  with tempfile.TemporaryFile(dir=path.parent) as raw:
    for text in texts:
      pieces = (text[i:i + chunk_chars] for i in range(0, len(text), chunk_chars))
      for ids in tok.encode_chunks(pieces, chunk_chars=chunk_chars):
        raw.write(ids.tobytes())
        count += ids.shape[0]
      raw.write(eos)
      count += 1
    raw.seek(0)
    _atomic_write_with(path, lambda f: _copy_npy(raw, f, count))
  return count


def _copy_npy(raw: Any, out: Any, count: int) -> None:
  """Writes a 1-D int32 npy of ``count`` ids: header, then ``raw``'s bytes."""
  header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.int32)),
            "fortran_order": False, "shape": (count,)}
  np.lib.format.write_array_header_1_0(out, header)
  shutil.copyfileobj(raw, out, 1 << 20)


def _atomic_write_with(path: pathlib.Path, write: Any) -> None:
  """``write(file)`` into a temp file next to ``path``, then renames it over."""
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def _build_streams(data_dir: pathlib.Path, key: dict[str, Any],
                   corpus: corpora.Corpus, tok: tokenizer_lib.Tokenizer,
                   chunk_chars: int) -> None:
  """Tokenizes both splits into the cache (meta.json last); load it after."""
  train_tokens = _write_stream(data_dir / "train.npy", corpus.train, tok,
                               chunk_chars)
  val_tokens = _write_stream(data_dir / "val.npy", corpus.val, tok,
                             chunk_chars)
  meta = {
      "key": key,
      **corpus.meta,
      "train_tokens": train_tokens,
      "val_tokens": val_tokens,
      "vocab_size": tok.vocab_size,
  }
  _atomic_write(data_dir / "meta.json",
                json.dumps(meta, indent=2, sort_keys=True).encode())


def _corpus_and_tokenizer(data_cfg: ml_collections.ConfigDict,
                          workdir: pathlib.Path, tok: Any = None
                          ) -> tuple[corpora.Corpus, tokenizer_lib.Tokenizer]:
  """The corpus (with data.invalid_utf8) and the workdir's tokenizer (``tok``: a given one,
  e.g. an imported model's tokenizer.json)."""
  corpus = corpora.load_corpus(
      data_cfg.source, root=data_cfg.root, val_permille=data_cfg.val_permille,
      invalid_utf8=data_cfg.get("invalid_utf8", "fail"))
  if tok is not None:
    return corpus, tok
  tok = load_or_train_tokenizer(
      workdir / TOKENIZER_FILE, corpus.train, vocab_size=data_cfg.vocab_size,
      max_chars=data_cfg.tokenizer_max_chars)
  return corpus, tok


def _streams(data_cfg: ml_collections.ConfigDict, workdir: pathlib.Path, tok: Any = None
             ) -> tuple[tokenizer_lib.Tokenizer, np.ndarray, np.ndarray, dict]:
  """(tokenizer, train stream, val stream, meta), from the cache or built.

  A build writes the cache and drops the texts before loading it, so the
  texts and the token streams are never in memory together.
  """
  chunk_chars = tokenizer_lib.check_chunk_chars(data_cfg.get(
      "tokenize_chunk_chars", tokenizer_lib.TOKENIZE_CHUNK_CHARS))
  corpus, tok = _corpus_and_tokenizer(data_cfg, workdir, tok)
  data_dir = workdir / DATA_DIR
  key = _cache_key(data_cfg, corpus, tok, chunk_chars)
  cached = _load_cached_streams(data_dir, key)
  if cached is not None:
    return (tok, *cached[:2], {**cached[2], "cache_hit": True})
  _build_streams(data_dir, key, corpus, tok, chunk_chars)
  del corpus
  built = _load_cached_streams(data_dir, key)
  if built is None:
    raise errors.UserError(f"{data_dir} changed while it was written; is another"
                           " run using this workdir? Use a fresh workdir")
  return (tok, *built[:2], {**built[2], "cache_hit": False})


def _rows_or_raise(stream: np.ndarray, seq_len: int, split: str) -> np.ndarray:
  rows = to_rows(stream, seq_len)
  if rows.shape[0] == 0:
    raise ValueError(
        f"the {split} split has {stream.shape[0]} tokens, fewer than"
        f" data.seq_len={seq_len}; lower seq_len or use a bigger corpus")
  return rows


def prepare(data_cfg: ml_collections.ConfigDict,
            workdir: str | os.PathLike[str], tokenizer: Any = None) -> PreparedData:
  """Corpus -> tokenizer -> cached token streams -> packed rows.

  Args:
    data_cfg: fields source, root, vocab_size, seq_len, val_permille,
      tokenizer_max_chars; optional invalid_utf8 ("fail" by default: a
      non-UTF-8 file under root raises naming it; "skip" counts it) and
      tokenize_chunk_chars (characters tokenized at once, see
      ``tokenizer.TOKENIZE_CHUNK_CHARS``: memory stays bounded whatever the
      length of a line).
    workdir: run directory; holds tokenizer.model and data/{train,val}.npy,
      data/meta.json.

  Returns:
    PreparedData with int32 [N, seq_len] train rows and [M, seq_len] val rows.
  """
  _check_config(data_cfg)
  workdir = pathlib.Path(workdir)
  tok, train, val, meta = _streams(data_cfg, workdir, tokenizer)
  meta = {**meta, "seq_len": int(data_cfg.seq_len)}
  train_rows = _rows_or_raise(train, data_cfg.seq_len, "train")
  val_rows = _rows_or_raise(val, data_cfg.seq_len, "val")
  chex.assert_rank([train_rows, val_rows], 2)
  chex.assert_type([train_rows, val_rows], np.int32)
  return PreparedData(tokenizer=tok, train_rows=train_rows, val_rows=val_rows,
                      meta=meta)


# --------------------------------------------------------------- iterators --


def _check_rows(rows: np.ndarray) -> None:
  chex.assert_rank(rows, 2)
  chex.assert_type(rows, np.int32)


def _as_batch(tokens: np.ndarray) -> dict[str, np.ndarray]:
  return {"tokens": tokens}


def train_iterator(rows: np.ndarray | dict[str, np.ndarray], *, batch_size: int, seed: int,
                   process_index: int = 0, process_count: int = 1
                   ) -> grain.DatasetIterator:
  """Endless shuffled batches {"tokens": int32 [batch_size, L]} for a process.

  ``rows`` may be a dict of [N, L] arrays (SFT rows: tokens, loss_mask, segment_ids,
  positions); batches then hold every key, rows shuffled together.

  All processes walk one shuffled stream of rows (reshuffled every epoch, an
  epoch boundary may fall inside a batch), cut into chunks of ``batch_size``
  contiguous rows; process p reads chunks p, p + P, p + 2P, ... and nothing
  else.  So global batch k (every process's k-th batch, in process order) is
  rows [kB, (k+1)B) of the stream whatever the process count: a run on 2 hosts
  sees exactly the batches of a run on 1.  The iterator is checkpointable:
  ``get_state()`` is a JSON-serializable dict, and ``set_state(state)`` on a
  fresh iterator built with the same arguments continues exactly where the
  saved one stopped.

  Args:
    rows: int32 [N, L] packed rows (the same on every process).
    batch_size: per-process batch size (global batch / process_count).
    seed: shuffle seed (use the same on every process).
    process_index: this process, in [0, process_count).
    process_count: number of data-loading processes.
  """
  columns = rows if isinstance(rows, dict) else None
  if columns is not None:
    rows = columns["tokens"]
  _check_rows(rows)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
  global_batch = batch_size * process_count
  if batch_size < 1 or rows.shape[0] < global_batch:
    raise ValueError(
        f"batch_size={batch_size} x {process_count} processes needs 1..{rows.shape[0]} rows;"
        " lower the batch size or use more data / a shorter seq_len")
  if columns is None:
    source, as_batch = grain.MapDataset.source(rows), _as_batch
  else:  # shuffle row numbers; a batch gathers every column at them
    source = grain.MapDataset.range(rows.shape[0])
    as_batch = lambda idx: {k: v[np.asarray(idx)] for k, v in columns.items()}
  ds = (source
        .shuffle(seed=seed)
        .repeat()
        .batch(batch_size, drop_remainder=True)[process_index::process_count]
        .map(as_batch))
  read_options = grain.ReadOptions(num_threads=PREFETCH_THREADS,
                                   prefetch_buffer_size=PREFETCH_BUFFER)
  return iter(ds.to_iter_dataset(read_options))


def eval_batches(rows: np.ndarray | dict[str, np.ndarray], *, batch_size: int,
                 max_rows: int | None = None
                 ) -> Iterator[dict[str, np.ndarray]]:
  """In-order batches covering ``rows[:max_rows]``, the last one zero-padded.

  Yields {"tokens": int32 [B, L], "loss_mask": float32 [B, L]}; padding rows
  are all ``0`` (the pad id) with loss_mask 0, real rows have loss_mask 1.
  ``rows`` may be a dict of [N, L] arrays (tokens, loss_mask, segment_ids, positions: SFT
  rows): each is padded the same way and a given loss_mask is kept.
  """
  if not isinstance(rows, dict):
    rows = {"tokens": rows}
  _check_rows(rows["tokens"])
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be >= 1")
  n, length = rows["tokens"].shape
  if max_rows is not None:
    n = min(n, max_rows)
  for start in range(0, n, batch_size):
    end = min(start + batch_size, n)
    out = {}
    for key, value in rows.items():
      padded = np.zeros((batch_size, length), dtype=value.dtype)
      padded[:end - start] = value[start:end]
      out[key] = padded
    if "loss_mask" not in rows:
      out["loss_mask"] = np.zeros((batch_size, length), dtype=np.float32)
      out["loss_mask"][:end - start] = 1.0
    out["loss_mask"] = out["loss_mask"].astype(np.float32)
    yield out


def num_eval_batches(num_rows: int, *, batch_size: int,
                     max_rows: int | None = None) -> int:
  """How many batches ``eval_batches`` yields."""
  n = num_rows if max_rows is None else min(num_rows, max_rows)
  return -(-n // batch_size)


# ------------------------------------------------------------------ metric --


def unigram_bits_per_byte(rows: np.ndarray, piece_bytes: np.ndarray) -> float:
  """Bits per byte of ``rows`` under their own empirical unigram distribution.

  H = -sum_v p_v log2 p_v over the token frequencies p of exactly these tokens
  (eos included); returns H * num_tokens / sum(piece_bytes[tokens]). A model
  must beat this (in-sample, so slightly optimistic) baseline.
  """
  tokens = np.asarray(rows).reshape(-1)
  chex.assert_rank(piece_bytes, 1)
  counts = np.bincount(tokens, minlength=piece_bytes.shape[0]).astype(np.float64)
  if counts.shape[0] != piece_bytes.shape[0]:
    raise ValueError(f"token id {tokens.max()} is outside piece_bytes of size"
                     f" {piece_bytes.shape[0]}; pass the tokenizer's piece_bytes")
  total_bytes = float(np.dot(counts, piece_bytes.astype(np.float64)))
  if total_bytes <= 0:
    raise ValueError("rows decode to 0 bytes; pass rows of real text")
  p = counts[counts > 0] / tokens.shape[0]
  bits = -float(np.sum(p * np.log2(p))) * tokens.shape[0]
  return bits / total_bytes
