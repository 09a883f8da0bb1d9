"""Streaming, checkpointable pretraining batches: shard, tokenize, pack, batch.

``stream_batches`` turns a ``grain.MapDataset`` of ``str`` documents into an
endless (or ``num_epochs``-long) iterator of per-process numpy batches:

  docs.shuffle(seed)[p::P].repeat(num_epochs)   document order and sharding
    .map(tokenize + eos)                         int32 [n_tokens + 1], or
                                                 TokenChunks (long documents)
    .to_iter_dataset() [.mp_prefetch(workers)]
    -> PackIterDataset                           one row dict per __next__
    .batch(batch_size)                           [B, L] arrays

Documents longer than ``chunk_chars`` (``data.tokenize_chunk_chars``) are
tokenized chunk by chunk while they are packed (``TokenChunks``), so memory
is bounded by the chunk, not by a document's or a line's length.

Sharding is at the document level: every epoch is a fresh permutation of all
documents (grain's ``ShuffleMapDataset`` reseeds with ``seed + epoch``), and
process ``p`` of ``P`` reads positions ``p, p + P, ...`` of it, so over one
epoch every document is read by exactly one process. Worker processes (if any)
only tokenize; packing runs in the consuming process, so the output does not
depend on ``worker_count``.

Packing modes (row length ``L = seq_len``):

  concat  documents, each followed by eos, are concatenated and cut into rows
          of exactly L tokens; the rest of a document continues the next row
          as a new segment. ``segment_ids`` number the document pieces of a
          row 1, 2, 3, ...; ``positions`` restart at 0 at each piece.
  pad     one document per row, truncated to L (eos kept iff it fits),
          padded with pad_id; ``segment_ids`` are 1 on real tokens, 0 on pad.

With ``num_epochs`` set, the last concat row and the last batch are padded
(``loss_mask`` 0, ``segment_ids`` 0) so every batch has the full [B, L] shape.

State: the packer saves the parent state from *before* the document it is in
the middle of plus the number of its tokens already emitted, so a restored
iterator re-reads that one document and continues exactly; the state is small
and JSON-serializable.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from typing import Any, Iterable, Iterator, Sequence

from absl import flags
import grain
import numpy as np

from dlm.data import sources
from dlm.data import tokenizer as tokenizer_lib

PACKING_MODES = ("concat", "pad")
# Per-worker buffer of tokenized documents when worker_count > 0.
WORKER_BUFFER_DOCS = 64
# Salt that separates the truncation random stream from other seeded streams.
TRUNCATE_SALT = 0x7C1A


@dataclasses.dataclass(frozen=True)
class PackSpec:
  """How rows are built; everything the packer needs besides its parent.

  Attributes:
    seq_len: tokens per row (L).
    packing: "concat" or "pad".
    pad_id: id written into padded positions.
    segment_ids: whether rows carry ``segment_ids`` and ``positions``.
    truncate_fraction: probability that a row is cut to a random length.
    seed: seed of the truncation decisions.
    process_index: mixed into the truncation seed so processes differ.
  """
  seq_len: int
  packing: str
  pad_id: int
  segment_ids: bool = True
  truncate_fraction: float = 0.0
  seed: int = 0
  process_index: int = 0


# --------------------------------------------------------------- tokenize --


class TokenizeWithEos(grain.transforms.Map):
  """document -> its ids followed by eos.

  A ``str`` of at most ``chunk_chars`` characters gives int32 [n + 1] (ids of
  ``Tokenizer.encode``); a longer one, or a ``sources.TextStream``, gives a
  lazy ``TokenChunks`` that tokenizes ``chunk_chars`` characters at a time
  while the packer reads it, so memory stays bounded whatever the length.
  Pickles as the tokenizer's model path only; a worker process reloads the
  model on first use.
  """

  def __init__(self, tok: tokenizer_lib.Tokenizer,
               chunk_chars: int = tokenizer_lib.TOKENIZE_CHUNK_CHARS):
    self._path = os.fspath(tok.path)
    self._tok: tokenizer_lib.Tokenizer | None = tok
    self.chunk_chars = tokenizer_lib.check_chunk_chars(chunk_chars)

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, "_tok": None}

  def _tokenizer(self) -> tokenizer_lib.Tokenizer:
    if self._tok is None:
      self._tok = tokenizer_lib.load_tokenizer(self._path)
    return self._tok

  def map(self, element: str | sources.TextStream
          ) -> np.ndarray | TokenChunks:
    if isinstance(element, str) and len(element) <= self.chunk_chars:
      tok = self._tokenizer()
      ids = tok.encode(element) if element else []
      return np.array(ids + [tok.eos_id], dtype=np.int32)  # [n + 1]
    return TokenChunks(self, element)


class TokenChunks:
  """The ids of a long document and its eos, as int32 chunks when iterated.

  Each iteration re-reads and re-tokenizes the document (a restored packer
  skips the tokens it already emitted); one chunk is in memory at a time.
  """

  def __init__(self, tokenize: TokenizeWithEos,
               document: str | sources.TextStream):
    self._tokenize, self._document = tokenize, document

  def __iter__(self) -> Iterator[np.ndarray]:
    tok = self._tokenize._tokenizer()  # pylint: disable=protected-access
    chunk_chars = self._tokenize.chunk_chars
    yield from tok.encode_chunks(
        sources.document_pieces(self._document, chunk_chars),
        chunk_chars=chunk_chars)
    yield np.array([tok.eos_id], dtype=np.int32)


def _chunks_of(document: np.ndarray | Iterable[np.ndarray]
               ) -> Iterator[np.ndarray]:
  """A document's ids as consecutive 1-D arrays (an array is one chunk)."""
  if isinstance(document, np.ndarray):
    return iter((document,))
  return iter(document)


