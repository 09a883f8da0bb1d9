"""A new output folder written whole or not at all: staged under a hidden sibling, renamed in.

`dlm convert` and `dlm export` write folders nobody else may write at the same
time.  Each writes into ``.NAME.<verb>-PID`` (private to the process) and renames
it onto ``NAME`` only if that is still absent or empty, so two writers never mix
their files (the later one refuses), and a failure or a kill leaves ``NAME`` as it
was.  A lock file would outlive the command inside the output; the rename needs none.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import shutil
from typing import Iterator

from dlm.errors import UserError


def check_new(path: pathlib.Path, flag: str, verb: str) -> None:
  """Refuses an existing file or non-empty folder at ``path`` (nothing is ever overwritten)."""
  if path.exists() and not path.is_dir():
    raise UserError(f"{flag}={path} is a file; {verb} into a new folder")
  if path.exists() and any(path.iterdir()):
    raise UserError(f"{flag}={path} is not empty; {verb} into a new folder (nothing is"
                    " overwritten)")


def _missing_parents(path: pathlib.Path) -> list[pathlib.Path]:
  """The folders above ``path`` that do not exist yet, nearest first."""
  out = []
  for parent in path.absolute().parents:
    if parent.exists():
      break
    out.append(parent)
  return out


@contextlib.contextmanager
def staged(path: str | os.PathLike, flag: str, verb: str) -> Iterator[pathlib.Path]:
  """Yields a private staging folder; on success it becomes ``path`` by one ``rename``."""
  path = pathlib.Path(path)
  check_new(path, flag, verb)
  created = _missing_parents(path)
  stage, made = path.parent / f".{path.name}.{verb}ing-{os.getpid()}", False
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    stage.mkdir()
    made = True
    yield stage
    taken = UserError(f"{flag}={path} was written by another process meanwhile; {verb} into a"
                      " new folder (nothing is overwritten)")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
      raise taken
    try:
      os.rename(stage, path)  # onto an absent or empty folder only: atomic against a racer
    except OSError as e:
      if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
        raise taken from None
      raise
  except BaseException as e:
    if made:
      shutil.rmtree(stage, ignore_errors=True)
    for parent in created:
      try:
        parent.rmdir()
      except OSError:
        break
    if isinstance(e, OSError):
      raise UserError(f"could not write {path} ({e.strerror or e}); check the disk and its"
                      " permissions, then retry") from None
    raise
