"""Document sources: grain ``MapDataset``s of ``str``, one element a document.

``make_source(cfg, split)`` picks a source from ``cfg.source``:

* ``"stdlib"``: the embedded corpus of ``corpora.load_corpus`` (fields
  ``root=None``, ``val_permille=50``).
* ``"tfds"``: a TFDS dataset already prepared as ArrayRecord, read with
  ``tfds.data_source`` (no TensorFlow needed). Fields under ``cfg.tfds``:
  ``name`` (required; ``"dlm_stdlib"`` prepares itself, see
  ``tfds_stdlib.py``), ``data_dir=None`` (TFDS default dir),
  ``splits={"train": "train", "validation": "validation"}``,
  ``text_field="text"``.
* ``"files"``: local files by glob. Fields under ``cfg.files``:
  ``train_glob``, ``val_glob`` (required for the split asked), ``format=None``
  (``"text" | "jsonl" | "array_record"``; ``None`` infers it from each file's
  extension: ``.jsonl`` -> jsonl, ``.array_record`` -> array_record, anything
  else -> text), ``jsonl_field="text"``. Text: one document per file (a file
  of more than ``tokenize_chunk_chars`` bytes is a ``TextStream``, decoded in
  pieces whenever it is read, never held as one str). JSON
  Lines: one document per non-blank line. ArrayRecord: one UTF-8 document per
  record. An index (file, byte offset) is built once; documents are read
  lazily in ``__getitem__``, so a corpus larger than memory is fine.
* ``"mixture"``: ``cfg.mixture`` is a list of sub-configs, each a source config
  plus ``weight``; the result is ``grain.MapDataset.mix(sources, weights)``.

Top-level fields shared by all sources: ``tokenize_chunk_chars`` (characters
decoded and tokenized at once, ``tokenizer.TOKENIZE_CHUNK_CHARS`` by default),
``invalid_utf8="fail"`` (``"skip"``
drops undecodable documents, counts them and logs one warning line;
``"fail"`` raises naming the file, and the line for JSON Lines) and
``scan=None`` (validate every document at construction: a streaming pass in
constant memory; ``None`` means True for ``"files"`` and False for ``"tfds"``;
``invalid_utf8="skip"`` needs a scan). Without a scan, bad documents raise the
same one-line errors when they are read.

All errors are ``dlm.errors.UserError``s: one line naming the file (or
dataset) and the fix.
"""

from __future__ import annotations

import bisect
import codecs
import dataclasses
import glob as glob_lib
import json
import logging
import os
from typing import Any, Callable, Iterator, Mapping, Sequence

from array_record.python import array_record_module
import grain
import numpy as np

from dlm import errors
from dlm.data import corpora
from dlm.data import tokenizer as tokenizer_lib

SPLITS = ("train", "validation")
SOURCES = ("stdlib", "tfds", "files", "mixture")
FORMATS = ("text", "jsonl", "array_record")
INVALID_UTF8_POLICIES = ("skip", "fail")
DEFAULT_TFDS_SPLITS = {"train": "train", "validation": "validation"}
_GLOB_KEYS = {"train": "train_glob", "validation": "val_glob"}

_log = logging.getLogger(__name__)


@dataclasses.dataclass
class SourceStats:
  """What a source holds and what it dropped.

  Attributes:
    name: a short description (source kind and files/dataset).
    documents: number of documents the dataset yields (after skipping).
    skipped: documents dropped for invalid UTF-8 (invalid_utf8="skip").
    first_skipped: the file (or dataset record) of the first skipped document.
    children: per-component stats of a mixture.
  """
  name: str
  documents: int = 0
  skipped: int = 0
  first_skipped: str | None = None
  children: list[SourceStats] = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------- config --

