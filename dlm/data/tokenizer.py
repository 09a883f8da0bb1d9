"""A lossless byte-fallback BPE tokenizer for code (sentencepiece).

Special ids (fixed by ``train_tokenizer`` and checked when loading):

  0 <pad>   padding; eval batches pad with zeros, so padding reads as <pad>
  1 <unk>   never produced (byte fallback covers every character)
  2 <s>     bos; reserved, the pipeline does not use it
  3 </s>    eos; appended after every document (the document separator)
  4 <mask>  the absorbing-state token of masked diffusion

All five are control/unknown pieces: ``encode`` never produces them from text
(the literal string "<mask>" encodes as ordinary pieces) and ``decode`` renders
them as nothing, except ``<mask>`` when ``show_mask`` is given. Ids 5..260 are
the 256 byte-fallback pieces, the rest are learned BPE merges.

Whitespace: the model uses identity normalization and keeps spaces, tabs and
newlines. sentencepiece keeps '\\n' inside a training sentence, so documents
are fed as line-aligned chunks of several lines and pieces such as "):\\n",
"\\n\\n" and runs of indentation spaces are learned. sentencepiece maps ' ' to
U+2581 internally, so a literal U+2581 in the input would decode as a space;
``encode`` therefore emits literal U+2581 characters as their three UTF-8
byte-fallback ids, which keeps ``decode(encode(text)) == text`` exact for
every str that is valid Unicode (lone surrogates cannot be encoded at all).

Long texts: ``encode_chunks`` encodes ``TOKENIZE_CHUNK_CHARS`` characters at a
time (``data.tokenize_chunk_chars``), cut where sentencepiece starts a word
(``safe_cut``), so memory is bounded whatever the length of a line; sentencepiece
on one 200 MB string would take about 9 GB.
"""

from __future__ import annotations

import io
import os
import pathlib
import re
import tempfile
import zlib
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from dlm import errors

PAD_ID, UNK_ID, BOS_ID, EOS_ID, MASK_ID = 0, 1, 2, 3, 4
MASK_PIECE = "<mask>"
NUM_SPECIAL = 5
NUM_BYTE_PIECES = 256
# sentencepiece's internal whitespace symbol (U+2581, "lower one eighth block").
SPACE_SYMBOL = "\u2581"
TRAIN_CHUNK_CHARS = 2048
# Characters sentencepiece encodes at once (``data.tokenize_chunk_chars``):
# encoding takes about 45 bytes a character plus the Python id list, so 1M
# characters peak near 60 MB whatever the length of a line or a file.
TOKENIZE_CHUNK_CHARS = 1 << 20
CHARACTER_COVERAGE = 0.9995


