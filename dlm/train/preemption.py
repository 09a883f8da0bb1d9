"""Stop requests: SIGTERM / SIGINT make training save at the next step boundary and exit 0.

One process: a Python signal handler sets a flag that the loop reads after each
step.  Several processes (a TPU pod, ``launch/local.sh``): JAX's preemption
sync point, which the coordination service drives: a SIGTERM to any process
(the TPU maintenance notice, a scheduler's preemption, ``kill``) makes every
process report the same step, so all hosts save the same checkpoint.  SIGINT
is turned into that SIGTERM.  A second signal while stopping aborts at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

import jax


class StopRequest:
  """Context manager; ``stop_at(step)`` is True at the step boundary where training should stop."""

  def __init__(self) -> None:
    self.signal_name: str | None = None
    self._previous: dict[int, Any] = {}
    self._sync_point = jax.process_count() > 1

  def __enter__(self) -> "StopRequest":
    if threading.current_thread() is not threading.main_thread():
      return self  # signals are only delivered to the main thread
    signals = (signal.SIGINT,) if self._sync_point else (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc: Any) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum: int, frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    if self.signal_name is not None:  # the second signal: do not wait for the step
      print(f"\n{name} again: exiting without saving", file=sys.stderr, flush=True)
      os._exit(128 + signum)
    self.signal_name = name
    print(f"\n{name}: saving at the next step boundary, then exiting"
          f" ({name} again to exit without saving)", file=sys.stderr, flush=True)
    if self._sync_point:  # hand it to JAX's preemption notifier, which tells every process
      os.kill(os.getpid(), signal.SIGTERM)

  def stop_at(self, step: int) -> bool:
    if self._sync_point:
      from jax.experimental import multihost_utils
      if multihost_utils.reached_preemption_sync_point(step):
        self.signal_name = self.signal_name or "SIGTERM"
        return True
      return False
    return self.signal_name is not None