def _get(cfg: Any, key: str, default: Any = None) -> Any:
  """``cfg[key]`` for a dict or ConfigDict, ``default`` when absent/None."""
  if cfg is None:
    return default
  value = cfg.get(key, default)
  return default if value is None else value


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(
        f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


def _policy(cfg: Any) -> str:
  policy = _get(cfg, "invalid_utf8", "fail")
  if policy not in INVALID_UTF8_POLICIES:
    raise errors.UserError(
        f"config.data.invalid_utf8={policy!r} is unknown; set it to 'skip' or"
        " 'fail'")
  return policy


def chunk_chars_of(cfg: Any) -> int:
  """``cfg.tokenize_chunk_chars`` (characters decoded/tokenized at once), checked."""
  return tokenizer_lib.check_chunk_chars(
      _get(cfg, "tokenize_chunk_chars", tokenizer_lib.TOKENIZE_CHUNK_CHARS))


def _scan(cfg: Any, default: bool, policy: str, what: str) -> bool:
  scan = bool(_get(cfg, "scan", default))
  if policy == "skip" and not scan:
    raise errors.UserError(
        f"{what}: invalid_utf8='skip' needs a scan at construction; set"
        " config.data.scan=True or invalid_utf8='fail'")
  return scan


# ----------------------------------------------------- generic data source --

class DocumentSource:
  """Random access to the documents of a record reader (picklable).

  ``reader`` has ``len()``, ``read(i) -> str`` (decodes record ``i``, raising a
  one-line error on bad input) and ``locate(i) -> str`` (file and line or
  record, for messages); ``keep`` optionally maps document index -> record
  index, after documents were skipped by a scan.
  """

  def __init__(self, reader: Any, keep: np.ndarray | None,
               stats: SourceStats):
    self._reader = reader
    self._keep = keep
    self.stats = stats
    self.stats.documents = len(self)

  def __len__(self) -> int:
    return len(self._reader) if self._keep is None else len(self._keep)

  def __getitem__(self, index: int) -> str | TextStream:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"document {index} out of range [0, {len(self)})")
    if self._keep is not None:
      index = int(self._keep[index])
    return self._reader.read(index)

  def __repr__(self) -> str:
    return f"DocumentSource({self.stats.name}, documents={len(self)})"


class _SkipError(Exception):
  """A document failed UTF-8 decoding under invalid_utf8="skip"."""


def _scan_records(reader: Any, stats: SourceStats) -> np.ndarray | None:
  """Reads every record once; returns the kept indices if any were skipped."""
  num_records = len(reader)
  skipped: list[int] = []
  for i in range(num_records):
    try:
      document = reader.read(i)
      if isinstance(document, TextStream):
        document.validate()
    except _SkipError:
      skipped.append(i)
      if stats.first_skipped is None:
        stats.first_skipped = reader.locate(i)
  stats.skipped = len(skipped)
  if not skipped:
    return None
  _log.warning("%s: skipped %d document(s) that are not valid UTF-8 (first:"
               " %s); set config.data.invalid_utf8='fail' to stop on them",
               stats.name, len(skipped), stats.first_skipped)
  mask = np.ones(num_records, dtype=bool)
  mask[skipped] = False
  return np.flatnonzero(mask).astype(np.int64)


def _utf8_error(where: str, byte: int, policy: str) -> Exception:
  """The error for invalid UTF-8 at ``byte`` of ``where`` under ``policy``."""
  if policy == "skip":
    return _SkipError(where)
  return errors.UserError(
      f"{where} is not valid UTF-8 (byte {byte}); fix the file or set"
      " config.data.invalid_utf8='skip'")


def _decode(data: bytes, where: str, policy: str) -> str:
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise _utf8_error(where, e.start, policy) from None


def _finish(reader: Any, scan: bool, stats: SourceStats,
            empty_fix: str) -> grain.MapDataset:
  keep = _scan_records(reader, stats) if scan else None
  source = DocumentSource(reader, keep, stats)
  if len(source) == 0:
    raise errors.UserError(f"{stats.name} has no documents; {empty_fix}")
  dataset = grain.MapDataset.source(source)
  dataset.stats = stats
  return dataset


# ----------------------------------------------------------------- stdlib --

def _stdlib_source(cfg: Any, split: str) -> grain.MapDataset:
  corpus = corpora.load_corpus(
      "stdlib", root=_get(cfg, "root"),
      val_permille=_get(cfg, "val_permille", corpora.DEFAULT_VAL_PERMILLE),
      invalid_utf8=_policy(cfg))
  docs = corpus.train if split == "train" else corpus.val
  stats = SourceStats(name=f"stdlib corpus at {corpus.meta['root']} ({split})",
                      documents=len(docs),
                      skipped=corpus.meta["skipped_files"])
  dataset = grain.MapDataset.source(docs)
  dataset.stats = stats
  return dataset


