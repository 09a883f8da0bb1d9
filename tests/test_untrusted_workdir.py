"""Issue 15: a loaded workdir runs no code, has one writer, and corrupt checkpoints are set aside."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from dlm import lock, registry
from dlm.errors import UserError
from dlm.train import checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = f"{ROOT}/configs/quickstart.py:smoke"


def dlm(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
  import os
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", **(env_extra or {}))
  return subprocess.run([sys.executable, "-m", "dlm.main", *args], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> pathlib.Path:
  workdir = tmp_path_factory.mktemp("trust") / "run"
  proc = dlm("train", f"--config={SMOKE}", f"--workdir={workdir}", "--config.train.steps=10",
             "--config.train.checkpoint_every=5", "--config.train.eval_every=10")
  assert proc.returncode == 0, proc.stderr
  return workdir


def test_import_paths_found_anywhere_in_a_config():
  cfg = {"process": {"schedule": {"name": "os:system"}}, "x": ["a", "pkg.mod:fn"],
         "data": {"root": "/data/a:b", "source": "stdlib"}}
  assert registry.import_paths(cfg) == [("process.schedule.name", "os:system"), ("x[1]", "pkg.mod:fn")]
  with pytest.raises(UserError, match="asks to import 'os:system'"):
    registry.check_untrusted(cfg, "w/config.json")
  registry.check_untrusted(cfg, "w/config.json", trust=True)


def test_malicious_config_runs_nothing(trained, tmp_path):
  workdir = tmp_path / "evil"
  shutil.copytree(trained, workdir)
  marker = tmp_path / "marker"
  mod = tmp_path / "evil_mod.py"
  mod.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                 "from dlm.processes.schedules import SCHEDULES\nSched = SCHEDULES.get('linear')\n")
  cfg = json.loads((workdir / "config.json").read_text())
  cfg["process"]["schedule"]["name"] = "evil_mod:Sched"
  (workdir / "config.json").write_text(json.dumps(cfg))
  before = sorted(str(p) for p in workdir.rglob("*"))
  env = {"PYTHONPATH": str(tmp_path)}
  for cmd in (["sample", "--prompt=def ", "--num_samples=1", "--steps=2"], ["eval", "--max_rows=8"]):
    proc = dlm(cmd[0], f"--workdir={workdir}", *cmd[1:], env_extra=env)
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert "asks to import 'evil_mod:Sched'" in last and "--trust_config_code" in last
    assert str(workdir / "config.json") in last
    assert not marker.exists()
  code = (f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import dlm\n"
          f"dlm.from_pretrained({str(workdir)!r})")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                        env=dict(__import__("os").environ, JAX_PLATFORMS="cpu"), timeout=300)
  assert proc.returncode != 0 and "asks to import" in proc.stderr and not marker.exists()
  assert sorted(str(p) for p in workdir.rglob("*")) == before
  # the user's explicit trust imports it
  proc = dlm("sample", f"--workdir={workdir}", "--prompt=def ", "--num_samples=1", "--steps=2",
             "--trust_config_code", env_extra=env)
  assert proc.returncode == 0, proc.stderr
  assert marker.read_text() == "ran"


def test_second_writer_refused_and_stale_lock_taken_over(tmp_path):
  with lock.hold(tmp_path, "dlm train"):
    code = (f"from dlm import lock\nwith lock.hold({str(tmp_path)!r}, 'dlm train'): pass")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode != 0 and "is being written by pid" in proc.stderr
    assert lock.is_held(tmp_path)
  assert not lock.is_held(tmp_path)
  # a process killed while holding it leaves its record behind: taken over with a warning
  (tmp_path / lock.LOCK_FILE).write_text(json.dumps({"pid": 2**22 + 7, "host": "h", "since": "x"}))
  with pytest.warns(lock.StaleLockWarning, match="stale lock of pid"):
    with lock.hold(tmp_path, "dlm train"):
      pass


def test_concurrent_trainers_second_refuses(trained, tmp_path):
  workdir = tmp_path / "busy"
  shutil.copytree(trained, workdir)
  with lock.hold(workdir, "dlm train (test)"):
    proc = dlm("train", f"--config={SMOKE}", f"--workdir={workdir}", "--config.train.steps=20",
               "--config.train.checkpoint_every=5", "--config.train.eval_every=10")
  assert proc.returncode == 1
  assert "is being written by pid" in proc.stderr.strip().splitlines()[-1]
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["10", "5"]


def test_flipped_byte_falls_back_in_sample_and_train(trained, tmp_path):
  workdir = tmp_path / "flipped"
  shutil.copytree(trained, workdir)
  newest = workdir / "checkpoints" / "10"
  assert checkpoint.verify(newest)
  files = sorted(p for p in (newest / "state").rglob("*") if p.is_file() and p.stat().st_size > 64)
  target = max(files, key=lambda p: p.stat().st_size)
  raw = bytearray(target.read_bytes())
  raw[len(raw) // 2] ^= 0xFF
  target.write_bytes(bytes(raw))
  proc = dlm("sample", f"--workdir={workdir}", "--prompt=def ", "--num_samples=1", "--steps=2")
  assert proc.returncode == 0, proc.stderr
  assert "(step 5," in proc.stdout and "does not match its sha256 digest" in proc.stderr
  assert not newest.exists() and list((workdir / checkpoint.UNREADABLE).iterdir())


def test_bad_train_values_refused_before_writing(tmp_path):
  for flag in ("--config.train.checkpoint_every=0", "--config.train.log_every=0",
               "--config.train.eval_every=-1", "--config.train.steps=0"):
    workdir = tmp_path / "w"
    proc = dlm("train", f"--config={SMOKE}", f"--workdir={workdir}", flag)
    assert proc.returncode == 1, (flag, proc.stderr)
    assert "must be an integer >= 1" in proc.stderr.strip().splitlines()[-1]
    assert not workdir.exists()


def test_resume_refuses_other_seq_len(trained, tmp_path):
  workdir = tmp_path / "seq"
  shutil.copytree(trained, workdir)
  cfg = (workdir / "config.json").read_text()
  proc = dlm("train", f"--config={SMOKE}", f"--workdir={workdir}", "--config.data.seq_len=32")
  assert proc.returncode == 1 and "data.seq_len" in proc.stderr.strip().splitlines()[-1]
  assert (workdir / "config.json").read_text() == cfg
