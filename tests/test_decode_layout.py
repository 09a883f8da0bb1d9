"""The decode layout (dlm/models/decode.py) is the same network: logits, caches, windows."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import dlm
from dlm.models import decode, layers, transformer

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"


@pytest.mark.parametrize("kw", [
    dict(),
    dict(num_kv_heads=2, qkv_bias=True, pad_positions="cumsum"),  # Dream-shaped
    dict(tie_embeddings=True, shift_logits=True),
    dict(time_conditioning=True, mlp_dim=96),
], ids=["plain", "gqa_bias_cumsum", "tied_shifted", "time_conditioned"])
def test_decode_layout_computes_the_same_network(kw, monkeypatch):
  cfg = transformer.ModelConfig(vocab_size=40, d_model=64, num_layers=3, num_heads=4, **kw)
  graphdef, state = nnx.split(transformer.init_model(cfg, 0))
  params = nnx.to_pure_dict(state)
  keys = iter(jax.random.split(jax.random.key(1), 64))  # perturb: zero-initialised biases/gates
  params = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(next(keys), a.shape), params)
  apply, dapply = transformer.apply_fn(graphdef), decode.apply_fn(cfg)
  dparams = decode.layout(cfg, params)
  assert transformer.count_params(dparams) == transformer.count_params(params)
  x = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 20)), jnp.int32)
  t = jnp.array([0.3, 0.7]) if cfg.time_conditioning else None
  am = jnp.asarray(np.array([[1] * 20, [0] * 5 + [1] * 15]), jnp.int32)

  def outputs(apply, params):  # every kind of pass, in one compiled program
    logits, cache = apply(params, x, t, fill_cache=True)
    # a filling window pass over other tokens: the cache with them written in, in place
    _, filled = apply(params, x[:, ::-1][:, 6:14], t, cache=cache, cache_start=jnp.int32(6),
                      fill_cache=True)
    full, filled = cache.stacked(), filled.stacked()  # decode layout: one buffer per layer
    out = (logits, apply(params, x, t, attention_mask=am)[0], full.k, full.v, filled.k,
           filled.v, apply(params, x[:, 6:14], t, cache=cache, cache_start=jnp.int32(6))[0])
    if cfg.pad_positions == "index":  # a padded window pass masks the cached pad keys
      out += (apply(params, x[:, 6:14], t, cache=cache, cache_start=jnp.int32(6),
                    attention_mask=am)[0],)
    return out

  want = jax.jit(lambda p: outputs(apply, p))(params)
  full_k, filled_k = np.asarray(want[2]), np.asarray(want[4])  # [layers, B, kv, L, H]
  outside = lambda a: np.delete(a, range(6, 14), 3)
  np.testing.assert_array_equal(outside(filled_k), outside(full_k))
  assert not np.allclose(filled_k[..., 6:14, :], full_k[..., 6:14, :])
  # layer 0's keys depend on their own token and position only: those of a full pass over the
  # sequence with the window's tokens in it
  x_in = x.at[:, 6:14].set(x[:, ::-1][:, 6:14])
  ref = np.asarray(apply(params, x_in, t, fill_cache=True)[1].stacked().k)
  np.testing.assert_allclose(filled_k[0, ..., 6:14, :], ref[0, ..., 6:14, :], atol=1e-5, rtol=0)
  # passes of <= FEW_ROWS rows (all of these) run their matmuls as (w @ x.T).T; 0: row-major
  for few_rows in ((layers.FEW_ROWS, 0) if not kw else (layers.FEW_ROWS,)):
    monkeypatch.setattr(layers, "FEW_ROWS", few_rows)
    got = jax.jit(lambda p: outputs(dapply, p))(dparams)
    for a, b in zip(want, got):
      assert a.shape == b.shape
      scale = float(jnp.max(jnp.abs(a)))
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=2e-6 * scale, rtol=0)


def test_a_sampler_compiles_once_per_knobs():
  """Repeated generate calls reuse the compiled loop (a new jit per call would retrace)."""
  m = dlm.from_pretrained(FIXTURES / "llada-tiny")
  assert m.sampling[1] is not m.apply  # CPU: decode layout by default
  knobs = dict(steps=4, gen_length=8, block_length=4)
  a = m.generate(np.array([[5, 6, 7]]), sampler="llada", **knobs)
  b = m.generate(np.array([[5, 6, 7]]), sampler="llada", **knobs)
  np.testing.assert_array_equal(a.sequences, b.sequences)
  (fn,) = m.__dict__["_jitted"].values()
  assert fn._cache_size() == 1
  m.generate(np.array([[5, 6, 7]]), sampler="llada", **dict(knobs, steps=8))
  assert len(m.__dict__["_jitted"]) == 2
  m.decode_layout = False  # switching layouts after a call takes effect
  assert m.sampling[1] is m.apply
  c = m.generate(np.array([[5, 6, 7]]), sampler="llada", **knobs)
  assert len(m.__dict__["_jitted"]) == 3
  np.testing.assert_array_equal(c.sequences, a.sequences)


def test_sampling_params_are_converted_once_and_follow_new_weights():
  m = dlm.from_pretrained(FIXTURES / "llada-tiny")
  knobs = dict(steps=4, gen_length=8, block_length=4)
  a = m.generate(np.array([[5, 6, 7]]), sampler="llada", **knobs)
  kept = m.sampling_params()
  assert decode.is_decode_layout(kept) and m.sampling_params() is kept
  assert decode.layout(m.model_cfg, kept) is kept  # prepare passes it through
  m.params = jax.tree.map(lambda w: -w, m.params)  # new weights: converted again
  assert m.sampling_params() is not kept
  b = m.generate(np.array([[5, 6, 7]]), sampler="llada", **knobs)
  m.keep_sampling_params = False  # converted inside each call instead
  assert m.sampling_params() is m.params
  again = m.generate(np.array([[5, 6, 7]]), sampler="llada", **knobs)
  np.testing.assert_array_equal(again.sequences, b.sequences)
  assert not np.array_equal(a.sequences, b.sequences)