# ------------------------------------------------------------------ rows --


def empty_row(spec: PackSpec) -> dict[str, np.ndarray]:
  """An all-padding row: pad tokens, loss_mask 0 (and segment/position 0)."""
  row = {
      "tokens": np.full(spec.seq_len, spec.pad_id, np.int32),
      "loss_mask": np.zeros(spec.seq_len, np.float32),
  }
  if spec.segment_ids:
    row["segment_ids"] = np.zeros(spec.seq_len, np.int32)
    row["positions"] = np.zeros(spec.seq_len, np.int32)
  return row


def write_piece(row: dict[str, np.ndarray], start: int, piece: np.ndarray,
                segment: int, first_position: int = 0) -> None:
  """Writes ``piece`` at ``row[..][start:]`` as segment ``segment``.

  Its positions count from ``first_position`` (a segment written in several
  pieces continues its positions).
  """
  end = start + piece.shape[0]
  row["tokens"][start:end] = piece
  row["loss_mask"][start:end] = 1.0
  if "segment_ids" in row:
    row["segment_ids"][start:end] = segment
    row["positions"][start:end] = np.arange(
        first_position, first_position + end - start, dtype=np.int32)


def cut_row(row: dict[str, np.ndarray], length: int, pad_id: int) -> None:
  """Keeps the first ``length`` positions of ``row``; pads the rest."""
  row["tokens"][length:] = pad_id
  row["loss_mask"][length:] = 0.0
  if "segment_ids" in row:
    row["segment_ids"][length:] = 0
    row["positions"][length:] = 0


def truncation_length(spec: PackSpec, row_index: int) -> int | None:
  """The length row ``row_index`` is cut to, or None if it is kept whole.

  LLaDA (Nie et al. 2025), Sec. B.1: 1% of pretraining data get a random
  length in [1, 4096]; here a row is cut with probability
  ``truncate_fraction`` to a length uniform in [1, seq_len]. The decision
  depends only on (seed, process_index, row_index).
  """
  if spec.truncate_fraction <= 0.0:
    return None
  rng = np.random.default_rng(
      [spec.seed, spec.process_index, row_index, TRUNCATE_SALT])
  if rng.random() >= spec.truncate_fraction:
    return None
  return int(rng.integers(1, spec.seq_len + 1))


