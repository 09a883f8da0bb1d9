"""The user's path: `dlm train` (stop, resume), `dlm sample`, `dlm eval` on the :smoke recipe."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = f"{ROOT}/configs/quickstart.py:smoke"


def dlm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "dlm.main", *args], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f"dlm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
  return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> pathlib.Path:
  """Train half the smoke run, stop, then resume to the end."""
  workdir = tmp_path_factory.mktemp("smoke")
  dlm("train", f"--config={SMOKE}", f"--workdir={workdir}", "--config.train.steps=30")
  assert (workdir / "checkpoints" / "30").exists()
  out = dlm("train", f"--config={SMOKE}", f"--workdir={workdir}")
  assert "resumed from" in out.stdout
  return workdir


def test_train_writes_metrics_and_resumes(trained):
  records = [json.loads(l) for l in (trained / "metrics.jsonl").read_text().splitlines()]
  steps = [r["step"] for r in records if "loss" in r]
  assert steps == sorted(steps) and steps[-1] == 60 and len(set(steps)) == len(steps)
  assert all({"step", "loss"} <= set(r) for r in records if "loss" in r)
  assert any("val_bits_per_byte" in r for r in records)
  assert (trained / "tokenizer.model").exists()
  assert list((trained / "tensorboard").glob("events.out.tfevents.*"))
  first, last = records[0]["loss"], [r for r in records if "loss" in r][-1]["loss"]
  assert last < first  # it learns


def test_sample_prompt_and_infill(trained):
  out = dlm("sample", f"--workdir={trained}", "--prompt=import os\n", "--num_samples=2",
            "--steps=8", "--seed=1").stdout
  samples = out.split("===== sample ")[1:]
  assert len(samples) == 2
  assert all(s.split("\n", 1)[1].startswith("import os\n") for s in samples)
  out = dlm("sample", f"--workdir={trained}", "--infill=def <gap:5>(self):\n    return <gap:4>\n",
            "--num_samples=1", "--steps=8").stdout
  body = out.split("=====\n", 1)[1]
  assert body.startswith("def ") and "(self):\n    return " in body


def test_eval_prints_json_last(trained):
  out = dlm("eval", f"--workdir={trained}", "--max_rows=64").stdout
  result = json.loads(out.strip().splitlines()[-1])
  assert {"bits_per_byte", "unigram_bits_per_byte", "ppl_bound", "step"} <= set(result)
  assert result["step"] == 60
  assert 0 < result["bits_per_byte"] < 20 and result["ppl_bound"] > 1


def test_bad_inputs_get_one_line_errors(trained, tmp_path):
  before = sorted(p.name for p in (trained / "checkpoints").iterdir())
  cfg_before = (trained / "config.json").read_text()
  # unknown config key
  r = dlm("train", f"--config={SMOKE}", f"--workdir={tmp_path / 'x'}", "--config.model.nope=1",
          check=False)
  assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
  assert "nope" in r.stderr
  # a workdir holding a checkpoint of a different model shape
  r = dlm("train", f"--config={SMOKE}", f"--workdir={trained}", "--config.model.d_model=32",
          check=False)
  assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
  assert "different model" in r.stderr and "d_model" in r.stderr
  # a prompt longer than the sequence
  r = dlm("sample", f"--workdir={trained}", "--prompt=" + "x = 1\n" * 200, check=False)
  assert r.returncode != 0 and "--length" in r.stderr and len(r.stderr.strip().splitlines()) == 1
  # an empty corpus
  empty = tmp_path / "empty"
  empty.mkdir()
  r = dlm("train", f"--config={SMOKE}", f"--workdir={tmp_path / 'y'}", f"--config.data.root={empty}",
          check=False)
  assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
  assert str(empty) in r.stderr
  # nothing saved was touched
  assert sorted(p.name for p in (trained / "checkpoints").iterdir()) == before
  assert (trained / "config.json").read_text() == cfg_before


def test_from_pretrained_and_export_of_a_trained_run(trained, tmp_path, monkeypatch):
  import numpy as np
  import dlm
  from dlm.convert import workdir as convert_workdir
  m = dlm.from_pretrained(trained)
  ids = np.array([[5, 6, 7, 8, m.ids["mask"], 9]], np.int32)
  logits = m.logits(ids)
  assert logits.shape == (1, 6, m.model_cfg.vocab_size) and np.isfinite(logits).all()
  # one loader: a step folder of the workdir loads that step, with the run's process
  steps = sorted(int(p.name) for p in (trained / "checkpoints").iterdir() if p.name.isdigit())
  first = dlm.from_pretrained(trained / "checkpoints" / str(steps[0]))
  assert first.step == steps[0] and m.step == steps[-1] and first.process is not None
  assert first.process.mask_id == m.ids["mask"] == m.tokenizer.mask_id
  # a step folder copied on its own: config and tokenizer come from its meta item
  import shutil
  from dlm.errors import UserError
  alone = tmp_path / "alone"
  shutil.copytree(trained / "checkpoints" / str(steps[0]), alone)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  copy = dlm.from_pretrained(alone)
  assert copy.step == steps[0] and copy.tokenizer.encode("def x") == m.tokenizer.encode("def x")
  np.testing.assert_array_equal(copy.logits(ids), first.logits(ids))
  (alone / "meta" / "metadata").write_text("{}")  # no longer what was saved
  with pytest.raises(UserError, match="does not match its sha256 digest") as e:
    dlm.from_pretrained(alone)
  assert "\n" not in str(e.value)
  out = convert_workdir.export(trained, tmp_path / "hf")  # a LLaDA-format folder
  again = dlm.from_pretrained(out)
  np.testing.assert_array_equal(again.logits(ids), logits)


@pytest.mark.parametrize("sampler", ["llada", "dream", "fast_dllm"])
def test_sample_with_each_sampler_and_trajectory(trained, tmp_path, sampler):
  traj = tmp_path / ("t.png" if sampler == "dream" else "t.html")
  own = {"llada": ["--block_length=8"], "dream": ["--alg=entropy"],
         "fast_dllm": ["--block_length=8", "--threshold=0.5"]}[sampler]
  out = dlm("sample", f"--workdir={trained}", f"--sampler={sampler}", "--prompt=import os\n",
            "--steps=8", "--max_new_tokens=16", "--num_samples=2", *own,
            f"--trajectory={traj}").stdout
  samples = out.split("===== sample ")[1:]
  assert len(samples) == 2 and all(f"({sampler}, nfe " in s for s in samples)
  assert all(s.split("\n", 1)[1].startswith("import os\n") for s in samples)
  assert traj.exists() and traj.stat().st_size > 200
  if traj.suffix == ".html":
    assert traj.read_text().count("<div><b>") == int(samples[0].split("nfe ")[1].split(",")[0])
  bad = ["--max_new_tokens=10", "--block_length=4"] if sampler != "dream" else ["--top_p=2"]
  r = dlm("sample", f"--workdir={trained}", f"--sampler={sampler}", "--prompt=x", "--steps=4",
          *bad, check=False)
  assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1, r.stderr
  assert ("does not divide" if sampler != "dream" else "top_p") in r.stderr