# ------------------------------------------------------------------- tfds --

def _tfds_data_source(name: str, tfds_split: str, data_dir: str | None
                      ) -> Sequence[Mapping[str, Any]]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  fix = (f"prepare it with `tfds build {name} --file_format=array_record"
         f"{f' --data_dir={data_dir}' if data_dir else ''}`")
  if data_dir is not None and not os.path.isdir(data_dir):
    raise FileNotFoundError(
        f"TFDS data_dir {data_dir!r} does not exist; set"
        f" config.data.tfds.data_dir to where {name!r} is prepared or {fix}")
  where = data_dir or "the default data_dir"
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise FileNotFoundError(
        f"TFDS dataset {name!r} not found under {where}; {fix}") from None
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"TFDS dataset {name!r} is not prepared under {where}; {fix}")
  try:
    return tfds.data_source(name, split=tfds_split, data_dir=data_dir,
                            download=False)
  except NotImplementedError as e:
    first = _first_line(e)
    raise FileNotFoundError(
        f"TFDS dataset {name!r} under {where} is not in ArrayRecord format"
        f" ({first}); {fix}") from None
  except ValueError as e:
    raise errors.UserError(
        f"TFDS dataset {name!r} split {tfds_split!r}: {_first_line(e)}; fix"
        " config.data.tfds.splits") from None


def _first_line(error: BaseException) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


class _TfdsRecords:
  """The text field of each record of a TFDS data source."""

  def __init__(self, records: Sequence[Mapping[str, Any]], field: str,
               where: str, policy: str):
    self.records, self.field = records, field
    self.where, self.policy = where, policy

  def __len__(self) -> int:
    return len(self.records)

  def locate(self, i: int) -> str:
    return f"{self.where} record {i}"

  def read(self, i: int) -> str:
    value = self.records[i][self.field]
    if isinstance(value, np.ndarray):
      value = value.item()
    if isinstance(value, str):
      return value
    return _decode(bytes(value), self.locate(i), self.policy)


def _tfds_source(cfg: Any, split: str) -> grain.MapDataset:
  tcfg = _get(cfg, "tfds")
  name = _get(tcfg, "name")
  if not name:
    raise errors.UserError("config.data.tfds.name is not set; set it to a TFDS"
                     " dataset name prepared as ArrayRecord, e.g. 'dlm_stdlib'")
  data_dir = _get(tcfg, "data_dir")
  data_dir = None if data_dir is None else os.path.expanduser(str(data_dir))
  if name.split("/")[0] == "dlm_stdlib":
    from dlm.data import tfds_stdlib  # pylint: disable=g-import-not-at-top
    data_dir = tfds_stdlib.prepare_stdlib_tfds(data_dir)
  splits = dict(DEFAULT_TFDS_SPLITS)
  splits.update(dict(_get(tcfg, "splits", {})))
  field = _get(tcfg, "text_field", "text")
  records = _tfds_data_source(name, splits[split], data_dir)
  where = f"TFDS {name}[{splits[split]}] in {data_dir or 'default data_dir'}"
  features = records.dataset_info.features
  if field not in features.keys():
    raise errors.UserError(
        f"{where} has no field {field!r} (fields:"
        f" {', '.join(features.keys())}); set config.data.tfds.text_field")
  policy = _policy(cfg)
  return _finish(_TfdsRecords(records, field, where, policy),
                 _scan(cfg, False, policy, where), SourceStats(name=where),
                 "fix config.data.tfds.splits or re-prepare the dataset")



# ------------------------------------------------------------------ files --

def _format_of(path: str, fmt: str | None) -> str:
  if fmt is not None:
    if fmt not in FORMATS:
      raise errors.UserError(
          f"config.data.files.format={fmt!r} is unknown; use one of"
          f" {', '.join(FORMATS)} or None to infer it from the extension")
    return fmt
  if path.endswith(".jsonl"):
    return "jsonl"
  if path.endswith(".array_record") or ".array_record-" in path:
    return "array_record"
  return "text"