# ---------------------------------------------------------------- packer --


class PackDatasetIterator(grain.DatasetIterator):
  """Packs int32 documents (eos included) into row dicts; see module doc.

  A document is an array or an iterable of array chunks (``TokenChunks``);
  only the current chunk is held. Between ``__next__`` calls the buffered data
  is the unread rest of the current document, so the state is (parent state
  before that document, tokens of it already emitted, rows emitted,
  exhausted).
  """

  def __init__(self, parent: grain.DatasetIterator, spec: PackSpec):
    super().__init__(parent)
    self._spec = spec
    self._chunks: Iterator[np.ndarray] | None = None  # Rest of the document.
    self._chunk: np.ndarray | None = None  # Current chunk of the document.
    self._pos = 0  # Tokens of self._chunk already emitted.
    self._doc_state: dict[str, Any] | None = None  # Parent state before it.
    self._offset = 0  # Tokens of the current document already emitted.
    self._rows = 0
    self._exhausted = False

  def _has_tail(self) -> bool:
    return self._chunk is not None and self._pos < self._chunk.shape[0]

  def _next_chunk(self) -> None:
    """Makes the next non-empty chunk current (None at the document's end)."""
    self._chunk, self._pos = None, 0
    for chunk in self._chunks or ():
      if chunk.shape[0]:
        self._chunk = chunk
        return
    self._chunks = None

  def _read_doc(self) -> bool:
    """Makes the next parent document current; False at the end."""
    state = copy.deepcopy(self._parent.get_state())
    try:
      doc = next(self._parent)
    except StopIteration:
      return False
    self._chunks, self._doc_state, self._offset = _chunks_of(doc), state, 0
    self._next_chunk()
    return True

  def _take(self, limit: int) -> np.ndarray:
    """Up to ``limit`` next tokens of the current chunk; advances past them."""
    piece = self._chunk[self._pos:self._pos + limit]
    self._pos += piece.shape[0]
    self._offset += piece.shape[0]
    if self._pos == self._chunk.shape[0]:
      self._next_chunk()
    return piece

  def _skip(self, count: int) -> None:
    """Drops the next ``count`` tokens of the current document (on restore)."""
    while count > 0 and self._has_tail():
      count -= self._take(count).shape[0]

  def _fill_concat(self, row: dict[str, np.ndarray]) -> int:
    """Fills ``row`` from the document stream; returns tokens written."""
    filled, segment = 0, 0
    while filled < self._spec.seq_len:
      if not self._has_tail() and not self._read_doc():
        break
      segment, start = segment + 1, filled
      while filled < self._spec.seq_len and self._has_tail():
        piece = self._take(self._spec.seq_len - filled)
        write_piece(row, filled, piece, segment, first_position=filled - start)
        filled += piece.shape[0]
    return filled

  def _fill_pad(self, row: dict[str, np.ndarray]) -> int:
    """Writes one (truncated) document into ``row``; returns its length."""
    if not self._read_doc():
      return 0
    filled = 0
    while filled < self._spec.seq_len and self._has_tail():
      piece = self._take(self._spec.seq_len - filled)
      write_piece(row, filled, piece, 1, first_position=filled)
      filled += piece.shape[0]
    # The rest of a long doc is dropped, untokenized.
    self._chunks, self._chunk, self._pos = None, None, 0
    return filled

  def __next__(self) -> dict[str, np.ndarray]:
    if self._exhausted:
      raise StopIteration
    row = empty_row(self._spec)
    if self._spec.packing == "concat":
      filled = self._fill_concat(row)
      # A short concat row means the parent ran out; it is the last row.
      self._exhausted = filled < self._spec.seq_len
    else:
      filled = self._fill_pad(row)
      self._exhausted = filled == 0
    if filled == 0:
      raise StopIteration
    length = truncation_length(self._spec, self._rows)
    if length is not None:
      cut_row(row, length, self._spec.pad_id)
    self._rows += 1
    return row

  def get_state(self) -> dict[str, Any]:
    if self._has_tail():
      parent, offset = self._doc_state, self._offset
    else:
      parent, offset = self._parent.get_state(), 0
    return {"parent": copy.deepcopy(parent), "doc_offset": int(offset),
            "rows": int(self._rows), "exhausted": bool(self._exhausted)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(copy.deepcopy(state["parent"]))
    self._chunks, self._chunk, self._pos = None, None, 0
    self._doc_state, self._offset = None, 0
    self._rows = int(state["rows"])
    self._exhausted = bool(state["exhausted"])
    if state["doc_offset"] > 0:
      if not self._read_doc():
        raise ValueError("the saved document is missing on restore; rebuild"
                         " the iterator with the same docs and arguments")
      self._skip(int(state["doc_offset"]))


class PackIterDataset(grain.IterDataset):
  """``IterDataset`` of packed row dicts; see ``PackDatasetIterator``."""

  def __init__(self, parent: grain.IterDataset, spec: PackSpec):
    super().__init__(parent)
    self._spec = spec

  def __iter__(self) -> PackDatasetIterator:
    return PackDatasetIterator(self._parent.__iter__(), self._spec)

  def __str__(self) -> str:
    return f"PackIterDataset(packing={self._spec.packing!r})"


def stack_rows(rows: Sequence[dict[str, np.ndarray]], batch_size: int,
               spec: PackSpec) -> dict[str, np.ndarray]:
  """Stacks rows into [B, L] arrays, padding a short last batch to B rows."""
  rows = list(rows) + [empty_row(spec)] * (batch_size - len(rows))
  return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


# -------------------------------------------------------------- pipeline --


def _check_args(docs: grain.MapDataset, *, seq_len: int, batch_size: int,
                seed: int, packing: str, truncate_fraction: float,
                process_index: int, process_count: int,
                num_epochs: int | None, worker_count: int) -> None:
  """Raises ValueError on an argument stream_batches cannot honor."""
  if packing not in PACKING_MODES:
    raise ValueError(f"packing={packing!r} is unknown; use one of"
                     f" {PACKING_MODES}")
  if seq_len < 1 or batch_size < 1:
    raise ValueError(f"seq_len={seq_len}, batch_size={batch_size}; both must"
                     " be >= 1")
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed={seed} must be in [0, 2**32); reduce it mod 2**32")
  if not 0.0 <= truncate_fraction <= 1.0:
    raise ValueError(f"truncate_fraction={truncate_fraction} must be in"
                     " [0, 1]; LLaDA uses 0.01")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0,"
                     f" process_count={process_count}); pass"
                     " jax.process_index() and jax.process_count()")
  if len(docs) < process_count:
    raise ValueError(f"{len(docs)} documents cannot feed {process_count}"
                     " processes; use a bigger source or fewer processes")
  if num_epochs is not None and num_epochs < 1:
    raise ValueError(f"num_epochs={num_epochs} must be >= 1, or None to"
                     " repeat forever")
  if worker_count < 0:
    raise ValueError(f"worker_count={worker_count} must be >= 0 (0: tokenize"
                     " in this process)")


