"""One writer per workdir: an exclusive ``flock`` on ``WORKDIR/.dlm.lock`` naming pid, host and command.

The kernel drops a ``flock`` when its process dies (SIGKILL, OOM, power loss of
a local disk), so a lock file whose lock is free is stale: it is taken over with
a warning naming the process that left it.  A held lock is refused in one line.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import pathlib
import socket
import sys
import warnings
from typing import Iterator

from dlm.errors import UserError

LOCK_FILE = ".dlm.lock"


class StaleLockWarning(UserWarning):
  """The lock file of a process that is gone was taken over."""


def _holder(text: str) -> dict:
  try:
    info = json.loads(text)
    return info if isinstance(info, dict) else {}
  except ValueError:
    return {}


def _describe(info: dict) -> str:
  return (f"pid {info.get('pid', '?')} on host {info.get('host', '?')}"
          f" ({info.get('command', '?')}, since {info.get('since', '?')})")


def _alive_here(info: dict) -> bool:
  if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
    return False
  try:
    os.kill(info["pid"], 0)
    return True
  except ProcessLookupError:
    return False
  except PermissionError:
    return True


@contextlib.contextmanager
def hold(workdir: str | os.PathLike, command: str) -> Iterator[pathlib.Path]:
  """Holds ``workdir``'s writer lock for the ``with`` body (``workdir`` must exist).

  Raises ``UserError`` when another live process holds it.
  """
  path = pathlib.Path(workdir) / LOCK_FILE
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise UserError(f"cannot create the lock file {path} ({e.strerror}); {workdir} must be a"
                    " writable directory: fix its permissions or pick another --workdir") from None
  f = os.fdopen(fd, "r+")
  try:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      info = _holder(f.read())
      raise UserError(f"{workdir} is being written by {_describe(info)}; wait for it to finish,"
                      " stop it, or use another --workdir") from None
    except OSError as e:  # a file system without locks
      raise UserError(f"cannot lock {path} ({e.strerror}); put the workdir on a file system"
                      " with flock support") from None
    old = _holder(f.read())
    if old.get("pid") not in (None, os.getpid()):
      if _alive_here(old):  # flock free while its process lives: a lock lost by the file system
        raise UserError(f"{workdir} is being written by {_describe(old)} (its lock file was"
                        " replaced); stop it or use another --workdir")
      warnings.warn(f"took over the stale lock of {_describe(old)} on {workdir}: that process is"
                    " gone", StaleLockWarning, stacklevel=3)
    f.seek(0)
    f.truncate()
    f.write(json.dumps({
        "pid": os.getpid(), "host": socket.gethostname(), "command": command,
        "argv": sys.argv[1:8],
        "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}))
    f.flush()
    try:
      yield path
    finally:
      f.seek(0)
      f.truncate()  # released: an empty file is a free lock (kept: another may hold it already)
      f.flush()
  finally:
    f.close()  # releases the flock


def is_held(workdir: str | os.PathLike) -> bool:
  """Whether a live process holds ``workdir``'s writer lock (readers use this before moving files)."""
  path = pathlib.Path(workdir) / LOCK_FILE
  if not path.exists():
    return False
  try:
    with open(path) as f:
      try:
        fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
      except BlockingIOError:
        return True
      fcntl.flock(f, fcntl.LOCK_UN)
      return False
  except OSError:
    return True  # cannot tell: behave as if a writer were there
