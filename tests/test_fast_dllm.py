"""Fast-dLLM threshold / fixed-quota decoding with no, prefix and dual KV caches, token for token."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dlm
from dlm.errors import UserError
from dlm.sample import fast_dllm

FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "llada-tiny"
CASES = {c["name"]: c for c in json.loads((FIXTURE / "fastdllm.json").read_text())["cases"]}


@pytest.fixture(scope="module")
def model():
  return dlm.from_pretrained(FIXTURE)


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference(model, name):
  check_case(model, CASES[name])


@pytest.mark.parametrize("name", ["dual_cache_threshold0.9", "prefix_cache_fixed_quota"])
def test_stacked_layout_matches_reference(model, name):
  """The samplers' other parameter layout (GPU/TPU default; dlm/models/decode.py)."""
  check_case(dataclasses.replace(model, decode_layout=False), CASES[name])


def check_case(model, c) -> None:
  # every knob of the reference passed explicitly, temperature and remasking included
  out = model.generate(np.array(c["prompt"]), sampler="fast_dllm", steps=c["steps"],
                       gen_length=c["gen_length"], block_length=c["block_length"],
                       temperature=c["temperature"], remasking=c["remasking"],
                       threshold=c["threshold"], use_cache=c["use_cache"])
  np.testing.assert_array_equal(out.sequences, np.array(c["expected"]))
  assert out.nfe == c["nfe"]
  assert fast_dllm.unmasked_per_nfe(out.committed_at, out.nfe) == c["unmasked_per_nfe"]


def test_window_pass_on_a_fresh_cache_equals_the_full_forward(model):
  """With a cache filled from the same tokens, a window pass gives the full pass's logits."""
  x = jnp.asarray(np.random.default_rng(0).integers(3, 240, (2, 24)), jnp.int32)
  full, cache = model.apply(model.params, x, None, return_kv=True)
  cfg = model.model_cfg
  assert cache.k.shape == cache.v.shape == (cfg.num_layers, 2, cfg.num_kv_heads or cfg.num_heads,
                                            24, cfg.hd)
  win = model.apply(model.params, x[:, 8:16], None, kv_cache=cache, cache_start=jnp.int32(8))
  np.testing.assert_allclose(win, full[:, 8:16], atol=1e-4, rtol=0)


def test_bad_knobs(model):
  with pytest.raises(UserError, match="use_cache='all' unknown"):
    model.generate(np.array([[5, 6]]), sampler="fast_dllm", steps=2, gen_length=4,
                   block_length=2, use_cache="all")
  with pytest.raises(UserError, match=">= 2 steps per block"):
    model.generate(np.array([[5, 6]]), sampler="fast_dllm", steps=2, gen_length=4,
                   block_length=2, use_cache="dual")
