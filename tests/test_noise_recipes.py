"""Issue 22's recipes and extension point: ``configs/quickstart.py:uniform`` (UDLM), ``:sedd``,
``:d3pm``, ``:genmd4`` and ``:embed`` train, evaluate (bits per byte) and sample on the one loop, eval and
engine; a process written in a test-local file (tests/plugins/lazy_mask.py), named by
``module:Class``, does the same without a line in dlm/."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from recipes import ROOT, dlm

PLUGINS = str(ROOT / "tests" / "plugins")
# the stdlib's email package (29 files, ~370 KB; 1 in 5 for validation): a tokenizer and a
# token cache in seconds
EMAIL = str(pathlib.Path(__import__("sysconfig").get_paths()["stdlib"]) / "email")
SHORT = ["--config.train.steps=12", "--config.train.eval_every=1000",
         "--config.train.checkpoint_every=12", "--config.train.log_every=4",
         f"--config.data.root={EMAIL}", "--config.data.val_permille=200"]


def _config(arg: str):
  """The recipe's config with SHORT's overrides: trained from Python, in this process."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("quickstart", ROOT / "configs" / "quickstart.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(arg)
  for flag in SHORT:
    key, value = flag[len("--config."):].split("=")
    section, field = key.split(".")
    c[section][field] = value if field == "root" else int(value)
  return c


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> pathlib.Path:
  """One smoke workdir's tokenizer and token cache, copied into every run (one tokenizer)."""
  from dlm.data import inputs
  base = tmp_path_factory.mktemp("noise") / "base"
  base.mkdir()
  inputs.make_train_input(_config("smoke").data, base, batch_size=16, seed=0)
  return base


def _seeded(tmp_path: pathlib.Path, base: pathlib.Path, name: str) -> pathlib.Path:
  import test_resilience as res
  return res.seeded(tmp_path / name, base)


def _log(workdir: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("recipe, sampler, process", [("uniform", "ancestral", "uniform"),
                                                      ("sedd", "sedd", "sedd_absorbing"),
                                                      ("d3pm", "ancestral", "d3pm"),
                                                      ("genmd4", "ancestral", "genmd4"),
                                                      ("embed", "ddpm", "gaussian")])
def test_recipe_trains_evaluates_and_samples(recipe, sampler, process, data_dir, tmp_path):
  """From Python (the CLI runs the same functions; the test-local process below goes through
  the CLI): train 12 steps, eval in bits per byte, sample after a prompt with the recipe's
  sampler."""
  import dlm as dlm_api
  from dlm.eval import run_eval
  from dlm.train import loop
  workdir = _seeded(tmp_path, data_dir, recipe)
  loop.train(_config(f"smoke,{recipe}"), workdir)
  train = [x for x in _log(workdir) if "loss" in x]
  assert np.isfinite([x["loss"] for x in train]).all() and train[-1]["loss"] < train[0]["loss"]
  if recipe == "genmd4":  # the per-token exponents are learned: they left power_init = 1
    assert train[-1]["power_max"] - train[-1]["power_min"] > 1e-4
  if recipe == "embed":  # CDCD's warp is fitted to the cross-entropy as it trains
    assert train[-1]["warp_fit"] < train[0]["warp_fit"]
  got = run_eval.evaluate_workdir(workdir, max_rows=16)
  assert got["process"] == process and np.isfinite(got["bits_per_byte"]) and got["bits_per_byte"] > 0
  model = dlm_api.from_pretrained(workdir)
  prompt = np.asarray([model.tokenizer.encode("def ")], np.int32)
  out = model.generate(prompt, sampler=sampler, steps=4, gen_length=8)
  assert out.nfe == 4 + (sampler == "sedd")  # SEDD's last call is its denoising step
  assert out.sequences.shape == (1, prompt.shape[1] + 8)
  assert (out.sequences[:, :prompt.shape[1]] == prompt).all()


def test_a_process_from_a_test_local_file_trains_evaluates_and_samples(data_dir, tmp_path,
                                                                     monkeypatch):
  """Trained from the CLI, evaluated and sampled from Python: ``lazy_mask:LazyMaskProcess`` is
  found on the path both ways, and a workdir naming it is loaded only when trusted."""
  import dlm as dlm_api
  from dlm.errors import UserError
  from dlm.eval import run_eval
  workdir = _seeded(tmp_path, data_dir, "lazy")
  dlm("train", "--config=configs/quickstart.py:smoke", f"--workdir={workdir}",
      "--config.process.name=lazy_mask:LazyMaskProcess", "--config.loss.name=nelbo", *SHORT,
      pythonpath=PLUGINS)
  assert json.loads((workdir / "config.json").read_text())["process"]["name"] == \
      "lazy_mask:LazyMaskProcess"
  monkeypatch.syspath_prepend(PLUGINS)
  with pytest.raises(UserError, match="trust_config_code") as e:  # untrusted input: one line
    dlm_api.from_pretrained(workdir)
  assert "\n" not in str(e.value)
  got = run_eval.evaluate_workdir(workdir, max_rows=16, trust_config_code=True)
  assert got["process"] == "lazy_mask:LazyMaskProcess" and 0 < got["bits_per_byte"] < 20
  model = dlm_api.from_pretrained(workdir, trust_config_code=True)
  out = model.generate(np.asarray([model.tokenizer.encode("def ")], np.int32),
                       sampler="ancestral", steps=4, gen_length=8)
  assert out.nfe <= 4 and out.sequences.shape[1] == len(model.tokenizer.encode("def ")) + 8
