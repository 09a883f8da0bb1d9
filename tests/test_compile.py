"""`dlm compile`: every shipped pod recipe compiles for its TPU slice on this CPU host and fits HBM.

Needs libtpu (`pip install -e '.[tpu]'`, which the README's test command and CI install);
without it these tests skip and say so.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

from dlm.compile import report, topology
from dlm.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
POD_RECIPES = ("mdlm_small", "llada_1b", "llada_8b")
# Each pod compile takes ~1-2 CPU-minutes here: the default run leaves them to `.ci/run`, which
# compiles all three (DLM_TEST_ALL_POD_RECIPES=1) after the README's command; the default run
# still lowers and compiles the llada_8b sampler loop for small slices (below).
ALL_POD_RECIPES = os.environ.get("DLM_TEST_ALL_POD_RECIPES") == "1"
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason="libtpu is not installed: pip install -e '.[tpu]' to compile for TPUs")


def _recipe(name: str, arg: str | None = None):
  spec = importlib.util.spec_from_file_location(f"recipe_{name}", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module, module.get_config(arg)


def test_slice_names_resolve_to_their_topologies():
  for name, topo, chips in [("v5p-128", "v5p:4x4x4", 64), ("v5e-256", "v5e:16x16", 256),
                            ("v6e-16", "v6e:4x4", 16), ("v4-64", "v4:2x4x4", 32),
                            ("v5litepod-8", "v5e:2x4", 8), ("v5p:2x2x4", "v5p:2x2x4", 16)]:
    s = topology.parse(name)
    assert (s.topology, s.num_chips) == (topo, chips), name
  for bad in ("v9-8", "v5p-100", "tpu", "v5e:4x4x4"):
    with pytest.raises(UserError, match="unknown TPU topology") as e:
      topology.parse(bad)
    assert "\n" not in str(e.value)


@needs_libtpu
@pytest.mark.parametrize("name", [
    n if ALL_POD_RECIPES else pytest.param(n, marks=pytest.mark.skip(
        reason="~1-2 CPU-min each: DLM_TEST_ALL_POD_RECIPES=1 compiles it (.ci/run does)"))
    for n in POD_RECIPES])
def test_pod_recipe_compiles_and_fits_its_slice(name):
  module, config = _recipe(name)
  r = report.compile_report(config, module.TOPOLOGY)
  assert r["devices"] == topology.parse(module.TOPOLOGY).num_chips
  assert r["total_bytes"] == (r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"]
                              + r["temp_bytes"] + r["code_bytes"])
  assert r["fits"], report.format_report(r)
  assert r["total_bytes"] <= (1 - r["margin"]) * r["hbm_bytes"]
  # The state is sharded, not replicated: arguments are about 1/devices of params + Adam (12 B/p).
  state_bytes = r["params"] * (12 + (4 if config.train.ema_decay > 0 else 0))
  assert r["argument_bytes"] < 2 * state_bytes / r["devices"] + 2**28
  assert sum(r["collectives"].values()) > 0  # a sharded step communicates
  # The projection is the stated formula: model FLOPs / (devices * peak * MFU).
  expected = r["model_flops_per_step"] / (r["devices"] * r["peak_flops_per_device"] * r["mfu"])
  assert abs(r["projected_step_s"] - expected) <= 1e-9 * expected


@needs_libtpu
@pytest.mark.parametrize("topo,fsdp,tensor", [("v5e-8", -1, 1)] + [
    c if ALL_POD_RECIPES else pytest.param(*c, marks=pytest.mark.skip(
        reason="~10 CPU-s each: DLM_TEST_ALL_POD_RECIPES=1 compiles it (.ci/run does)"))
    for c in [("v5e-8", 1, 8), ("v5p-8", -1, 1)]])
def test_llada_8b_sampler_loop_compiles_for_a_small_slice(topo, fsdp, tensor):
  """The whole LLaDA sampler loop of LLaDA-8B (512 calls), sharded as `dlm sample` shards it:
  bfloat16 weights split over the slice (not replicated), prompts over `data`."""
  _, config = _recipe("llada_8b")
  config.mesh.fsdp, config.mesh.tensor = fsdp, tensor
  r = report.compile_report(config, topo, what="sample")
  devices = topology.parse(topo).num_chips
  assert r["what"] == "sample" and r["sampler"] == "llada" and r["fits"], (
      report.format_report(r))
  assert r["knobs"]["steps"] == 512 and r["gen_length"] == 512 and r["param_dtype"] == "bfloat16"
  weights = 2 * r["params"]
  assert weights / devices <= r["argument_bytes"] < 1.05 * weights / devices + 2**24
  assert r["temp_bytes"] > 0 and sum(r["collectives"].values()) > 0
  # a [batch, length, vocab] float32 logits buffer per call: split over `tensor` when it is 8
  logits = 4 * r["batch"] * r["seq_len"] * 126_464
  assert (r["temp_bytes"] > logits) == (tensor == 1)
  assert "sampler llada (steps=512" in report.format_report(r)


@needs_libtpu
def test_a_recipe_that_does_not_fit_is_reported_as_not_fitting():
  """The quickstart with a 32k vocabulary and 32,768-row batches: 32 GiB of float32 logits per
  v5e chip (16 GiB of HBM)."""
  _, config = _recipe("quickstart")
  config.data.vocab_size = 32_768
  config.train.batch_size = 32_768
  small = report.compile_report(config, "v5e-16", margin=0.1)
  assert not small["fits"] and small["total_bytes"] > 0.9 * small["hbm_bytes"]
  config.train.batch_size = 64
  fits = report.compile_report(config, "v5e-16", margin=0.1)
  assert fits["fits"] and fits["temp_bytes"] < small["temp_bytes"] / 50


@needs_libtpu
def test_cli_compile_prints_the_report_and_a_json_last_line(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  cmd = [sys.executable, "-m", "dlm.main", "compile",
         f"--config={ROOT / 'configs' / 'quickstart.py'}:smoke", "--topology=v6e-16",
         "--what=sample"]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  assert r["what"] == "sample" and r["slice"] == "v6e-16" and r["fits"]
  assert "projected at 40% MFU" in proc.stdout
  # bad input: one line each
  for args, msg in [(["--topology=v7x-9"], "unknown TPU topology"),
                    (["--topology=v6e-16", "--config.mesh.data=3"], "devices but 16 are available")]:
    bad = cmd[:4] + [f"--config={ROOT / 'configs' / 'quickstart.py'}:smoke"] + args
    proc = subprocess.run(bad, capture_output=True, text=True, env=env)
    assert proc.returncode != 0
    err = [l for l in proc.stderr.strip().splitlines() if l.startswith("dlm compile: error")]
    assert len(err) == 1 and msg in err[0], proc.stderr[-2000:]


def test_missing_libtpu_is_a_one_line_error_naming_the_install(tmp_path):
  """With libtpu unimportable (as on a machine without the extra), the fix is named."""
  code = ("import sys; sys.modules['libtpu'] = None  # import libtpu now raises ImportError\n"
          "from dlm.main import run\n"
          f"run(['dlm', 'compile', '--config={ROOT / 'configs' / 'quickstart.py'}:smoke',"
          " '--topology=v5p-8'])\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
      "dlm compile: error: compiling for a TPU topology needs libtpu: pip install -e '.[tpu]'")
