"""Sharded inference: every sampler gives one device's tokens on 8 fake CPU devices."""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from dlm.errors import UserError
from dlm.models import loader, transformer

MASK, EOS = 60, 61
MESHES = [(1, 1, 8), (1, 8, 1), (2, 2, 2)]  # (data, fsdp, tensor)


def _model(shift: bool) -> loader.DiffusionLM:
  """8 heads (4 key/value heads over 2 for 2x2x2), widths divisible by 8, sharpened logits."""
  cfg = transformer.ModelConfig(vocab_size=64, d_model=64, num_layers=2, num_heads=8,
                                num_kv_heads=8, mlp_dim=128, shift_logits=shift)
  graphdef, state = nnx.split(transformer.init_model(cfg, 0))
  params = nnx.to_pure_dict(state)
  params["head"] = params["head"] * 40.0  # confident, well-separated logits: no near ties
  config = ml_collections.ConfigDict({"process": {"name": "masked",
                                                  "schedule": {"name": "linear", "eps": 1e-4}}})
  return loader.DiffusionLM(config=config, model_cfg=cfg, params=params,
                            ids={"mask": MASK, "eos": EOS, "pad": EOS, "bos": None},
                            tokenizer=None, apply=transformer.apply_fn(graphdef),
                            decode_layout=False)


CASES = {  # sampler -> (shifted model, knobs)
    "llada": (False, dict(steps=4, gen_length=8, block_length=4)),
    "fast_dllm": (False, dict(steps=4, gen_length=8, block_length=4, threshold=0.9,
                              use_cache="dual")),
    "dream": (True, dict(steps=4, max_new_tokens=8, alg="entropy", temperature=0.5)),
    "ancestral": (False, dict(steps=4, gen_length=8, temperature=1.0)),
}


@pytest.fixture(scope="module")
def prompts():
  return np.random.default_rng(0).integers(3, 58, (2, 6)).astype(np.int32)


@pytest.mark.parametrize("sampler", list(CASES))
def test_each_sampler_matches_one_device_on_every_mesh(sampler, prompts):
  shift, knobs = CASES[sampler]
  one = _model(shift).generate(prompts, sampler=sampler, seed=3, **knobs)
  for shape in MESHES:
    m = loader.shard(_model(shift), dict(zip(("data", "fsdp", "tensor"), shape)))
    leaf = m.params["head"]
    assert len(leaf.sharding.device_set) == 8 and not leaf.sharding.is_fully_replicated
    out = m.generate(prompts, sampler=sampler, seed=3, **knobs)
    np.testing.assert_array_equal(out.sequences, one.sequences, err_msg=f"{sampler} {shape}")
    assert out.nfe == one.nfe


def test_a_mesh_that_does_not_divide_the_model_or_the_batch_is_one_line(prompts):
  with pytest.raises(UserError, match="does not divide") as e:
    loader.shard(_model(False), {"data": 1, "fsdp": 1, "tensor": 3}, devices=jax.devices()[:3])
  assert "\n" not in str(e.value) and "tensor" in str(e.value)
  m = loader.shard(_model(False), {"data": 4, "fsdp": 2, "tensor": 1})
  with pytest.raises(UserError, match="data=4") as e:
    m.generate(prompts[:1].repeat(3, 0), sampler="llada", steps=2, gen_length=4)
  assert "\n" not in str(e.value)
  with pytest.raises(UserError, match="config.mesh"):
    loader.shard(_model(False), {"data": 3, "fsdp": 1, "tensor": 1})  # 3 of 8 devices


def test_dlm_sample_on_a_mesh_from_the_command_line(tmp_path):
  """`dlm sample --config.mesh.fsdp=2 --config.mesh.tensor=2` on 4 devices: one device's text."""
  import os
  import pathlib
  import shutil
  import subprocess
  import sys
  from test_untrusted_sample import _word_tokenizer  # the word-level tokenizer over llada-tiny
  root = pathlib.Path(__file__).resolve().parents[1]
  d = tmp_path / "llada"
  shutil.copytree(root / "tests" / "fixtures" / "llada-tiny", d)
  _word_tokenizer(d)

  def dlm(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "dlm.main", "sample", f"--hf={d}",
                           "--prompt=w4 w5 w6", "--steps=4", "--length=12", "--num_samples=2",
                           "--batch_size=2", "--sampler=llada", *args],
                          capture_output=True, text=True, env=env, cwd=root, timeout=300)

  one = dlm("--config.mesh.data=1", "--config.mesh.fsdp=1", "--config.mesh.tensor=1",
            "--compile_cache=off")
  assert one.returncode != 0 and "4 are available" in one.stderr  # 1 of 4 devices: one line
  ref = dlm()  # no mesh: one device
  sharded = dlm("--config.mesh.fsdp=2", "--config.mesh.tensor=2")
  assert ref.returncode == 0 and sharded.returncode == 0, ref.stderr + sharded.stderr
  assert sharded.stdout == ref.stdout and "===== sample 1" in sharded.stdout
  bad = dlm("--config.mesh.tensor=3")
  assert bad.returncode == 1 and len(bad.stderr.strip().splitlines()) == 1
  assert "does not divide" in bad.stderr or "devices" in bad.stderr
  wrong = dlm("--config.sample.steps=3")
  assert wrong.returncode == 2 and "only --config.mesh" in wrong.stderr
