"""Long-run safety of `dlm train`: SIGKILL and resume, SIGTERM/SIGINT, unreadable or unwritable
checkpoints, non-finite updates, warm starts.  Real processes on the :smoke recipe."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from dlm.errors import UserError
from dlm import checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = f"{ROOT}/configs/quickstart.py:smoke"
STEPS = 40
RUN = [f"--config={SMOKE}", f"--config.train.steps={STEPS}", "--config.train.checkpoint_every=5",
       "--config.train.log_every=5", "--config.train.eval_every=20"]


def _env() -> dict[str, str]:
  return dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def train(workdir: pathlib.Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
  proc = subprocess.run([sys.executable, "-m", "dlm.main", "train", *RUN, f"--workdir={workdir}",
                         *extra], capture_output=True, text=True, env=_env(), cwd=ROOT,
                        timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f"dlm train failed:\n{proc.stdout}\n{proc.stderr}")
  return proc


def start(workdir: pathlib.Path, *extra: str) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "dlm.main", "train", *RUN,
                           f"--workdir={workdir}", *extra], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)


def logged_lines(workdir: pathlib.Path) -> int:
  path = workdir / "metrics.jsonl"
  return len(path.read_text().splitlines()) if path.exists() else 0


def wait_for_lines(proc: subprocess.Popen, workdir: pathlib.Path, n: int, timeout: float = 120):
  t0 = time.time()
  while logged_lines(workdir) < n and proc.poll() is None:
    assert time.time() - t0 < timeout, "training made no progress"
    time.sleep(0.02)


def seeded(workdir: pathlib.Path, base: pathlib.Path) -> pathlib.Path:
  """A fresh workdir holding ``base``'s tokenizer and token cache (skips tokenizer training)."""
  workdir.mkdir()
  shutil.copyfile(base / "tokenizer.model", workdir / "tokenizer.model")
  shutil.copytree(base / "data", workdir / "data")
  return workdir


def saved(workdir: pathlib.Path, step: int | None = None):
  """(step, state tree as numpy, data iterator state) of a checkpoint, read without a model."""
  mngr = checkpoint._reader(workdir)
  step = mngr.latest_step() if step is None else step
  out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(),
                                                   data=ocp.args.JsonRestore(),
                                                   meta=ocp.args.JsonRestore()))
  return step, jax.tree.map(np.asarray, out["state"]), out["data"]


def tree_digest(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  for f in sorted(p for p in path.rglob("*") if p.is_file()):
    h.update(str(f.relative_to(path)).encode())
    h.update(f.read_bytes())
  return h.hexdigest()


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> pathlib.Path:
  """One uninterrupted run of STEPS steps."""
  workdir = tmp_path_factory.mktemp("baseline")
  train(workdir)
  return workdir


def test_sigkill_at_random_steps_then_resume_is_bit_identical(baseline, tmp_path):
  workdir = seeded(tmp_path / "killed", baseline)
  rnd = random.Random(1234)
  killed_at = []
  for round_ in range(3):
    proc = start(workdir)
    wait_for_lines(proc, workdir, logged_lines(workdir) + 1)  # compiled and stepping
    t0 = time.time()
    while round_ == 0 and not any(c.name.isdigit() for c in (workdir / "checkpoints").glob("*")):
      assert time.time() - t0 < 60 and proc.poll() is None  # the first run leaves a checkpoint
      time.sleep(0.02)
    time.sleep(rnd.uniform(0.0, 0.4))
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.kill()
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    latest = checkpoint._reader(workdir).latest_step()
    killed_at.append(latest)
    assert latest is None or latest < STEPS
  out = train(workdir)
  assert "resumed from" in out.stdout
  step_a, state_a, data_a = saved(baseline, STEPS)
  step_b, state_b, data_b = saved(workdir, STEPS)
  assert step_a == step_b == STEPS and data_a == data_b
  assert set(state_a) == set(state_b) and state_b["ema_params"]
  flat_a, flat_b = jax.tree.leaves_with_path(state_a), jax.tree.leaves_with_path(state_b)
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, a), (_, b) in zip(flat_a, flat_b):
    assert a.dtype == b.dtype and np.array_equal(a, b), f"{jax.tree_util.keystr(path)} differs"
  print("killed with newest checkpoints", killed_at)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_at_the_step_boundary_and_exits_0(baseline, tmp_path, sig):
  workdir = seeded(tmp_path / "sig", baseline)
  proc = start(workdir, "--config.train.steps=2000")
  wait_for_lines(proc, workdir, 2)  # past step 10
  proc.send_signal(sig)
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr
  name = signal.Signals(sig).name
  line = [l for l in (stdout + stderr).splitlines() if l.startswith(f"{name} at step")]
  assert line, stderr
  step = int(line[0].split()[3].rstrip(":"))
  assert 10 <= step < 2000
  result = json.loads(stdout.strip().splitlines()[-1])
  assert result["step"] == step and result["stop_reason"] == name
  assert checkpoint._reader(workdir).latest_step() == step
  assert saved(workdir)[1]["step"] == step