def write_new_file(path: str | os.PathLike[str], data: bytes) -> None:
  """Atomically creates ``path`` with ``data``; never replaces an existing file.

  Writes a temporary file in the same directory, then hard-links it into place
  (fails if ``path`` exists). Where hard links are unsupported it falls back to
  an existence check plus ``os.replace``.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    _link_no_clobber(pathlib.Path(tmp), path)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def _link_no_clobber(tmp: pathlib.Path, path: pathlib.Path) -> None:
  if path.exists():
    raise FileExistsError(
        f"{path} already exists; load it with load_tokenizer or delete it")
  try:
    os.link(tmp, path)
  except FileExistsError:
    raise FileExistsError(
        f"{path} already exists; load it with load_tokenizer or delete it"
    ) from None
  except OSError:  # No hard links on this filesystem.
    os.replace(tmp, path)


# What ``str.splitlines`` treats as a line boundary ("\r\n" counts as one).
_LINE = re.compile(
    "[^\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]*"
    "(?:\r\n|[\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]|\\Z)")


def _line_spans(text: str) -> Iterator[tuple[int, int]]:
  """(start, end) of each line of ``text`` as ``splitlines(keepends=True)``.

  A regex walk, so no list of lines (nor a copy of a long line) is built.
  """
  for match in _LINE.finditer(text):
    if match.end() > match.start():
      yield match.span()


def _line_chunk_spans(text: str, chunk_chars: int) -> Iterator[tuple[int, int]]:
  """(start, end) of the chunks of ``_line_chunks``; each chunk is contiguous."""
  start = end = 0
  for line_start, line_end in _line_spans(text):
    for part in range(line_start, line_end, chunk_chars):
      part_end = min(part + chunk_chars, line_end)
      if (end - start) + (part_end - part) > chunk_chars and end > start:
        yield start, end
        start = part
      end = part_end
  if end > start:
    yield start, end


def _line_chunks(text: str, chunk_chars: int) -> Iterator[str]:
  """Splits ``text`` into chunks of whole lines of at most ``chunk_chars``.

  Lines longer than ``chunk_chars`` are cut into pieces of that size.
  """
  for start, end in _line_chunk_spans(text, chunk_chars):
    yield text[start:end]


def training_sample(texts: Sequence[str], *, max_chars: int, seed: int = 0,
                    chunk_chars: int = TRAIN_CHUNK_CHARS) -> list[str]:
  """A bounded deterministic sample of line-aligned chunks of ``texts``.

  All documents are cut into chunks of whole lines, the chunks are shuffled
  with ``seed`` and taken in that order while the total stays within
  ``max_chars``. The result depends only on the texts, ``max_chars``, ``seed``.
  Only the chunks' (document, start, end) are held until the sample is cut,
  so memory is the sample plus 24 bytes a chunk, not a copy of the texts.
  """
  spans = np.array([(t, s, e) for t, text in enumerate(texts)
                    for s, e in _line_chunk_spans(text, chunk_chars)],
                   dtype=np.int64).reshape(-1, 3)  # [num_chunks, 3]
  order = np.random.default_rng(seed).permutation(spans.shape[0])
  sample, total = [], 0
  for t, s, e in spans[order].tolist():
    if total + (e - s) > max_chars:
      continue
    sample.append(texts[t][s:e])
    total += e - s
  return sample


def check_chunk_chars(chunk_chars: int) -> int:
  """``chunk_chars`` as an int, or a UserError naming the config field."""
  if isinstance(chunk_chars, bool) or not isinstance(chunk_chars, int) or chunk_chars < 1024:
    raise errors.UserError(
        f"config.data.tokenize_chunk_chars={chunk_chars!r} must be an int >= 1024;"
        f" use e.g. {TOKENIZE_CHUNK_CHARS} (characters tokenized at once)")
  return chunk_chars


def safe_cut(text: str, limit: int) -> int:
  """Where to end a chunk of ``text`` (longer than ``limit``): an index in [1, limit].

  The last word start in ``text[limit // 2:limit + 1]``: a space after a non-space.
  sentencepiece (split_by_whitespace, no dummy prefix) starts a word there and no
  piece crosses it, so encoding both sides apart gives the same ids as encoding
  the whole (BPE exactly; unigram up to rare equal-score splits of a run of
  spaces, the same pieces in another order, that rounding resolves either
  way). Without one (no spaces for ``limit / 2`` characters) the cut is at
  ``limit``, where the ids near the cut may differ from a whole encoding; the
  text still round-trips exactly.
  """
  low = max(1, limit // 2)
  space = text.rfind(" ", low, limit + 1)
  if space < 0:
    return limit
  run_start = low + len(text[low:space].rstrip(" "))  # first space of its run
  return run_start if text[run_start - 1] != " " else limit


def text_chunks(pieces: Iterable[str], chunk_chars: int) -> Iterator[str]:
  """Re-cuts consecutive pieces of one text into chunks of at most ``chunk_chars``.

  Chunks end at ``safe_cut`` points; a text of at most ``chunk_chars`` characters
  is one chunk. At most about ``2 * chunk_chars`` characters are held at once,
  whatever the size of a piece (long pieces are walked in slices).
  """
  carry = ""
  for piece in pieces:
    for start in range(0, len(piece), chunk_chars):
      buf = carry + piece[start:start + chunk_chars]
      while len(buf) > chunk_chars:
        cut = safe_cut(buf, chunk_chars)
        yield buf[:cut]
        buf = buf[cut:]
      carry = buf
  if carry:
    yield carry


MODEL_TYPES = ("bpe", "unigram")


def _trainer_kwargs(vocab_size: int, chunk_chars: int, model_type: str = "bpe") -> dict[str, object]:
  if model_type not in MODEL_TYPES:
    raise ValueError(f"tokenizer model type {model_type!r} unknown; use one of {MODEL_TYPES}")
  return dict(
      model_type=model_type,
      vocab_size=vocab_size,
      normalization_rule_name="identity",
      byte_fallback=True,
      add_dummy_prefix=False,
      remove_extra_whitespaces=False,
      split_digits=True,
      allow_whitespace_only_pieces=True,
      character_coverage=CHARACTER_COVERAGE,
      pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
      control_symbols=[MASK_PIECE],
      # A chunk of `chunk_chars` characters has at most 4 bytes per character.
      max_sentence_length=4 * chunk_chars + 16,
      num_threads=max(1, min(os.cpu_count() or 1, 16)),
      minloglevel=2,
  )


def train_tokenizer(texts: Sequence[str], out_path: str | os.PathLike[str], *,
                    vocab_size: int, max_chars: int = 4_000_000,
                    seed: int = 0, model_type: str = "bpe") -> Tokenizer:
  """Trains a byte-fallback BPE (or unigram) tokenizer in-process and writes it to out_path.

  Args:
    texts: training documents.
    out_path: where to write the sentencepiece model; must not exist yet.
    vocab_size: total vocabulary size, including the 5 specials and the 256
      byte pieces.
    max_chars: bound on the training sample (see ``training_sample``).
    seed: seed of the sample.
    model_type: "bpe" or "unigram" (sentencepiece's model types).

  Returns:
    The loaded Tokenizer.
  """
  min_vocab = NUM_SPECIAL + NUM_BYTE_PIECES + 1
  if vocab_size < min_vocab:
    raise ValueError(
        f"vocab_size={vocab_size} is too small; use at least {min_vocab}"
        " (5 specials + 256 byte pieces + merges)")
  if pathlib.Path(out_path).exists():
    raise FileExistsError(
        f"{out_path} already exists; load it with load_tokenizer or delete it")
  sample = training_sample(texts, max_chars=max_chars, seed=seed)
  if not sample:
    raise ValueError("no training text for the tokenizer; pass non-empty texts")
  model = io.BytesIO()
  spm.set_random_generator_seed(seed)
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sample), model_writer=model,
        **_trainer_kwargs(vocab_size, TRAIN_CHUNK_CHARS, model_type))
  except RuntimeError as e:
    raise ValueError(
        f"sentencepiece training failed ({str(e).strip()}); try a different"
        " vocab_size or more training text") from None
  write_new_file(out_path, model.getvalue())
  return Tokenizer(out_path)


class Tokenizer:
  """A loaded sentencepiece model with exact round trips and special ids."""

  def __init__(self, path: str | os.PathLike[str]):
    self.path = pathlib.Path(path)
    self._sp = _load_processor(self.path)
    self.vocab_size: int = self._sp.get_piece_size()
    self.pad_id: int = self._sp.pad_id()
    self.bos_id: int = self._sp.bos_id()
    self.eos_id: int = self._sp.eos_id()
    self.unk_id: int = self._sp.unk_id()
    self.mask_id: int = self._sp.piece_to_id(MASK_PIECE)
    self._check_specials()
    self._num_threads = max(1, min(os.cpu_count() or 1, 16))
    self._piece_table = [self._piece_to_bytes(i) for i in range(self.vocab_size)]
    self._space_symbol_ids = [
        self._sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_SYMBOL.encode()]

  def _check_specials(self) -> None:
    specials = (self.pad_id, self.unk_id, self.bos_id, self.eos_id)
    if min(specials) < 0 or not self._sp.is_control(self.mask_id):
      raise ValueError(
          f"{self.path} lacks pad/unk/bos/eos or a {MASK_PIECE} control"
          " symbol; retrain it with dlm.data.tokenizer.train_tokenizer")
    if not self._sp.is_byte(NUM_SPECIAL):
      raise ValueError(
          f"{self.path} was not trained with byte_fallback; retrain it with"
          " dlm.data.tokenizer.train_tokenizer")

  def is_special(self, i: int) -> bool:
    """Whether id ``i`` is a control or unknown piece (decodes to nothing)."""
    return bool(self._sp.is_control(i) or self._sp.is_unknown(i)
                or self._sp.is_unused(i))

  def _piece_to_bytes(self, i: int) -> bytes:
    if self.is_special(i):
      return b""
    piece = self._sp.id_to_piece(i)
    if self._sp.is_byte(i):
      return bytes([int(piece[1:-1], 16)])  # "<0xAB>"
    return piece.replace(SPACE_SYMBOL, " ").encode("utf-8")

  def piece_bytes(self) -> np.ndarray:
    """int32 [vocab_size]: UTF-8 bytes each id contributes when decoded."""
    return np.array([len(b) for b in self._piece_table], dtype=np.int32)

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(i)

  def encode(self, text: str) -> list[int]:
    """Token ids of ``text`` (no bos/eos added)."""
    return self.encode_batch([text])[0]

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text; multithreaded inside sentencepiece."""
    texts = list(texts)
    out = self._sp.encode(texts, num_threads=self._num_threads)
    for i, text in enumerate(texts):
      if SPACE_SYMBOL in text:
        out[i] = self._encode_with_space_symbols(text)
    return out

  def encode_chunks(self, pieces: Iterable[str], *,
                    chunk_chars: int = TOKENIZE_CHUNK_CHARS) -> Iterator[np.ndarray]:
    """int32 ids of the text made of ``pieces``, one array per ``text_chunks`` chunk.

    Memory is bounded by ``chunk_chars`` whatever the text's length; the ids are
    those of ``encode`` of the whole text (see ``safe_cut`` for the exception).
    """
    for chunk in text_chunks(pieces, chunk_chars):
      yield np.asarray(self.encode(chunk), dtype=np.int32)

  def _encode_with_space_symbols(self, text: str) -> list[int]:
    """Encodes around literal U+2581, which becomes its byte-fallback ids."""
    parts = self._sp.encode(text.split(SPACE_SYMBOL),
                            num_threads=self._num_threads)
    ids = list(parts[0])
    for part in parts[1:]:
      ids.extend(self._space_symbol_ids)
      ids.extend(part)
    return ids

  def decode(self, ids: Iterable[int] | np.ndarray, *,
             show_mask: str | None = None) -> str:
    """Text of ``ids``; specials decode to "", ``mask_id`` to ``show_mask``.

    Invalid UTF-8 from byte pieces (e.g. a sequence cut mid-character) is
    replaced by U+FFFD.
    """
    if isinstance(ids, Iterator):
      ids = list(ids)
    ids = np.asarray(ids, dtype=np.int64)  # Lists, numpy and jax arrays.
    if ids.ndim != 1:
      raise ValueError(f"decode takes a 1-D id sequence, got shape {ids.shape};"
                       " decode each row separately")
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(f"ids must lie in [0, {self.vocab_size}); got"
                       f" [{ids.min()}, {ids.max()}]; check the model's vocab")
    table = self._piece_table
    if show_mask is not None:
      table = list(table)
      table[self.mask_id] = show_mask.encode("utf-8")
    return b"".join([table[i] for i in ids.tolist()]).decode(
        "utf-8", errors="replace")

  def fingerprint(self) -> str:
    """crc32 of the model file, to tie caches to this exact tokenizer."""
    return f"{zlib.crc32(self.path.read_bytes()):08x}"


def _load_processor(path: pathlib.Path) -> spm.SentencePieceProcessor:
  if not path.is_file():
    raise FileNotFoundError(
        f"tokenizer model {path} not found; train one with"
        " dlm.data.tokenizer.train_tokenizer or fix the path")
  sp = spm.SentencePieceProcessor()
  try:
    sp.load(str(path))
  except (RuntimeError, OSError) as e:
    raise ValueError(
        f"{path} is not a valid sentencepiece model ({str(e).strip()});"
        " delete it and retrain") from None
  return sp


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
  """Loads a tokenizer written by ``train_tokenizer``."""
  return Tokenizer(path)