def _glob(cfg: Any, split: str) -> list[str]:
  key = _GLOB_KEYS[split]
  pattern = _get(_get(cfg, "files"), key)
  if not pattern:
    raise errors.UserError(f"config.data.files.{key} is not set; set it to a glob of"
                     " .txt, .jsonl or .array_record files")
  pattern = os.path.expanduser(str(pattern))
  paths = sorted(p for p in glob_lib.glob(pattern, recursive=True)
                 if os.path.isfile(p))
  if not paths:
    raise FileNotFoundError(
        f"no files match {pattern}; fix config.data.files.{key}")
  return paths


class TextStream:
  """A text file too long for one str: its text in pieces, decoded on demand.

  ``pieces()`` reads ``chunk_chars`` bytes at a time through an incremental
  UTF-8 decoder, so memory stays near ``chunk_chars`` whatever the file's (or
  its lines') length; ``tokenizer.Tokenizer.encode_chunks`` takes the pieces.
  Picklable (a path and two settings), so it crosses to grain workers.
  """

  def __init__(self, path: str, policy: str, chunk_chars: int):
    self.path, self.policy, self.chunk_chars = path, policy, chunk_chars

  def __repr__(self) -> str:
    return f"TextStream({self.path!r})"

  def _pieces(self, policy: str) -> Iterator[str]:
    """Decoded pieces; invalid UTF-8 raises ``_utf8_error`` at its file byte."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    start = 0  # File offset of the decoder's pending bytes.
    with open(self.path, "rb") as f:
      while True:
        block = f.read(self.chunk_chars)
        pending = len(decoder.getstate()[0])
        try:
          text = decoder.decode(block, final=not block)
        except UnicodeDecodeError as e:
          raise _utf8_error(self.path, start - pending + e.start,
                            policy) from None
        start += len(block)
        if text:
          yield text
        if not block:
          return

  def pieces(self) -> Iterator[str]:
    """The text in consecutive pieces of at most ``chunk_chars`` characters.

    Invalid UTF-8 raises a UserError naming the file and byte (also under
    invalid_utf8="skip": the file changed after the scan).
    """
    return self._pieces("fail")

  def head(self, num_chars: int) -> str:
    """The first ``num_chars`` characters (reads no further than needed)."""
    parts, total = [], 0
    for piece in self.pieces():
      if total >= num_chars:
        break
      parts.append(piece[:num_chars - total])
      total += len(parts[-1])
    return "".join(parts)

  def validate(self) -> None:
    """Decodes the whole file once in pieces; raises as ``read`` would."""
    for _ in self._pieces(self.policy):
      pass


def document_pieces(document: str | TextStream, chunk_chars: int
                    ) -> Iterator[str]:
  """Consecutive pieces of a document's text, at most ``chunk_chars`` each."""
  if isinstance(document, TextStream):
    yield from document.pieces()
    return
  for start in range(0, len(document), chunk_chars):
    yield document[start:start + chunk_chars]


def document_head(document: str | TextStream, num_chars: int) -> str:
  """The first ``num_chars`` characters of a document (str or TextStream)."""
  if isinstance(document, TextStream):
    return document.head(num_chars)
  return document[:num_chars]


class _TextFiles:
  """One document per file; files over ``chunk_chars`` bytes as TextStreams."""

  def __init__(self, paths: list[str], policy: str, chunk_chars: int):
    self.paths, self.policy, self.chunk_chars = paths, policy, chunk_chars

  def __len__(self) -> int:
    return len(self.paths)

  def locate(self, i: int) -> str:
    return self.paths[i]

  def read(self, i: int) -> str | TextStream:
    path = self.paths[i]
    if os.path.getsize(path) > self.chunk_chars:
      return TextStream(path, self.policy, self.chunk_chars)
    with open(path, "rb") as f:
      return _decode(f.read(), path, self.policy)


