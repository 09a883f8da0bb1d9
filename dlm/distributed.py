"""Multi-controller JAX: one process per host, joined through ``jax.distributed``.

Three ways in, in this order:
  1. explicit flags or environment (GPU and CPU clusters, ``launch/local.sh``):
     coordinator address, number of processes, this process's id;
  2. ``auto``: JAX's own cluster detection (Cloud TPU pods, SLURM, ...);
  3. nothing: a single process.
A dead peer stops the survivors: the coordination service misses its
heartbeats for ``heartbeat_timeout_s`` and fails every process's pending work,
and ``watchdog`` turns a step that blocks longer than that into an exit.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import jax

ENV_COORDINATOR = "DLM_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "DLM_NUM_PROCESSES"
ENV_PROCESS_ID = "DLM_PROCESS_ID"
ENV_HEARTBEAT = "DLM_HEARTBEAT_TIMEOUT_S"  # seconds without a peer's heartbeat before failing


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, auto: bool = False,
               heartbeat_timeout_s: int | None = None) -> bool:
  """Joins the job if one is configured; returns whether this is a multi-process run.
  ``heartbeat_timeout_s``: None reads DLM_HEARTBEAT_TIMEOUT_S (default 20 s)."""
  if heartbeat_timeout_s is None:
    raw = os.environ.get(ENV_HEARTBEAT, "20")
    if not raw.isdigit() or int(raw) < 1:
      raise ValueError(f"{ENV_HEARTBEAT}={raw!r} must be a whole number of seconds >= 1")
    heartbeat_timeout_s = int(raw)
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR)
  if num_processes is None and os.environ.get(ENV_NUM_PROCESSES):
    num_processes = int(os.environ[ENV_NUM_PROCESSES])
  if process_id is None and os.environ.get(ENV_PROCESS_ID):
    process_id = int(os.environ[ENV_PROCESS_ID])
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError(
          "a coordinator address needs --num_processes and --process_id (or "
          f"{ENV_NUM_PROCESSES} and {ENV_PROCESS_ID})")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               heartbeat_timeout_seconds=heartbeat_timeout_s,
                               initialization_timeout=120)
  elif auto:
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s)
  else:
    return False
  return jax.process_count() > 1


def barrier(name: str) -> None:
  """All processes reach this point (a no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


class Watchdog:
  """Exits the process if ``kick()`` is not called for ``timeout_s`` (a peer died mid-step).

  Collectives over a dead peer can block forever; the heartbeat error then
  never reaches Python.  The watchdog makes that a clear error and exit 1.
  """

  def __init__(self, timeout_s: float, what: str = "training step"):
    self.timeout_s, self.what = timeout_s, what
    self._last = time.monotonic()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def start(self) -> None:
    if self.timeout_s > 0 and not self._thread.is_alive():
      self._last = time.monotonic()
      self._thread.start()

  def stop(self) -> None:
    self._stop.set()

  def kick(self) -> None:
    self._last = time.monotonic()

  def _run(self) -> None:
    while not self._stop.wait(1.0):
      idle = time.monotonic() - self._last
      if idle > self.timeout_s:
        print(f"dlm: error: no {self.what} finished for {idle:.0f} s on process"
              f" {jax.process_index()} of {jax.process_count()}: a peer process has probably died;"
              " exiting (restart the job: it resumes from the last checkpoint)",
              file=sys.stderr, flush=True)
        os._exit(1)
