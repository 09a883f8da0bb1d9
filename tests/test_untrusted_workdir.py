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
from dlm import checkpoint

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
  """A real first trainer runs on; the second refuses in one line; every checkpoint restores."""
  import os
  import time
  workdir = _copy(trained, tmp_path / "busy")
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  first = subprocess.Popen(
      [sys.executable, "-m", "dlm.main", "train", f"--config={SMOKE}", f"--workdir={workdir}",
       "--config.train.steps=60", "--config.train.checkpoint_every=10",
       "--config.train.eval_every=60", "--config.train.max_to_keep=20"],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
  try:
    deadline = time.monotonic() + 240
    while not lock.is_held(workdir) and first.poll() is None and time.monotonic() < deadline:
      time.sleep(0.2)
    assert lock.is_held(workdir), "the first trainer never took the lock"
    second = dlm("train", f"--config={SMOKE}", f"--workdir={workdir}", "--config.train.steps=40",
                 "--config.train.checkpoint_every=5", "--config.train.eval_every=40")
    out, err = first.communicate(timeout=600)
  finally:
    first.kill()
  assert second.returncode == 1
  assert "is being written by pid" in second.stderr.strip().splitlines()[-1]
  assert first.returncode == 0, err
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir())
  assert steps == [5, 10, 20, 30, 40, 50, 60], steps
  assert all(checkpoint.verify(workdir / "checkpoints" / str(s)) for s in steps)
  from dlm.models import loader
  for s in steps:
    assert loader.load(workdir, step=s).step == s
  assert not list(workdir.glob("checkpoints/*.orbax-checkpoint-tmp*"))


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
  assert ", step 5) =====" in proc.stdout and "does not match its sha256 digest" in proc.stderr
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