def _nonblank_lines(path: str, block_bytes: int = 1 << 20
                    ) -> Iterator[tuple[int, int]]:
  """(byte offset, line number) of each non-blank b"\\n" line of ``path``.

  Reads ``block_bytes`` at a time, so a line of any length costs one block.
  """
  line_offset, line_no, blank, position = 0, 1, True, 0
  with open(path, "rb") as f:
    while block := f.read(block_bytes):
      start = 0
      while True:
        newline = block.find(b"\n", start)
        end = len(block) if newline < 0 else newline
        blank = blank and not block[start:end].strip()
        if newline < 0:
          break
        if not blank:
          yield line_offset, line_no
        line_no, line_offset, blank = line_no + 1, position + newline + 1, True
        start = newline + 1
      position += len(block)
  if not blank:
    yield line_offset, line_no


class _JsonlFiles:
  """One document per non-blank line; index = (file, byte offset, line)."""

  def __init__(self, paths: list[str], field: str, policy: str):
    self.paths, self.field, self.policy = paths, field, policy
    file_ids, offsets, lines = [], [], []
    for file_id, path in enumerate(paths):
      for offset, line_no in _nonblank_lines(path):
        file_ids.append(file_id)
        offsets.append(offset)
        lines.append(line_no)
    self.file_ids = np.asarray(file_ids, dtype=np.int32)
    self.offsets = np.asarray(offsets, dtype=np.int64)
    self.lines = np.asarray(lines, dtype=np.int64)

  def __len__(self) -> int:
    return len(self.offsets)

  def locate(self, i: int) -> str:
    return f"{self.paths[self.file_ids[i]]}:{self.lines[i]}"

  def read(self, i: int) -> str:
    where = self.locate(i)
    with open(self.paths[self.file_ids[i]], "rb") as f:
      f.seek(int(self.offsets[i]))
      raw = f.readline()
    text = _decode(raw, where, self.policy)
    try:
      record = json.loads(text)
    except json.JSONDecodeError as e:
      raise errors.UserError(f"{where} is not valid JSON ({e.msg}); fix the line or"
                       " drop it from the file") from None
    if not isinstance(record, dict) or self.field not in record:
      raise errors.UserError(f"{where} has no field {self.field!r}; set"
                       " config.data.files.jsonl_field")
    value = record[self.field]
    if not isinstance(value, str):
      raise errors.UserError(f"{where} field {self.field!r} is a"
                       f" {type(value).__name__}, not a string; set"
                       " config.data.files.jsonl_field to a text field")
    return value


class _ArrayRecordFiles:
  """One UTF-8 document per record, via grain's ArrayRecordDataSource."""

  def __init__(self, paths: list[str], policy: str):
    self.paths, self.policy = paths, policy
    counts = [self._count(p) for p in paths]
    self.ends = list(np.cumsum(counts))
    self.records = grain.sources.ArrayRecordDataSource(paths)

  @staticmethod
  def _count(path: str) -> int:
    try:
      reader = array_record_module.ArrayRecordReader(path)
    except Exception as e:  # pylint: disable=broad-except
      raise errors.UserError(f"{path} is not a readable ArrayRecord file"
                       f" ({_first_line(e)});"
                       " rewrite it with ArrayRecordWriter or fix"
                       " config.data.files.format") from None
    try:
      return reader.num_records()
    finally:
      reader.close()

  def __len__(self) -> int:
    return len(self.records)

  def locate(self, i: int) -> str:
    file_id = bisect.bisect_right(self.ends, i)
    start = 0 if file_id == 0 else int(self.ends[file_id - 1])
    return f"{self.paths[file_id]} record {i - start}"

  def read(self, i: int) -> str:
    return _decode(self.records[i], self.locate(i), self.policy)


class _Concat:
  """Concatenation of per-format readers (a glob may mix extensions)."""

  def __init__(self, parts: list[Any]):
    self.parts = parts
    self.ends = list(np.cumsum([len(p) for p in parts]))

  def __len__(self) -> int:
    return int(self.ends[-1]) if self.ends else 0

  def _part(self, i: int) -> tuple[Any, int]:
    k = bisect.bisect_right(self.ends, i)
    return self.parts[k], i - (0 if k == 0 else int(self.ends[k - 1]))

  def locate(self, i: int) -> str:
    part, j = self._part(i)
    return part.locate(j)

  def read(self, i: int) -> str:
    part, j = self._part(i)
    return part.read(j)


