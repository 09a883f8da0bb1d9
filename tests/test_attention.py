"""Attention backends: the splash (Pallas TPU) kernel in interpret mode equals xla on every mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm import parallel
from dlm.models import attention, transformer

B, L, N, H = 2, 256, 4, 32


def _inputs(kv_heads: int, seed: int = 0):
  ks = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(ks[0], (B, L, N, H), jnp.float32)
  k = jax.random.normal(ks[1], (B, L, kv_heads, H), jnp.float32)
  v = jax.random.normal(ks[2], (B, L, kv_heads, H), jnp.float32)
  return q, k, v


def _masks(case: str):
  """(kind, block_size, segment_ids, attention_mask, real-query rows [B, L])."""
  seg = am = None
  real = np.ones((B, L), bool)
  kind, block = "bidirectional", 0
  if case == "causal":
    kind = "causal"
  elif case == "block_causal":
    kind, block = "block_causal", 32
  elif case == "padding":  # left padding: row 0 has 37 pads, row 1 none
    pads = np.zeros((B, L), np.int32)
    pads[0, 37:] = 1
    pads[1, :] = 1
    am, real = jnp.asarray(pads), pads.astype(bool)
  elif case == "segments":  # packed documents
    s = np.zeros((B, L), np.int32)
    s[0, 100:] = 1
    s[0, 190:] = 2
    s[1, 7:] = 1
    seg = jnp.asarray(s)
  elif case == "bd3":  # x_t (+) x_0 of 2 x 128 tokens, blocks of 16
    kind, block = "bd3", 16
  elif case == "block_causal_segments_padding":
    kind, block = "block_causal", 64
    s = np.zeros((B, L), np.int32)
    s[1, 128:] = 1
    pads = np.ones((B, L), np.int32)
    pads[0, :20] = 0
    seg, am, real = jnp.asarray(s), jnp.asarray(pads), pads.astype(bool)
  return kind, block, seg, am, real


CASES = ["bidirectional", "causal", "block_causal", "padding", "segments",
         "block_causal_segments_padding", "bd3"]


def _compare(case: str, kv_heads: int, mesh=None, rules=None):
  q, k, v = _inputs(kv_heads)
  kind, block, seg, am, real = _masks(case)
  w = jnp.asarray(real, jnp.float32)[:, :, None, None]

  def run(backend):
    def f(q, k, v):
      return attention.attend(q, k, v, backend=backend, kind=kind, block_size=block,
                              segment_ids=seg, attention_mask=am)

    def loss(q, k, v):  # a random linear readout of the real query rows
      out = f(q, k, v)
      return jnp.sum(w * out * jnp.cos(jnp.arange(H, dtype=jnp.float32)))

    def both(q, k, v):
      return f(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    if mesh is None:
      return jax.jit(both)(q, k, v)
    with parallel.use_mesh(mesh, rules):
      return jax.jit(both)(q, k, v)

  out_x, grads_x = run("xla")
  out_s, grads_s = run("splash")
  out_x, out_s = np.asarray(out_x), np.asarray(out_s)
  np.testing.assert_allclose(out_s[real], out_x[real], atol=1e-5, rtol=0)
  for gs, gx in zip(grads_s, grads_x):
    np.testing.assert_allclose(np.asarray(gs), np.asarray(gx), atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_splash_matches_xla_forward_and_gradient(case):
  _compare(case, kv_heads=N)


@pytest.mark.parametrize("case", ["causal", "padding"])
def test_splash_gqa_matches_xla(case):
  _compare(case, kv_heads=2)


def test_splash_bd3_mask_skips_the_empty_tiles():
  """x_0 never sees x_t: the kernel's block-sparsity table keeps only the tiles with an allowed
  pair, so the x_0 -> x_t quarter is never computed (and, at 128-token tiles over 2 x 384,
  the empty tiles of the block-diagonal and offset-causal parts either)."""
  for length, kept in ((256, 3), (512, 3), (768, 3 + 6 + 6)):
    blk = attention.splash_block("bd3", length)
    n = length // blk
    dense = attention.kind_mask("bd3", 16, length, length)
    tiles = dense.reshape(n, blk, n, blk).any(axis=(1, 3))
    assert tiles.sum() == kept < n * n, (length, tiles.astype(int))
    kern = attention._splash_kernel("bd3", 16, length, 1, False, True)
    assert np.count_nonzero(np.asarray(kern.fwd_mask_info.block_mask)) == kept


@pytest.mark.parametrize("case", ["bd3"])
def test_splash_gqa_bd3_matches_xla(case):
  _compare(case, kv_heads=2)


def test_splash_sharded_over_batch_and_heads_matches_xla():
  """Under a (data 2, tensor 2) mesh the kernel runs per shard (shard_map) and still agrees."""
  mesh = parallel.make_mesh({"data": 2, "fsdp": 1, "tensor": 2}, jax.devices()[:4])
  _compare("block_causal_segments_padding", kv_heads=2, mesh=mesh, rules=parallel.DEFAULT_RULES)


def test_mask_kinds_closed_forms():
  """block_causal with block 1 is causal; with block L it is bidirectional; causal is tril."""
  np.testing.assert_array_equal(attention.kind_mask("block_causal", 1, 16, 16),
                                np.tril(np.ones((16, 16), bool)))
  np.testing.assert_array_equal(attention.kind_mask("block_causal", 16, 16, 16),
                                np.ones((16, 16), bool))
  m = attention.kind_mask("block_causal", 4, 8, 8)
  assert m[0, 3] and m[3, 3] and not m[3, 4] and m[4, 7] and m[7, 0]
  # a window of queries at absolute positions 4..5 (a KV-cached pass) sees rows 4..5 of the mask
  np.testing.assert_array_equal(attention.kind_mask("block_causal", 4, 2, 8, q_offset=4), m[4:6])


def test_model_with_splash_equals_model_with_xla():
  """The whole denoiser (a causal GQA config) gives the same logits with either kernel."""
  base = dict(vocab_size=64, d_model=64, num_layers=2, num_heads=4, num_kv_heads=2,
              mlp_dim=128, mask_kind="causal")
  x = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 128)), jnp.int32)
  out = {}
  for backend in ("xla", "splash"):
    cfg = transformer.ModelConfig(**base, attention=backend)
    model = transformer.init_model(cfg, 0)
    out[backend] = np.asarray(model(x)[0])
  np.testing.assert_allclose(out["splash"], out["xla"], atol=1e-4, rtol=0)


def test_bad_attention_config_is_one_line():
  with pytest.raises(ValueError, match="model.attention='flash' unknown"):
    transformer.ModelConfig(vocab_size=8, attention="flash")
  with pytest.raises(ValueError, match="model.mask_kind='sliding' unknown"):
    transformer.ModelConfig(vocab_size=8, mask_kind="sliding")
  with pytest.raises(ValueError, match="needs model.block_size"):
    transformer.ModelConfig(vocab_size=8, mask_kind="block_causal")
  q, k, v = _inputs(N)
  with pytest.raises(ValueError, match="multiple of 128"):
    attention.attend(q[:, :100], k[:, :100], v[:, :100], backend="splash")


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("case", CASES)
def test_xla_backend_equals_dot_product_attention(case, kv_heads):
  """The ``xla`` backend (normalized after the value product, heads grouped per kv head) is
  ``jax.nn.dot_product_attention``'s math: forward and gradient, on every mask, MHA and GQA."""
  q, k, v = _inputs(kv_heads, seed=3)
  kind, block, seg, am, real = _masks(case)
  mask = attention.dense_mask(kind, block, L, L, segment_ids=seg, attention_mask=am)
  w = jnp.asarray(real, jnp.float32)[:, :, None, None] * jnp.cos(jnp.arange(H, dtype=jnp.float32))

  def both(f):
    loss = lambda q, k, v: jnp.sum(w * f(q, k, v))
    return jax.jit(lambda q, k, v: (f(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(
        q, k, v)

  out, grads = both(lambda q, k, v: attention.attend(q, k, v, kind=kind, block_size=block,
                                                     segment_ids=seg, attention_mask=am))
  ref_out, ref_grads = both(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask))
  real = np.asarray(real)
  np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref_out)[real], atol=1e-5, rtol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5, rtol=1e-5)
