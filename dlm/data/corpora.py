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
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import platform
import sysconfig
import zlib
from typing import Any

KNOWN_SOURCES = ("stdlib",)
DEFAULT_VAL_PERMILLE = 50
# Any path component with one of these names excludes the file.
EXCLUDED_DIRS = frozenset({
    "site-packages", "dist-packages", "test", "tests", "idle_test",
    "__pycache__"})


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


def _read_utf8(path: pathlib.Path) -> str | None:
  """File text, or None if it is not valid UTF-8.

  Read as bytes and decoded without newline translation so the text (and its
  byte count) is exactly the file's content.
  """
  try:
    return path.read_bytes().decode("utf-8")
  except UnicodeDecodeError:
    return None


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
                val_permille: int = DEFAULT_VAL_PERMILLE) -> Corpus:
  """Loads a corpus and splits it into train/val documents by file.

  Args:
    source: corpus name; only "stdlib" is known.
    root: directory to read instead of the stdlib (same rules); for tests.
    val_permille: the split threshold, see the module docstring.

  Returns:
    The Corpus. Raises ValueError if either split ends up empty.
  """
  root = _resolve_root(source, root)
  _check_val_permille(val_permille)
  train, val = [], []
  train_bytes = val_bytes = skipped = 0
  for path in python_files(root):
    text = _read_utf8(path)
    if text is None:
      skipped += 1
      continue
    nbytes = len(text.encode("utf-8"))
    if is_val(path.relative_to(root).as_posix(), val_permille):
      val.append(text)
      val_bytes += nbytes
    else:
      train.append(text)
      train_bytes += nbytes
  if not train or not val:
    raise ValueError(
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