def _files_source(cfg: Any, split: str) -> grain.MapDataset:
  fcfg = _get(cfg, "files")
  paths = _glob(cfg, split)
  fmt = _get(fcfg, "format")
  policy = _policy(cfg)
  chunk_chars = chunk_chars_of(cfg)
  by_format: dict[str, list[str]] = {}
  for path in paths:
    by_format.setdefault(_format_of(path, fmt), []).append(path)
  parts = []
  for kind, group in sorted(by_format.items()):
    if kind == "text":
      parts.append(_TextFiles(group, policy, chunk_chars))
    elif kind == "jsonl":
      parts.append(_JsonlFiles(group, _get(fcfg, "jsonl_field", "text"),
                               policy))
    else:
      parts.append(_ArrayRecordFiles(group, policy))
  reader = _Concat(parts)
  key = _GLOB_KEYS[split]
  name = (f"files {_get(fcfg, key)} ({len(paths)} file(s), first"
          f" {paths[0]})")
  what = f"files {_get(fcfg, key)}"
  return _finish(reader, _scan(cfg, True, policy, what),
                 SourceStats(name=name),
                 f"add documents to {paths[0]} or fix config.data.files.{key}")


# ---------------------------------------------------------------- mixture --

def _mixture_source(cfg: Any, split: str) -> grain.MapDataset:
  components = list(_get(cfg, "mixture", []))
  if not components:
    raise errors.UserError("config.data.mixture is empty; give a list of source"
                     " configs, each with a positive 'weight'")
  datasets, weights, children = [], [], []
  for i, sub in enumerate(components):
    weight = _get(sub, "weight")
    if weight is None or float(weight) <= 0:
      raise errors.UserError(f"config.data.mixture[{i}].weight={weight!r} must be a"
                       " positive number; set it")
    if _get(sub, "source") == "mixture":
      raise errors.UserError(f"config.data.mixture[{i}] is itself a mixture; flatten"
                       " it into config.data.mixture")
    dataset = make_source(sub, split)
    datasets.append(dataset)
    weights.append(float(weight))
    children.append(source_stats(dataset))
  mixed = grain.MapDataset.mix(datasets, weights)
  mixed.stats = SourceStats(
      name=f"mixture of {len(datasets)} ({split})", documents=len(mixed),
      skipped=sum(c.skipped for c in children),
      first_skipped=next((c.first_skipped for c in children
                          if c.first_skipped), None),
      children=children)
  return mixed


# ------------------------------------------------------------------- API --

_BUILDERS: dict[str, Callable[[Any, str], grain.MapDataset]] = {
    "stdlib": _stdlib_source,
    "tfds": _tfds_source,
    "files": _files_source,
    "mixture": _mixture_source,
}


def make_source(cfg: Any, split: str) -> grain.MapDataset:
  """A ``grain.MapDataset`` of ``str`` documents for ``split``.

  Args:
    cfg: the data config (``ml_collections.ConfigDict`` or dict); see the
      module docstring for its fields.
    split: "train" or "validation".

  Returns:
    The dataset; ``source_stats(dataset)`` (also ``dataset.stats``) gives
    its SourceStats (document count, skipped invalid-UTF-8 documents).
  """
  _check_split(split)
  kind = _get(cfg, "source", "stdlib")
  if kind not in _BUILDERS:
    raise errors.UserError(f"config.data.source={kind!r} is unknown; use one of"
                     f" {', '.join(SOURCES)}")
  return _BUILDERS[kind](cfg, split)


def source_stats(dataset: grain.MapDataset) -> SourceStats:
  """The SourceStats of a dataset returned by ``make_source``."""
  stats = getattr(dataset, "stats", None)
  if stats is None:
    raise errors.UserError("dataset has no stats; call source_stats on the dataset"
                     " make_source returned, before any .map/.filter")
  return stats


def iter_documents(dataset: grain.MapDataset) -> Iterator[str | TextStream]:
  """All documents in order (for small datasets and tests)."""
  for i in range(len(dataset)):
    yield dataset[i]