def shard_documents(docs: grain.MapDataset, *, seed: int, process_index: int,
                    process_count: int, num_epochs: int | None
                    ) -> grain.MapDataset:
  """This process's documents: ``[p::P]`` of a fresh permutation per epoch.

  ``shuffle`` maps index ``e * N + i`` to permutation ``seed + e`` of epoch
  ``e``, and slicing maps index ``e * n_p + j`` to ``e * N + p + j * P``, so
  epoch ``e`` of the result is this process's share of epoch ``e``.
  """
  shard = docs.shuffle(seed=seed)[process_index::process_count]
  return shard.repeat(num_epochs)


def _ensure_flags_parsed() -> None:
  """grain's worker processes read absl flags; outside an absl app use defaults."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def stream_batches(docs: grain.MapDataset, tokenizer: tokenizer_lib.Tokenizer,
                   *, seq_len: int, batch_size: int, seed: int,
                   packing: str = "concat", segment_ids: bool = True,
                   truncate_fraction: float = 0.0, process_index: int = 0,
                   process_count: int = 1, num_epochs: int | None = None,
                   worker_count: int = 0,
                   chunk_chars: int = tokenizer_lib.TOKENIZE_CHUNK_CHARS
                   ) -> grain.DatasetIterator:
  """A checkpointable iterator of this process's packed numpy batches.

  Args:
    docs: the documents (``str``), the same on every process.
    tokenizer: a loaded tokenizer; workers reload it from ``tokenizer.path``.
    seq_len: tokens per row (L).
    batch_size: rows per batch on this process (B).
    seed: seed of the document order and of the truncation decisions.
    packing: "concat" (documents joined with eos, cut into rows) or "pad"
      (one document per row).
    segment_ids: also emit ``segment_ids`` and ``positions``.
    truncate_fraction: fraction of rows cut to a random length (LLaDA).
    process_index: this process (p).
    process_count: number of processes (P); process p reads documents
      ``[p::P]`` of each epoch's permutation.
    num_epochs: epochs to read, or None to repeat forever.
    worker_count: tokenizer worker processes (0: tokenize in this process).
    chunk_chars: characters tokenized at once (``data.tokenize_chunk_chars``);
      longer documents are tokenized in chunks as they are packed (in this
      process, also with workers), so memory does not grow with their length.

  Returns:
    An iterator of dicts: ``tokens`` int32 [B, L], ``loss_mask`` float32
    [B, L], and with ``segment_ids`` also ``segment_ids``/``positions``
    int32 [B, L]. ``get_state``/``set_state`` resume exactly.
  """
  _check_args(docs, seq_len=seq_len, batch_size=batch_size, seed=seed,
              packing=packing, truncate_fraction=truncate_fraction,
              process_index=process_index, process_count=process_count,
              num_epochs=num_epochs, worker_count=worker_count)
  spec = PackSpec(seq_len=seq_len, packing=packing, pad_id=tokenizer.pad_id,
                  segment_ids=segment_ids,
                  truncate_fraction=float(truncate_fraction), seed=seed,
                  process_index=process_index)
  shard = shard_documents(docs, seed=seed, process_index=process_index,
                          process_count=process_count, num_epochs=num_epochs)
  tokens = shard.map(TokenizeWithEos(tokenizer, chunk_chars)).to_iter_dataset(
      grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  if worker_count > 0:
    _ensure_flags_parsed()
    tokens = tokens.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=WORKER_BUFFER_DOCS))
  rows = PackIterDataset(tokens, spec)
  batches = rows.batch(
      batch_size, batch_fn=lambda r: stack_rows(r, batch_size, spec))
  return iter(batches)


# ------------------------------------------------------------- tokenizer --


def sample_documents(docs: grain.MapDataset, *, max_chars: int, seed: int
                     ) -> list[str]:
  """Documents in a seeded random order until ``max_chars`` characters.

  Reads one document at a time; the last one is cut to the remaining budget,
  so at most ``max_chars`` characters are read into memory (a
  ``sources.TextStream`` is read only as far as its part of the sample).
  """
  order = docs.shuffle(seed=seed)
  sample, total = [], 0
  for i in range(len(order)):
    if total >= max_chars:
      break
    text = sources.document_head(order[i], max_chars - total)
    sample.append(text)
    total += len(text)
  return sample


def train_tokenizer_from_docs(docs: grain.MapDataset,
                              out_path: str | os.PathLike[str], *,
                              vocab_size: int, max_chars: int, seed: int,
                              model_type: str = "bpe") -> tokenizer_lib.Tokenizer:
  """Trains a tokenizer on a seeded sample of at most ``max_chars`` chars."""
  if max_chars < 1:
    raise ValueError(f"max_chars={max_chars} must be >= 1; use e.g. 4_000_000")
  sample = sample_documents(docs, max_chars=max_chars, seed=seed)
  return tokenizer_lib.train_tokenizer(
      sample, out_path, vocab_size=vocab_size, max_chars=max_chars, seed=seed,
      model_type=model_type)
