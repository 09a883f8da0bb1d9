"""`dlm plot`: curves from a synthetic metrics.jsonl (with a resume and a NaN), no training."""

from __future__ import annotations

import json
import math
import os
import pathlib
import struct
import subprocess
import sys

import pytest

from dlm.errors import UserError
from dlm.train import metrics, plot

ROOT = pathlib.Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path: pathlib.Path) -> tuple[int, int]:
  data = path.read_bytes()
  assert data[:8] == PNG_MAGIC and data[12:16] == b"IHDR"
  return struct.unpack(">II", data[16:24])


def _write_metrics(workdir: pathlib.Path, records: list[dict]) -> None:
  workdir.mkdir(parents=True, exist_ok=True)
  with (workdir / "metrics.jsonl").open("w") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


def _run_records(val: bool = True) -> list[dict]:
  """Steps 10..300 every 10, killed after 200 and resumed from 150 (steps 160..200 re-logged)."""
  records = []
  def log(step, loss):
    records.append({"step": step, "loss": loss, "grad_norm": 1.0, "lr": 1e-4 * min(1, step / 50),
                    "tokens_per_s": 8000.0})
    if val and step % 50 == 0:
      records.append({"step": step, "val_bits_per_byte": 3.0 - step / 200,
                      "val_nelbo_per_token": 6.0 - step / 100})
  for step in range(10, 210, 10):
    log(step, 7.0 - step / 100)
  for step in range(160, 310, 10):
    log(step, float("nan") if step == 250 else 6.5 - step / 100)
  return records


def test_series_keeps_last_value_per_step_finite_sorted():
  records = [{"step": 3, "loss": 3.0}, {"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0},
             {"step": 2, "loss": 20.0}, {"step": 4, "loss": float("nan")},
             {"step": 5, "loss": float("inf")}, {"step": 1, "val_bits_per_byte": 9.0},
             {"step": 6, "loss": 6.0}, {"step": 6, "loss": float("nan")}]
  assert plot.series(records, "loss") == ([1, 2, 3], [1.0, 20.0, 3.0])
  assert plot.series(records, "val_bits_per_byte") == ([1], [9.0])
  assert plot.series(records, "missing") == ([], [])


def test_series_on_a_resumed_run():
  steps, loss = plot.series(_run_records(), "loss")
  assert steps == sorted(set(steps)) and 250 not in steps and steps[-1] == 300
  assert loss[steps.index(200)] == pytest.approx(6.5 - 2.0)  # the resumed run's value
  assert loss[steps.index(100)] == pytest.approx(7.0 - 1.0)
  assert all(math.isfinite(v) for v in loss)


def test_ema_smooths_and_starts_at_the_first_value():
  out = plot.ema([1.0, 3.0, 3.0, 3.0], span=3)
  assert out[0] == 1.0 and out[0] < out[1] < out[2] < out[3] < 3.0


@pytest.mark.parametrize("val", [True, False])
def test_plot_curves_writes_a_png(tmp_path, val):
  workdir = tmp_path / "run"
  _write_metrics(workdir, _run_records(val=val))
  out = plot.plot_curves(workdir)
  assert out == workdir / "curves.png"
  assert _png_size(out) == (plot.FIGSIZE[0] * plot.DPI, plot.FIGSIZE[1] * plot.DPI)
  assert sorted(p.name for p in workdir.iterdir()) == ["curves.png", "metrics.jsonl"]


def test_plot_curves_explicit_out_overwrites(tmp_path):
  _write_metrics(tmp_path, _run_records())
  out = tmp_path / "elsewhere.png"
  out.write_bytes(b"old")
  assert plot.plot_curves(tmp_path, out=str(out)) == out
  assert out.read_bytes()[:8] == PNG_MAGIC


def test_missing_metrics_names_the_fix(tmp_path):
  for workdir in (tmp_path / "absent", tmp_path):
    with pytest.raises(UserError, match=r"no metrics in .*metrics\.jsonl; train first with "
                                        r"`dlm train --config=\.\.\. --workdir="):
      plot.plot_curves(workdir)
  _write_metrics(tmp_path, [{"step": 10, "val_bits_per_byte": 2.0}])
  with pytest.raises(UserError, match="no training records"):
    plot.plot_curves(tmp_path)
  assert not (tmp_path / "curves.png").exists()


def test_a_line_cut_by_a_kill_is_skipped(tmp_path):
  """A run killed mid-write leaves a partial line; the resumed run appends after it."""
  records = _run_records()
  _write_metrics(tmp_path, records[:3])
  with (tmp_path / "metrics.jsonl").open("a") as f:
    f.write('{"step": 310, "lo')
    f.write("".join(json.dumps(r) + "\n" for r in records[3:]))
  got = metrics.read_metrics(tmp_path)
  assert [r["step"] for r in got] == [r["step"] for r in records[:3] + records[4:]]  # one lost
  assert plot.plot_curves(tmp_path).exists()


def _dlm(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "dlm.main", *args], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=300)


def test_cli(tmp_path):
  workdir = tmp_path / "run"
  _write_metrics(workdir, _run_records())
  out = tmp_path / "c.png"
  proc = _dlm("plot", f"--workdir={workdir}", f"--out={out}")
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == str(out) and out.read_bytes()[:8] == PNG_MAGIC

  proc = _dlm("plot", f"--workdir={tmp_path / 'absent'}")
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      f"dlm plot: error: no metrics in {tmp_path / 'absent'}/metrics.jsonl; train first with "
      f"`dlm train --config=... --workdir={tmp_path / 'absent'}`"]

  proc = _dlm("plot")
  assert proc.returncode == 2
  assert proc.stderr.strip() == "dlm plot: error: --workdir=DIR is required"
