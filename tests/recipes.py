"""Helpers the recipe tests share: the `dlm` command in a subprocess, and SIGKILL-then-resume."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def env(pythonpath: str = "") -> dict[str, str]:
  return dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu",
              PYTHONPATH=os.pathsep.join(filter(None, [pythonpath, os.environ.get("PYTHONPATH")])))


def dlm(*args: str, check: bool = True, pythonpath: str = "") -> subprocess.CompletedProcess:
  r = subprocess.run([sys.executable, "-m", "dlm.main", *args], capture_output=True, text=True,
                     env=env(pythonpath), cwd=ROOT, timeout=600)
  if check:
    assert r.returncode == 0, r.stderr[-3000:]
  return r


def killed_then_resumed_is_exact(args: list[str], tmp_path: pathlib.Path, steps: int, *,
                                 kill_after: int | None = None,
                                 resume_args: list[str] | None = None,
                                 seed_data: bool = False) -> dict:
  """Runs ``dlm train *args`` whole in a/, and in b/ SIGKILLed after its first checkpoint (or
  after checkpoint ``kill_after``) then resumed (``resume_args``, default ``args``); asserts
  step ``steps`` of both is bit-identical (state and data iterator) and returns its data state.
  ``seed_data``: b/ starts with a/'s tokenizer and token cache (no second tokenizer training)."""
  import test_resilience as res
  dlm("train", *args, f"--workdir={tmp_path / 'a'}")
  if seed_data:
    res.seeded(tmp_path / "b", tmp_path / "a")
  proc = subprocess.Popen([sys.executable, "-m", "dlm.main", "train", *args,
                           f"--workdir={tmp_path / 'b'}"], env=env(), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpts = tmp_path / "b" / "checkpoints"
  t0 = time.time()
  while not (ckpts / str(kill_after)).is_dir() if kill_after else not any(
      c.name.isdigit() for c in ckpts.glob("*")):
    assert time.time() - t0 < 120 and proc.poll() is None, "finished before it could be killed"
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert 0 < (res.checkpoint._reader(tmp_path / "b").latest_step() or 0) < steps
  r = dlm("train", *(resume_args or args), f"--workdir={tmp_path / 'b'}")
  assert "resumed from" in r.stdout
  _, state_a, data_a = res.saved(tmp_path / "a", steps)
  _, state_b, data_b = res.saved(tmp_path / "b", steps)
  assert data_a == data_b
  for a, b in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
    np.testing.assert_array_equal(a, b)
  return data_a
