"""The denoiser: logical axis names, bidirectionality, segments, adaLN-zero, dtypes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dlm.models import transformer

CFG = transformer.ModelConfig(vocab_size=37, d_model=32, num_layers=2, num_heads=4, mlp_dim=64)


@pytest.fixture(scope="module")
def model():
  graphdef, state = nnx.split(transformer.init_model(CFG, 0))
  return _logits_of(transformer.apply_fn(graphdef)), nnx.to_pure_dict(state), state


def _logits_of(apply):
  """The contract's apply -> (logits, cache); these tests look at the logits (no cache asked:
  the cache that comes back is None)."""
  def logits(*args, **kw):
    out, cache = apply(*args, **kw)
    assert cache is None
    return out
  return jax.jit(logits)


def test_every_parameter_has_logical_names(model):
  _, params, state = model
  specs = nnx.to_pure_dict(nnx.get_partition_spec(state))
  known = {"batch", "length", "embed", "heads", "kv", "mlp", "vocab", "layers", None}
  for (path, p), (_, spec) in zip(jax.tree_util.tree_leaves_with_path(params),
                                  jax.tree_util.tree_leaves_with_path(specs)):
    assert len(spec) == p.ndim, path
    assert set(spec) <= known, path
    assert p.dtype == jnp.float32
  # scanned layers carry a leading 'layers' axis
  assert specs["blocks"]["attn"]["wq"][0] == "layers"
  assert params["blocks"]["attn"]["wq"].shape[0] == CFG.num_layers


def test_bidirectional(model):
  apply, params, _ = model
  x = jnp.arange(10, dtype=jnp.int32)[None] % CFG.vocab_size
  y = x.at[0, -1].set(5)
  a, b = apply(params, x), apply(params, y)
  assert a.shape == (1, 10, CFG.vocab_size) and a.dtype == jnp.float32
  assert not np.allclose(a[0, 0], b[0, 0])  # the first position sees the last


def test_segments_do_not_attend_across(model):
  apply, params, _ = model
  x = jnp.array([[1, 2, 3, 4, 5, 6]], jnp.int32)
  y = x.at[0, 5].set(9)
  seg = jnp.array([[0, 0, 0, 1, 1, 1]], jnp.int32)
  a = apply(params, x, segment_ids=seg)
  b = apply(params, y, segment_ids=seg)
  np.testing.assert_allclose(a[0, :3], b[0, :3], atol=1e-6)
  # and a segment alone gives the same logits as the packed row (RoPE is relative)
  alone = apply(params, x[:, :3])
  np.testing.assert_allclose(a[0, :3], alone[0], atol=1e-5)


def test_padding_mask_hides_keys(model):
  apply, params, _ = model
  x = jnp.array([[7, 8, 1, 2, 3]], jnp.int32)
  y = x.at[0, 0].set(30)
  m = jnp.array([[0, 1, 1, 1, 1]], jnp.int32)
  np.testing.assert_allclose(apply(params, x, attention_mask=m)[0, 1:],
                             apply(params, y, attention_mask=m)[0, 1:], atol=1e-6)


def test_adaln_zero_starts_time_independent_then_conditions():
  cfg = transformer.ModelConfig(vocab_size=11, d_model=32, num_layers=2, num_heads=2,
                                time_conditioning=True)
  graphdef, state = nnx.split(transformer.init_model(cfg, 1))
  apply = _logits_of(transformer.apply_fn(graphdef))
  params = nnx.to_pure_dict(state)
  x = jnp.array([[1, 2, 3, 4]], jnp.int32)
  np.testing.assert_allclose(apply(params, x, jnp.array([0.1])), apply(params, x, jnp.array([0.9])),
                             atol=1e-6)
  params = jax.tree.map(lambda a: a, params)
  params["blocks"]["ada"]["w"] = jnp.ones_like(params["blocks"]["ada"]["w"]) * 0.05
  assert not np.allclose(apply(params, x, jnp.array([0.1])), apply(params, x, jnp.array([0.9])))


def test_bfloat16_compute_close_to_float32():
  cfg32 = CFG
  cfg16 = transformer.ModelConfig(**{**CFG.__dict__, "dtype": "bfloat16"})
  g32, s32 = nnx.split(transformer.init_model(cfg32, 0))
  g16, s16 = nnx.split(transformer.init_model(cfg16, 0))
  x = jnp.arange(8, dtype=jnp.int32)[None]
  a = transformer.apply_fn(g32)(nnx.to_pure_dict(s32), x)[0]
  b = transformer.apply_fn(g16)(nnx.to_pure_dict(s16), x)[0]
  assert b.dtype == jnp.float32  # logits are always float32
  assert float(jnp.max(jnp.abs(a - b))) < 0.1 * float(jnp.std(a)) + 0.1
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.to_pure_dict(s16)))


def test_remat_gives_same_gradients():
  cfg_r = transformer.ModelConfig(**{**CFG.__dict__, "remat": "full"})
  g, s = nnx.split(transformer.init_model(CFG, 0))
  gr, _ = nnx.split(transformer.init_model(cfg_r, 0))
  params = nnx.to_pure_dict(s)
  x = jnp.arange(8, dtype=jnp.int32)[None]
  loss = lambda apply: lambda p: jnp.sum(apply(p, x)[0] ** 2)
  a = jax.grad(loss(transformer.apply_fn(g)))(params)
  b = jax.grad(loss(transformer.apply_fn(gr)))(params)
  for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6)


def test_bad_model_config_names_the_fix():
  with pytest.raises(ValueError, match="num_heads"):
    transformer.ModelConfig(vocab_size=10, d_model=30, num_heads=4)
  with pytest.raises(ValueError, match="unknown keys"):
    transformer.ModelConfig.from_config({"d_model": 32, "dmodel": 3}, vocab_size=10)
