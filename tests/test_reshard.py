"""A checkpoint saved under one mesh restores under another and training continues identically."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import shutil

import pytest

from dlm.train import loop

ROOT = pathlib.Path(__file__).resolve().parents[1]


def smoke_config(**mesh):
  spec = importlib.util.spec_from_file_location("quickstart", ROOT / "configs" / "quickstart.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("smoke")
  c.train.steps = 6
  c.train.log_every = 1
  c.train.eval_every = 1000
  c.train.checkpoint_every = 3
  c.mesh.update(mesh)
  return c


def losses(workdir: pathlib.Path) -> dict[int, float]:
  out = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    r = json.loads(line)
    if "loss" in r:
      out[r["step"]] = r["loss"]
  return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> pathlib.Path:
  """6 uninterrupted steps on a data-parallel 8x1x1 mesh."""
  workdir = tmp_path_factory.mktemp("ref")
  loop.train(smoke_config(data=8, fsdp=1, tensor=1), workdir)
  return workdir


@pytest.mark.parametrize("second", [dict(data=1, fsdp=8, tensor=1), dict(data=2, fsdp=2, tensor=2)],
                         ids=["to_1x8x1", "to_2x2x2"])
def test_restore_under_another_mesh_continues_with_same_loss(reference, tmp_path, second):
  workdir = tmp_path / "run"
  workdir.mkdir()
  for name in ("tokenizer.model", "data"):  # reuse the prepared data, skip retraining the tokenizer
    src = reference / name
    (shutil.copytree if src.is_dir() else shutil.copy)(src, workdir / name)
  cfg = smoke_config(data=8, fsdp=1, tensor=1)
  cfg.train.steps = 3  # stop early; the lr is still in its 10-step warmup, as in the reference
  loop.train(cfg, workdir)  # saves step 3 under 8x1x1
  loop.train(smoke_config(**second), workdir)  # restores under another mesh, runs steps 4..6
  ref, got = losses(reference), losses(workdir)
  assert sorted(got) == list(range(1, 7))
  for step in range(1, 7):
    assert got[step] == pytest.approx(ref[step], abs=1e-5), step
