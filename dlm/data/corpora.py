"""Embedded text corpora that need no download.

The quickstart corpus is the Python standard library's own ``.py`` sources on
this machine (``sysconfig.get_paths()["stdlib"]``, about 12 MB on CPython
3.11). Site-packages, test folders and ``__pycache__`` are left out.

Train/validation split, by file and fixed: a file is validation iff

  zlib.crc32(relative_posix_path.encode()) % 1000 < val_permille

where ``relative_posix_path`` is the path relative to the corpus root with
``/`` separators (e.g. ``"json/decoder.py"``). The rule depends only on the
path, so it is the same on every machine and run, and adding or removing a file
never moves any other file across the split. ``val_permille=50`` puts about 5%
of the files in validation.

Files that are not valid UTF-8: ``load_corpus(invalid_utf8="skip")`` (the
default of the function) leaves them out, counts them in
``meta["skipped_files"]`` and logs one warning line; ``"fail"`` (what the
trainer passes from ``config.data.invalid_utf8``, "fail" by default) raises a
UserError naming the file and the fix.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import platform
import sysconfig
import zlib
from typing import Any

from dlm import errors

KNOWN_SOURCES = ("stdlib",)
INVALID_UTF8_POLICIES = ("skip", "fail")
DEFAULT_VAL_PERMILLE = 50
# Any path component with one of these names excludes the file.
EXCLUDED_DIRS = frozenset({
    "site-packages", "dist-packages", "test", "tests", "idle_test",
    "__pycache__"})

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Documents of one corpus, split by file.

  Attributes:
    train: training document texts, in sorted relative-path order.
    val: validation document texts, in sorted relative-path order.
    meta: provenance and sizes (python version, root, file/byte counts per
      split, number of files skipped for not being valid UTF-8).
  """
  train: list[str]
  val: list[str]
  meta: dict[str, Any]


def stdlib_root() -> pathlib.Path:
  """The directory of this interpreter's standard library sources."""
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def _is_excluded(rel_parts: tuple[str, ...]) -> bool:
  return any(part in EXCLUDED_DIRS for part in rel_parts)


def python_files(root: str | os.PathLike[str]) -> list[pathlib.Path]:
  """All ``.py`` files under ``root`` except excluded dirs, sorted by rel path."""
  root = pathlib.Path(root)
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    # Prune excluded directories so site-packages is never walked.
    dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
    for name in filenames:
      if name.endswith(".py"):
        found.append(pathlib.Path(dirpath) / name)
  found = [p for p in found if not _is_excluded(p.relative_to(root).parts)]
  return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def stdlib_files() -> list[pathlib.Path]:
  """All stdlib ``.py`` sources (no site-packages/tests), sorted by rel path."""
  return python_files(stdlib_root())


def is_val(relative_posix_path: str, val_permille: int) -> bool:
  """The fixed split rule: crc32 of the relative posix path, mod 1000."""
  return zlib.crc32(relative_posix_path.encode("utf-8")) % 1000 < val_permille


def _read_utf8(path: pathlib.Path) -> tuple[str, int] | None:
  """(file text, its byte count), or None if it is not valid UTF-8.

  Read as bytes and decoded without newline translation so the text (and its
  byte count) is exactly the file's content; the bytes are not re-encoded.
  """
  data = path.read_bytes()
  try:
    return data.decode("utf-8"), len(data)
  except UnicodeDecodeError:
    return None


def _not_utf8_error(path: pathlib.Path) -> errors.UserError:
  """The one-line error for a non-UTF-8 file under invalid_utf8="fail"."""
  return errors.UserError(
      f"{path} is not valid UTF-8; fix or remove the file, or set"
      " config.data.invalid_utf8='skip' to leave it out (counted, one warning)")


def _check_policy(invalid_utf8: str) -> None:
  if invalid_utf8 not in INVALID_UTF8_POLICIES:
    raise errors.UserError(
        f"config.data.invalid_utf8={invalid_utf8!r} is unknown; set it to"
        " 'skip' or 'fail'")


def _check_val_permille(val_permille: int) -> None:
  if not 0 < val_permille < 1000:
    raise ValueError(
        f"val_permille={val_permille} must be in 1..999 so both splits are"
        " non-empty; use e.g. 50 for 5% validation")


def _resolve_root(source: str, root: str | os.PathLike[str] | None
                  ) -> pathlib.Path:
  if source not in KNOWN_SOURCES:
    raise ValueError(
        f"unknown corpus source {source!r}; known: {', '.join(KNOWN_SOURCES)}")
  root = stdlib_root() if root is None else pathlib.Path(root)
  if not root.is_dir():
    raise FileNotFoundError(
        f"corpus root {str(root)!r} is not a directory; pass root=None for the"
        " stdlib or an existing directory of .py files")
  return root


def load_corpus(source: str = "stdlib", *,
                root: str | os.PathLike[str] | None = None,
                val_permille: int = DEFAULT_VAL_PERMILLE,
                invalid_utf8: str = "skip") -> Corpus:
  """Loads a corpus and splits it into train/val documents by file.

  Args:
    source: corpus name; only "stdlib" is known.
    root: directory to read instead of the stdlib (same rules); for tests.
    val_permille: the split threshold, see the module docstring.
    invalid_utf8: "skip" leaves non-UTF-8 files out (counted in
      ``meta["skipped_files"]``, one warning line); "fail" raises a UserError
      naming the first one. The trainer passes ``config.data.invalid_utf8``.

  Returns:
    The Corpus. Raises ValueError if either split ends up empty.
  """
  root = _resolve_root(source, root)
  _check_val_permille(val_permille)
  _check_policy(invalid_utf8)
  train, val = [], []
  train_bytes = val_bytes = skipped = 0
  first_skipped = None
  for path in python_files(root):
    read = _read_utf8(path)
    if read is None:
      if invalid_utf8 == "fail":
        raise _not_utf8_error(path)
      skipped += 1
      first_skipped = first_skipped or path
      continue
    text, nbytes = read
    if is_val(path.relative_to(root).as_posix(), val_permille):
      val.append(text)
      val_bytes += nbytes
    else:
      train.append(text)
      train_bytes += nbytes
  if skipped:
    _log.warning("corpus at %s: skipped %d file(s) that are not valid UTF-8"
                 " (first: %s); set config.data.invalid_utf8='fail' to stop"
                 " on them", root, skipped, first_skipped)
  if not train or not val:
    raise errors.UserError(
        f"corpus at {str(root)!r} has {len(train)} train and {len(val)} val"
        f" .py files (skipped {skipped} non-UTF-8); point root at a directory"
        " with more .py files outside test folders or change val_permille")
  meta = {
      "source": source,
      "python_version": platform.python_version(),
      "root": str(root),
      "val_permille": val_permille,
      "train_files": len(train),
      "val_files": len(val),
      "train_bytes": train_bytes,
      "val_bytes": val_bytes,
      "skipped_files": skipped,
  }
  return Corpus(train=train, val=val, meta=meta)