def test_unreadable_newest_checkpoint_falls_back_and_is_kept(baseline, tmp_path):
  workdir = tmp_path / "corrupt"
  shutil.copytree(baseline, workdir)
  newest = workdir / "checkpoints" / str(STEPS)
  for f in (newest / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 64:
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # a truncated write
  digest = tree_digest(newest)
  out = train(workdir, f"--config.train.steps={STEPS + 5}")
  assert "is unreadable" in out.stderr and "falling back to the previous checkpoint" in out.stderr
  assert f"resumed from {workdir}/checkpoints/{STEPS - 5}" in out.stdout
  moved = list((workdir / checkpoint.UNREADABLE).iterdir())
  assert len(moved) == 1 and moved[0].name.startswith(f"{STEPS}-")
  assert tree_digest(moved[0]) == digest  # kept byte for byte
  assert checkpoint._reader(workdir).latest_step() == STEPS + 5


def _make_unwritable(path: pathlib.Path) -> bool:
  if os.geteuid() != 0:
    path.chmod(0o555)
    return True
  return subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0


def _make_writable(path: pathlib.Path) -> None:
  if os.geteuid() != 0:
    path.chmod(0o755)
  else:
    subprocess.run(["chattr", "-i", str(path)], capture_output=True)


def test_failing_save_warns_and_training_goes_on(baseline, tmp_path):
  workdir = tmp_path / "readonly"
  shutil.copytree(baseline, workdir)
  ckpts = workdir / "checkpoints"
  before = {p.name: tree_digest(p) for p in ckpts.iterdir() if p.is_dir()}
  if not _make_unwritable(ckpts):
    pytest.skip("cannot make a directory unwritable here (root without chattr)")
  try:
    out = train(workdir, f"--config.train.steps={STEPS + 10}")
  finally:
    _make_writable(ckpts)
  assert "could not save the checkpoint" in out.stderr or "failed in the background" in out.stderr
  assert json.loads(out.stdout.strip().splitlines()[-1])["step"] == STEPS + 10
  after = {p.name: tree_digest(p) for p in ckpts.iterdir() if p.is_dir()}
  assert after == before  # the last good checkpoints are intact
  assert checkpoint._reader(workdir).latest_step() == STEPS


def test_init_from_warm_starts_parameters(baseline, tmp_path):
  workdir = tmp_path / "warm"
  out = train(workdir, f"--init_from={baseline}", "--config.train.steps=5",
              "--config.optim.warmup_steps=5")
  assert f"initialized parameters from {baseline}/checkpoints/{STEPS}" in out.stdout
  assert (workdir / "tokenizer.model").read_bytes() == (baseline / "tokenizer.model").read_bytes()
  first = lambda w: next(json.loads(l) for l in (w / "metrics.jsonl").read_text().splitlines())
  assert first(workdir)["step"] == 5 and first(workdir)["loss"] < first(baseline)["loss"] - 0.3
  bad = train(tmp_path / "warm2", f"--init_from={baseline}", "--config.model.d_model=32",
              check=False)
  assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
  assert "different model" in bad.stderr and "d_model" in bad.stderr
  bad = train(tmp_path / "warm3", f"--init_from={tmp_path / 'nowhere'}", check=False)
  assert bad.returncode != 0 and "not a dlm workdir" in bad.stderr


# --- non-finite updates, in process: a NaN is injected into the data -------------------------


class _Poisoned:
  """Wraps a batch iterator: batch number k (1-based) in ``bad`` gets a NaN in its loss mask."""

  def __init__(self, inner, bad):
    self.inner, self.bad, self.count = inner, set(bad), 0

  def __next__(self):
    batch = dict(next(self.inner))
    self.count += 1
    mask = np.ones(batch["tokens"].shape, np.float32)
    if self.count in self.bad:
      mask[0, 0] = np.nan
    batch["loss_mask"] = mask
    return batch

  def get_state(self):
    return self.inner.get_state()

  def set_state(self, state):
    self.inner.set_state(state)


def _poisoned_train(monkeypatch, workdir, bad, **train_overrides):
  from configs import quickstart  # noqa: PLC0415
  from dlm.train import loop

  original = loop.inputs.make_train_input

  def make(*args, **kw):
    data = original(*args, **kw)
    data.iterator = _Poisoned(data.iterator, bad)
    data.batch_keys = tuple(dict.fromkeys(data.batch_keys + ("loss_mask",)))
    return data

  monkeypatch.setattr(loop.inputs, "make_train_input", make)
  config = quickstart.get_config("smoke")
  config.train.update(dict(steps=12, checkpoint_every=6, log_every=3, eval_every=100),
                      **train_overrides)
  return loop.train(config, workdir)


@pytest.fixture
def importable_configs(monkeypatch):
  monkeypatch.syspath_prepend(str(ROOT))


def test_nan_batch_is_skipped_counted_and_never_saved(importable_configs, monkeypatch, baseline,
                                                      tmp_path):
  workdir = seeded(tmp_path / "nan", baseline)
  result = _poisoned_train(monkeypatch, workdir, bad={3, 4})
  assert result["step"] == 12 and result["nonfinite_total"] == 2
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["nonfinite_total"] for r in records if "nonfinite_total" in r] == [1, 2, 2, 2]
  _, state, _ = saved(workdir, 12)
  assert int(state["nonfinite_total"]) == 2 and int(state["nonfinite_streak"]) == 0
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state) if x.dtype.kind == "f")


def test_too_many_nonfinite_updates_in_a_row_stop_with_a_message(importable_configs, monkeypatch,
                                                                 baseline, tmp_path):
  workdir = seeded(tmp_path / "nan3", baseline)
  with pytest.raises(UserError, match=r"3 non-finite updates in a row \(steps 5\.\.7\)"):
    _poisoned_train(monkeypatch, workdir, bad={5, 6, 7, 8, 9}, max_nonfinite_in_a_row=3)
  step, state, _ = saved(workdir)
  assert step == 8 and int(state["nonfinite_streak"]) >= 3
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state) if x.dtype.kind == "f")