def _copy(trained: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
  shutil.copytree(trained, dst)
  return dst


def _flip(path: pathlib.Path) -> None:
  raw = bytearray(path.read_bytes())
  raw[len(raw) // 2] ^= 0x01
  path.write_bytes(bytes(raw))


def test_a_flipped_byte_in_any_file_of_a_checkpoint_is_caught(trained, tmp_path):
  step = _copy(trained, tmp_path / "w") / "checkpoints" / "10"
  files = [p for p in sorted(step.rglob("*")) if p.is_file() and p.name != checkpoint.DIGEST_FILE
           and p.stat().st_size]
  assert len(files) >= 5 and any("state" in p.parts for p in files)
  for path in files:
    before = path.read_bytes()
    _flip(path)
    with pytest.raises(checkpoint.CorruptCheckpoint, match="does not match its sha256 digest"):
      checkpoint.verify(step)
    path.write_bytes(before)
  assert checkpoint.verify(step)


def _eval_step(proc: subprocess.CompletedProcess) -> dict:
  assert proc.returncode == 0, proc.stderr
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_flipped_byte_falls_back_in_eval_and_train_resume(trained, tmp_path):
  for name in ("eval", "train"):
    workdir = _copy(trained, tmp_path / name)
    array = max((p for p in (workdir / "checkpoints" / "10" / "state").rglob("*") if p.is_file()),
                key=lambda p: p.stat().st_size)
    _flip(array)
    if name == "eval":
      out = _eval_step(dlm("eval", f"--workdir={workdir}", "--max_rows=8"))
      assert out["step"] == 5 and out["weights"] == "ema_params"
      proc_err = ""
    else:
      proc = dlm("train", f"--config={SMOKE}", f"--workdir={workdir}", "--config.train.steps=12",
                 "--config.train.checkpoint_every=5", "--config.train.eval_every=10")
      assert proc.returncode == 0, proc.stderr
      assert json.loads(proc.stdout.strip().splitlines()[-1])["step"] == 12
      assert f"resumed from {workdir}/checkpoints/5" in proc.stdout + proc.stderr
      proc_err = proc.stderr
    moved = list((workdir / checkpoint.UNREADABLE).iterdir())
    assert [p.name.split("-")[0] for p in moved] == ["10"]
    if name == "train":
      assert "does not match its sha256 digest" in proc_err


def test_stray_step_folder_and_missing_items_fall_back_in_sample_and_eval(trained, tmp_path):
  stray = _copy(trained, tmp_path / "stray")
  (stray / "checkpoints" / "15").mkdir()  # a half-copied or hand-made newest step
  proc = dlm("sample", f"--workdir={stray}", "--prompt=def ", "--num_samples=1", "--steps=2")
  assert proc.returncode == 0, proc.stderr
  assert ", step 10) =====" in proc.stdout and "checkpoints/15 is unreadable" in proc.stderr
  # the data item and the orbax metadata gone: eval falls back (and keeps the EMA weights)
  missing = _copy(trained, tmp_path / "missing")
  shutil.rmtree(missing / "checkpoints" / "10" / "data")
  for meta in (missing / "checkpoints" / "10").rglob("_*METADATA"):
    meta.unlink()
  out = _eval_step(dlm("eval", f"--workdir={missing}", "--max_rows=8"))
  assert out["step"] == 5 and out["weights"] == "ema_params"


def test_export_refuses_config_code_and_never_mixes_two_writers(trained, tmp_path):
  from dlm.convert import staging
  from dlm.convert import workdir as convert_workdir
  evil = _copy(trained, tmp_path / "evil")
  cfg = json.loads((evil / "config.json").read_text())
  cfg["process"]["schedule"]["name"] = "os:system"
  (evil / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(UserError, match="asks to import 'os:system'"):
    convert_workdir.export(evil, tmp_path / "hf")
  assert not (tmp_path / "hf").exists()
  # a second writer that fills --out meanwhile wins; ours refuses and leaves no trace
  out = tmp_path / "out"
  with pytest.raises(UserError, match="written by another process meanwhile"):
    with staging.staged(out, "--out", "export") as stage:
      (stage / "config.json").write_text("{}")
      out.mkdir()
      (out / "theirs.json").write_text("{}")
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
  assert [p.name for p in out.iterdir()] == ["theirs.json"]


def _immutable(path: pathlib.Path, on: bool) -> bool:
  import os
  if os.geteuid() != 0:
    path.chmod(0o555 if on else 0o755)
    return True
  return subprocess.run(["chattr", "+i" if on else "-i", str(path)],
                        capture_output=True).returncode == 0


def test_cli_errors_are_one_line_with_the_traceback_under_dlm_debug(trained, tmp_path):
  proc = dlm("train", f"--config={SMOKE}", f"--workdir={tmp_path / 'w'}", "--config.train.stepz=3")
  assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == (
      "dlm train: error: the config has no field 'stepz' (--config.train.stepz); did you mean"
      ' "steps" instead of "stepz"?')
  flagfile = tmp_path / "bad.flags"
  flagfile.write_bytes(b"--prompt=\xff\xfe\n")
  proc = dlm("sample", f"--workdir={trained}", f"--flagfile={flagfile}")
  assert proc.returncode == 2 and "--flagfile is not UTF-8" in proc.stderr.strip().splitlines()[-1]
  garbled = _copy(trained, tmp_path / "garbled")
  (garbled / "config.json").write_bytes(b'{"model": \x96}')
  proc = dlm("sample", f"--workdir={garbled}", "--prompt=def ", "--num_samples=1")
  assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1].startswith(
      f"dlm sample: error: {garbled}/config.json is not UTF-8 text (byte 0x96 at offset 10)")
  readonly = _copy(trained, tmp_path / "ro")
  if not _immutable(readonly, True):
    pytest.skip("cannot make a directory unwritable here (root without chattr)")
  before = sorted(str(p) for p in readonly.rglob("*"))
  try:
    proc = dlm("plot", f"--workdir={readonly}")
    debug = dlm("plot", f"--workdir={readonly}", env_extra={"DLM_DEBUG": "1"})
    train = dlm("train", f"--config={SMOKE}", f"--workdir={readonly}", "--config.train.steps=12")
  finally:
    _immutable(readonly, False)
  assert train.returncode == 1 and train.stderr.strip().splitlines()[-1] == (
      f"dlm train: error: --workdir={readonly} is not writable; fix its permissions or pick another")
  assert sorted(str(p) for p in readonly.rglob("*")) == before
  last = proc.stderr.strip().splitlines()[-1]
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
  assert last.startswith(f"dlm plot: error: {readonly}/") and "permissions" in last
  assert debug.returncode == 1 and "Traceback" in debug.stderr
  assert not (readonly / "curves.png").exists()
