"""Real multi-process JAX on 127.0.0.1: 2 processes x 4 CPU devices == 1 process x 8 devices
(diffu-GRPO on the one training loop: process 0 trains the tokenizer while the other waits,
each process reads its slice of every global batch, one checkpoint and one log are written);
peer death, SIGTERM and the hang watchdog."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from dlm.models.loader import load as load_run

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = [sys.executable, "-m", "dlm.main", "train", f"--config={ROOT}/configs/quickstart.py:smoke",
         "--config.train.log_every=1", "--config.train.eval_every=5"]


# the stdlib's email package: the peers' tokenizer and token cache in a second, not ~4 s
EMAIL = str(pathlib.Path(__import__("sysconfig").get_paths()["stdlib"]) / "email")


def _env(devices: int, **extra: str) -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_pair(workdir: pathlib.Path, stdout: int) -> list[subprocess.Popen]:
  """Two processes x 4 devices training (practically) forever in ``workdir``."""
  port = _free_port()
  return [subprocess.Popen(
      TRAIN + [f"--workdir={workdir}", "--config.train.steps=100000",
               "--config.train.eval_every=100000", "--config.train.checkpoint_every=100000",
               f"--config.data.root={EMAIL}", "--config.data.val_permille=200"],
      env=_env(4, DLM_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", DLM_NUM_PROCESSES="2",
               DLM_PROCESS_ID=str(i), DLM_HEARTBEAT_TIMEOUT_S="5"),
      cwd=ROOT, stdout=stdout, stderr=subprocess.PIPE, text=True) for i in range(2)]


def _wait_for_lines(workdir: pathlib.Path, procs: list[subprocess.Popen], n: int) -> None:
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 240
  while not metrics.exists() or len(metrics.read_text().splitlines()) < n:
    assert time.time() < deadline and all(p.poll() is None for p in procs)
    time.sleep(0.2)


def test_grpo_two_processes_match_one_on_an_8_device_mesh(tmp_path):
  """diffu-GRPO sharded like training: rollouts through the engine on a data x fsdp x tensor
  mesh, each process sampling and scoring its own prompts; 2 x 4 devices == 1 x 8 (buffers,
  rewards, parameters)."""
  import json  # noqa: PLC0415

  from dlm.train import grpo  # noqa: PLC0415
  one, two = tmp_path / "one", tmp_path / "two"
  cmd = [sys.executable, "-m", "dlm.main", "train", f"--config={ROOT}/configs/grpo.py:smoke",
         "--config.train.steps=2", "--config.train.checkpoint_every=2",
         "--config.train.eval_every=2", "--config.train.log_every=1",
         "--config.data.grpo.max_prompts=40", "--config.data.grpo.max_val_prompts=3",
         "--config.grpo.rewards=length", "--config.mesh.data=2", "--config.mesh.fsdp=2",
         "--config.mesh.tensor=2"]  # num_iterations 2, beta > 0: old and reference log-probs
  subprocess.run(cmd + [f"--workdir={one}"], env=_env(8), cwd=ROOT, check=True,
                 capture_output=True, timeout=300)
  env = _env(1, DLM_LOCAL_DEVICES="4")
  del env["XLA_FLAGS"]
  proc = subprocess.run([str(ROOT / "launch" / "local.sh"), "2", "--"] + cmd
                        + [f"--workdir={two}"], env=env, cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "[1] step 2: val" not in proc.stdout + proc.stderr  # only process 0 reports
  assert (one / "tokenizer.model").read_bytes() == (two / "tokenizer.model").read_bytes()
  bufs = [grpo._unpack(json.loads((d / "checkpoints/2/data/metadata").read_text())["buffer"])
          for d in (one, two)]
  assert bufs[0]["old_logp"].shape == (2, 8, 48)
  for k in bufs[0]:
    np.testing.assert_allclose(bufs[0][k], bufs[1][k], atol=1e-5, err_msg=k)
  logs = [[json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
          for d in (one, two)]
  assert [sum('"loss"' in json.dumps(x) for x in log) for log in logs] == [2, 2]  # written once
  rewards = [[x["reward"] for x in log if "reward" in x] for log in logs]
  assert len(rewards[0]) == 1 and 0 < rewards[0][0] < 1  # one rollout serves both steps
  np.testing.assert_allclose(rewards[0], rewards[1], rtol=1e-6)
  val = [[x["val_reward"] for x in log if "val_reward" in x] for log in logs]
  np.testing.assert_allclose(val[0], val[1], rtol=1e-6)
  a, b = load_run(one), load_run(two)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("victim", [1, 0], ids=["worker_dies", "coordinator_dies"])
def test_peer_death_stops_the_survivor(tmp_path, victim):
  procs = _start_pair(tmp_path, stdout=subprocess.DEVNULL)
  try:
    _wait_for_lines(tmp_path, procs, 2)
    killed_at = time.time()
    procs[victim].send_signal(signal.SIGKILL)
    survivor = procs[1 - victim]
    _, err = survivor.communicate(timeout=60)
    assert time.time() - killed_at < 60
    assert survivor.returncode != 0
    # Whichever notices first: JAX's heartbeat check, the collective (gloo) that lost its
    # peer mid-transfer, or our hang watchdog.
    reasons = ("another task died", "peer process has probably died", "gloo")
    assert any(r in err for r in reasons), err[-2000:]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()


def test_watchdog_turns_a_hang_into_an_exit():
  code = ("import time\nfrom dlm.distributed import Watchdog\nw = Watchdog(1.0)\nw.start()\n"
          "for _ in range(3):\n  time.sleep(0.5)\n  w.kick()\ntime.sleep(30)\n")
  t0 = time.time()
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                        env=_env(1), cwd=ROOT)
  assert proc.returncode == 1 and "peer process has probably died" in proc.stderr
  assert 2.0 < time.time() - t0 < 15.0  # kicked for 1.5 s, then fired ~1-2 s later


def test_sigterm_to_one_process_saves_the_same_step_on_all(tmp_path):
  """JAX's preemption sync point: every process stops and saves at the same step, exit 0."""
  procs = _start_pair(tmp_path, stdout=subprocess.PIPE)
  try:
    _wait_for_lines(tmp_path, procs, 3)
    procs[1].send_signal(signal.SIGTERM)  # the worker only, as a preempted host would be
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    line = [l for l in outs[0][0].splitlines() if l.startswith("SIGTERM at step")]
    assert line, outs[0]
    step = int(line[0].split()[3].rstrip(":"))
    assert load_run(tmp_path).step == step >= 3
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()


def test_batch_axes_must_span_the_processes():
  """Each process feeds its own rows: a mesh whose batch axes (data x fsdp) do not split over
  the processes would give every process's devices the same row shards; one line instead."""
  import types  # noqa: PLC0415

  import ml_collections  # noqa: PLC0415

  from dlm.errors import UserError  # noqa: PLC0415
  from dlm.train import loop  # noqa: PLC0415
  tc = ml_collections.ConfigDict({"batch_size": 8, "microbatches": 1})
  mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 1, "tensor": 8})
  with pytest.raises(UserError, match="data x fsdp = 1 devices must be a multiple of the 2"):
    loop.check_batch(tc, mesh, 2)
  loop.check_batch(tc, types.SimpleNamespace(shape={"data": 2, "fsdp": 1, "tensor": 4}), 2)
