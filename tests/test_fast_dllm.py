"""Fast-dLLM threshold / fixed-quota decoding with no, prefix and dual KV caches, token for token."""

from __future__ import annotations

import dataclasses
import json
import pathlib

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
  full, cache = model.apply(model.params, x, None, fill_cache=True)
  cfg = model.model_cfg
  assert cache.k.shape == cache.v.shape == (cfg.num_layers, 2, cfg.num_kv_heads or cfg.num_heads,
                                            24, cfg.hd)
  win, same = model.apply(model.params, x[:, 8:16], None, cache=cache, cache_start=jnp.int32(8))
  assert same is cache  # a window pass hands the cache back as given
  np.testing.assert_allclose(win, full[:, 8:16], atol=1e-4, rtol=0)
  am = jnp.asarray([[1] * 24, [0] * 5 + [1] * 19], jnp.int32)  # row 1 left-padded by 5
  full, cache = model.apply(model.params, x, None, attention_mask=am, fill_cache=True)
  win, _ = model.apply(model.params, x[:, 8:16], None, cache=cache, cache_start=jnp.int32(8),
                       attention_mask=am)
  np.testing.assert_allclose(win, full[:, 8:16], atol=1e-4, rtol=0)


def test_bad_knobs(model):
  with pytest.raises(UserError, match="use_cache='all' unknown"):
    model.generate(np.array([[5, 6]]), sampler="fast_dllm", steps=2, gen_length=4,
                   block_length=2, use_cache="all")
  with pytest.raises(UserError, match=">= 2 steps per block"):
    model.generate(np.array([[5, 6]]), sampler="fast_dllm", steps=2, gen_length=4,
                   block_length=2, use_cache="dual")


@pytest.mark.parametrize("use_cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("threshold", [None, 0.5])
def test_padded_batch_equals_one_prompt_at_a_time(model, use_cache, threshold):
  a, b = [11, 12, 13, 14, 15, 16], [21, 22, 23]
  pad = model.ids["pad"]
  knobs = dict(sampler="fast_dllm", steps=8, gen_length=16, block_length=8, threshold=threshold,
               use_cache=use_cache, temperature=0.0, remasking="low_confidence")
  out = model.generate(np.array([a, [pad] * 3 + b]), np.array([[1] * 6, [0] * 3 + [1] * 3]),
                       **knobs)
  one_a = model.generate(np.array([a]), **knobs)
  one_b = model.generate(np.array([b]), **knobs)
  np.testing.assert_array_equal(out.sequences[0], one_a.sequences[0])
  np.testing.assert_array_equal(out.sequences[1, 3:], one_b.sequences[0])
  assert out.nfe >= max(one_a.nfe, one_b.nfe) if threshold else out.nfe == one_a.nfe


def test_cached_passes_on_a_shifted_model_are_refused():
  dream = dlm.from_pretrained(FIXTURE.parent / "dream-tiny")
  with pytest.raises(UserError, match="needs a model with unshifted logits"):
    dream.generate(np.array([[5, 6]]), sampler="fast_dllm", steps=4, gen_length=4,
                   use_cache="dual", threshold=0.9)
