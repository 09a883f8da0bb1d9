"""Transformer building blocks: RMSNorm, RoPE, attention layer, SwiGLU, adaLN time conditioning.

Every parameter carries logical axis names (``nnx.with_partitioning``) and
every activation is constrained by name through ``dlm.parallel.constrain``.
Parameters are float32; ``dtype`` is the compute dtype.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dlm.models import attention
from dlm import parallel
from dlm.parallel import constrain

Array = jax.Array


def param(rngs: nnx.Rngs, init, shape: tuple[int, ...], names: tuple[str | None, ...]) -> nnx.Param:
  """A float32 parameter whose dimensions carry logical axis names (sharded later, by rules)."""
  return nnx.Param(init(rngs.params(), shape, jnp.float32), out_sharding=names, eager_sharding=False)


def _fan_in_init(fan_in: int):
  return jax.nn.initializers.normal(stddev=1.0 / math.sqrt(fan_in))


class RMSNorm(nnx.Module):
  """y = w * x / sqrt(mean(x^2) + eps) (Zhang & Sennrich 2019), computed in float32."""

  def __init__(self, dim: int, *, eps: float, rngs: nnx.Rngs):
    self.eps = eps
    self.scale = param(rngs, jax.nn.initializers.ones, (dim,), ("embed",))

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...]).astype(x.dtype)


# A decode-layout matmul over at most this many rows runs as (w @ x.T).T (see ``dense``).
FEW_ROWS = 64


def matmul(x: Array, w: Array, contract: int = 1) -> Array:
  """x [..., *in] @ w [*in, *out] -> [..., *out] (x's last ``contract`` axes against w's first).

  On XLA:CPU as one 2-D GEMM, the leading axes flattened into rows: XLA:CPU lowers the
  gradient of a 3-D product such as [32, 256, 192] @ [192, 4096] through a transposed copy
  of the cotangent and a slow dot (446 ms, against 105 ms flattened, on this 2-core CPU).
  Other platforms keep ``tensordot`` (their sharded layouts are chosen by the compiler).
  """
  if parallel.platform() != "cpu":
    return jnp.tensordot(x, w, axes=contract)
  lead, ins, outs = x.shape[:x.ndim - contract], w.shape[:contract], w.shape[contract:]
  y = x.reshape(math.prod(lead), math.prod(ins)) @ w.reshape(math.prod(ins), math.prod(outs))
  return y.reshape(*lead, *outs)


def dense(x: Array, w: Array) -> Array:
  """x [..., K] @ w.T for a decode-layout kernel w [N, K] (decode.py): y [..., N].

  Over few rows (a sampler's window pass) it is computed as (w @ x.T).T: XLA:CPU's
  GEMM then runs with the long axis as rows, about 1.5x faster at 32 rows of a 114M model.
  """
  rows = math.prod(x.shape[:-1])
  if rows > FEW_ROWS:
    return jnp.einsum("...k,nk->...n", x, w)
  return dense_t(w, x.reshape(rows, x.shape[-1]).T).T.reshape(*x.shape[:-1], w.shape[0])


def dense_t(w: Array, x_t: Array) -> Array:
  """w [N, K] @ x_t [K, R] -> [N, R], behind an optimization barrier that keeps XLA
  from folding a transpose of the result back into x @ w.T (see ``dense``)."""
  return jax.lax.optimization_barrier(w @ x_t)


def rotation(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
  """RoPE's (cos, sin), each [B, L, H/2], for int positions [B, L]."""
  inv_freq = theta ** (-jnp.arange(0, head_dim // 2, dtype=jnp.float32) * 2.0 / head_dim)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, L, H/2]
  return jnp.cos(angles), jnp.sin(angles)


@functools.lru_cache(maxsize=32)
def rotation_table(length: int, head_dim: int, theta: float) -> tuple[Array, Array]:
  """``rotation`` of positions 0..length-1, [1, length, H/2] each, evaluated once when traced
  (a constant of the program: XLA:CPU would otherwise fuse cos/sin into every layer's
  rotation and recompute them for every head)."""
  with jax.ensure_compile_time_eval():
    return rotation(jnp.arange(length, dtype=jnp.int32)[None], head_dim, theta)


def rope(x: Array, positions: Array | None, theta: float, *,
         cos_sin: tuple[Array, Array] | None = None, heads_major: bool = False) -> Array:
  """Rotary embedding, rotate-half form (Su et al. 2021, eq. 34; LLaMA layout).

  x: [B, L, N, H] ([B, N, L, H] if ``heads_major``); positions: [B, L] int, or
  ``cos_sin = rotation(positions, H, theta)`` computed once for all layers.
  Dimension j pairs with j + H/2.
  """
  h = x.shape[-1]
  cos, sin = rotation(positions, h, theta) if cos_sin is None else cos_sin
  heads = (slice(None), None) if heads_major else (slice(None), slice(None), None)
  cos, sin = cos[heads], sin[heads]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., : h // 2], x32[..., h // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class Attention(nnx.Module):
  """Multi-head (or grouped-query) attention with RoPE; the kernel is ``attention.attend``.

  With ``num_kv_heads < num_heads`` query head h reads kv head h // (num_heads / num_kv_heads)
  (GQA, Ainslie et al. 2023); ``qkv_bias`` adds q/k/v biases (Qwen2 / Dream);
  ``backend`` / ``mask_kind`` / ``block_size`` pick the kernel and the mask (attention.py).
  """

  def __init__(self, d_model: int, num_heads: int, head_dim: int, *, rope_theta: float,
               dtype: jnp.dtype, rngs: nnx.Rngs, num_kv_heads: int | None = None,
               qkv_bias: bool = False, backend: str = "xla", mask_kind: str = "bidirectional",
               block_size: int = 0, decode: bool = False,
               lora: tuple[int, float, tuple[str, ...]] | None = None):
    kv = num_kv_heads or num_heads
    self.num_heads, self.head_dim, self.rope_theta, self.dtype = num_heads, head_dim, rope_theta, dtype
    self.num_kv_heads = kv
    self.backend, self.mask_kind, self.block_size = backend, mask_kind, block_size
    self.decode = decode
    init = _fan_in_init(d_model)
    if decode:  # decode layout (decode.py): one fused q|k|v kernel and wo, both [out, in]
      f = (num_heads + 2 * kv) * head_dim
      self.wqkv = param(rngs, init, (f, d_model), ("heads", "embed"))
      self.bqkv = param(rngs, jax.nn.initializers.zeros, (f,), ("heads",)) if qkv_bias else None
      self.wo = param(rngs, _fan_in_init(num_heads * head_dim), (d_model, num_heads * head_dim),
                      ("embed", "heads"))
      return
    self.wq = param(rngs, init, (d_model, num_heads, head_dim), ("embed", "heads", "kv"))
    self.wk = param(rngs, init, (d_model, kv, head_dim), ("embed", "heads", "kv"))
    self.wv = param(rngs, init, (d_model, kv, head_dim), ("embed", "heads", "kv"))
    self.wo = param(rngs, _fan_in_init(num_heads * head_dim), (num_heads, head_dim, d_model),
                     ("heads", "kv", "embed"))
    zeros = jax.nn.initializers.zeros
    self.bq = param(rngs, zeros, (num_heads, head_dim), ("heads", "kv")) if qkv_bias else None
    self.bk = param(rngs, zeros, (kv, head_dim), ("heads", "kv")) if qkv_bias else None
    self.bv = param(rngs, zeros, (kv, head_dim), ("heads", "kv")) if qkv_bias else None
    self.lora_scale = add_lora(self, rngs, lora, {
        "wq": ((d_model,), ("embed",), (num_heads, head_dim), ("heads", "kv")),
        "wk": ((d_model,), ("embed",), (kv, head_dim), ("heads", "kv")),
        "wv": ((d_model,), ("embed",), (kv, head_dim), ("heads", "kv")),
        "wo": ((num_heads, head_dim), ("heads", "kv"), (d_model,), ("embed",))})

  def __call__(self, x: Array, positions: Array, masks: tuple[Array | None, Array | None],
               kv: tuple[Array, Array, Array] | None = None,
               rotations: tuple[Any, Any] | None = None) -> tuple[Array, Array, Array]:
    """-> (output [B, W, D], keys (pre-RoPE; causal: post-RoPE), values, heads-major as the
    cache holds them: this call's [B, kv, W, H]; with ``kv``, the cache's [B, kv, L, H] with
    the window's written in).

    ``masks = (segment_ids, attention_mask)``, each [B, L] or None.  ``rotations``: the
    queries' and keys' ``rotation`` tables, computed once for all layers (decode layout).

    ``kv = (k_all, v_all, start)``: cached keys (pre-RoPE; causal: post-RoPE) and values
    [B, kv, L, H] of all L positions; x is the window [start, start + W), whose fresh keys
    replace the cached ones, and whose queries attend to all L keys (see cache.py).  The window is
    written into the cache before the cache is read: the buffer is then updated in place
    (the old keys are read by nothing), where a write after the reads makes XLA copy it.
    """
    dt = self.dtype
    q, k, v = self._qkv(x)
    q, k, v = (constrain(a, ("batch", "length", "heads", "kv")) for a in (q, k, v))
    k_new, v_new = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    q_rot, k_rot = (None, None) if rotations is None else rotations
    q = rope(q, positions, self.rope_theta, cos_sin=q_rot)
    # A causal model's keys never move (an AR cache only grows): cached after RoPE, so a
    # decoding step rotates its one new key, not all L cached ones (see cache.py).
    rotated_cache = self.mask_kind == "causal"
    if kv is None:
      k = rope(k.astype(dt), positions, self.rope_theta, cos_sin=k_rot)
      if rotated_cache:
        k_new = jnp.swapaxes(k, 1, 2)
      segment_ids, attention_mask = masks[:2]
      visible = masks[2] if len(masks) > 2 else None  # an annealed mask's step draw
      out = attention.attend(q, k, v.astype(dt), backend=self.backend, kind=self.mask_kind,
                             block_size=self.block_size, segment_ids=segment_ids,
                             attention_mask=attention_mask, visible=visible)  # scale 1/sqrt(H)
    else:
      k_all, v_all, start = kv
      if rotated_cache:  # the window's keys at the queries' positions
        k_new = jnp.swapaxes(rope(k.astype(dt), positions, self.rope_theta, cos_sin=q_rot), 1, 2)
      k = jax.lax.dynamic_update_slice_in_dim(k_all, k_new.astype(k_all.dtype), start, axis=2)
      v = jax.lax.dynamic_update_slice_in_dim(v_all, v_new.astype(v_all.dtype), start, axis=2)
      k_new, v_new = k, v  # the cache with the window in
      if not rotated_cache:
        if k_rot is None:  # the cached keys sit at positions 0..L-1
          k_rot = rotation_table(k.shape[2], self.head_dim, self.rope_theta)
        k = rope(k.astype(dt), None, self.rope_theta, cos_sin=k_rot, heads_major=True)
      out = attention.attend_cached(q, k, v.astype(dt), key_mask=masks[1], kind=self.mask_kind,
                                    block_size=self.block_size, q_offset=start)
    out = constrain(out, ("batch", "length", "heads", "kv"))
    if self.decode:
      out = dense(out.reshape(*out.shape[:2], -1), self.wo[...].astype(dt))
      return out, k_new, v_new
    return with_lora(self, "wo", out, matmul(out, self.wo[...].astype(dt), 2), 2), k_new, v_new

  def _qkv(self, x: Array) -> tuple[Array, Array, Array]:
    """q [B, L, N, H] and k, v [B, L, kv, H]: three projections, or one fused in decode layout."""
    dt = self.dtype
    if self.decode:
      y = dense(x, self.wqkv[...].astype(dt))
      if self.bqkv is not None:
        y = y + self.bqkv[...].astype(dt)
      nq, nk = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
      q, k, v = y[..., :nq], y[..., nq:nq + nk], y[..., nq + nk:]
      return (q.reshape(*q.shape[:2], self.num_heads, self.head_dim),
              k.reshape(*k.shape[:2], self.num_kv_heads, self.head_dim),
              v.reshape(*v.shape[:2], self.num_kv_heads, self.head_dim))

    def project(name: str, w: nnx.Param, b: nnx.Param | None) -> Array:
      y = with_lora(self, name, x, matmul(x, w[...].astype(dt)))
      return y if b is None else y + b[...].astype(dt)

    return (project("wq", self.wq, self.bq), project("wk", self.wk, self.bk),
            project("wv", self.wv, self.bv))


class SwiGLU(nnx.Module):
  """FFN(x) = W_o (silu(W_g x) * W_u x) (Shazeer 2020, eq. 6)."""

  def __init__(self, d_model: int, mlp_dim: int, *, dtype: jnp.dtype, rngs: nnx.Rngs,
               decode: bool = False, lora: tuple[int, float, tuple[str, ...]] | None = None):
    self.dtype, self.decode = dtype, decode
    if decode:  # decode layout (decode.py): fused gate|up kernel and w_out, both [out, in]
      self.w_gate_up = param(rngs, _fan_in_init(d_model), (2 * mlp_dim, d_model), ("mlp", "embed"))
      self.w_out = param(rngs, _fan_in_init(mlp_dim), (d_model, mlp_dim), ("embed", "mlp"))
      return
    self.w_gate = param(rngs, _fan_in_init(d_model), (d_model, mlp_dim), ("embed", "mlp"))
    self.w_up = param(rngs, _fan_in_init(d_model), (d_model, mlp_dim), ("embed", "mlp"))
    self.w_out = param(rngs, _fan_in_init(mlp_dim), (mlp_dim, d_model), ("mlp", "embed"))
    self.lora_scale = add_lora(self, rngs, lora, {
        "w_gate": ((d_model,), ("embed",), (mlp_dim,), ("mlp",)),
        "w_up": ((d_model,), ("embed",), (mlp_dim,), ("mlp",)),
        "w_out": ((mlp_dim,), ("mlp",), (d_model,), ("embed",))})

  def __call__(self, x: Array) -> Array:
    dt = self.dtype
    if self.decode and math.prod(x.shape[:-1]) <= FEW_ROWS:  # all in [features, rows]
      x_t = x.reshape(-1, x.shape[-1]).T
      gate_t, up_t = jnp.split(dense_t(self.w_gate_up[...].astype(dt), x_t), 2, 0)
      y_t = dense_t(self.w_out[...].astype(dt), jax.nn.silu(gate_t) * up_t)
      return y_t.T.reshape(x.shape)
    if self.decode:
      gate, up = jnp.split(dense(x, self.w_gate_up[...].astype(dt)), 2, -1)
      h = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
      return dense(h, self.w_out[...].astype(dt))
    gate = with_lora(self, "w_gate", x, matmul(x, self.w_gate[...].astype(dt)))
    up = with_lora(self, "w_up", x, matmul(x, self.w_up[...].astype(dt)))
    h = constrain(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
    return with_lora(self, "w_out", h, matmul(h, self.w_out[...].astype(dt)))


def add_lora(module: nnx.Module, rngs: nnx.Rngs, lora: tuple[int, float, tuple[str, ...]] | None,
             kernels: dict[str, tuple[tuple[int, ...], tuple[str, ...], tuple[int, ...],
                                      tuple[str, ...]]]) -> float:
  """LoRA adapters (dlm/models/lora.py) of ``module``'s target kernels: ``{name}_lora_a``
  [*in, r] (fan-in normal) and ``{name}_lora_b`` [r, *out] (zeros); returns alpha / r."""
  if not lora:
    return 0.0
  rank, alpha, targets = lora
  for name, (ins, in_names, outs, out_names) in kernels.items():
    if name in targets:
      setattr(module, f"{name}_lora_a", param(rngs, _fan_in_init(math.prod(ins)), ins + (rank,),
                                              in_names + (None,)))
      setattr(module, f"{name}_lora_b", param(rngs, jax.nn.initializers.zeros, (rank,) + outs,
                                              (None,) + out_names))
  return alpha / rank


def with_lora(module: nnx.Module, name: str, x: Array, y: Array, contract: int = 1) -> Array:
  """y + (alpha / r) (x A) B when kernel ``name`` has an adapter (Hu et al. 2022, eq. 3)."""
  a = getattr(module, f"{name}_lora_a", None)
  if a is None:
    return y
  b = getattr(module, f"{name}_lora_b")
  dt = y.dtype
  low = matmul(matmul(x, a[...].astype(dt), contract), b[...].astype(dt))
  return y + jnp.asarray(module.lora_scale, dt) * low


def timestep_embedding(t: Array, dim: int, max_period: float = 10_000.0) -> Array:
  """Sinusoidal embedding of t in [0, 1] (scaled by 1000), as in DiT/MDLM.  [B] -> [B, dim]
  (per-position times [B, L] -> [B, L, dim])."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = (1000.0 * t.astype(jnp.float32))[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TimeEmbed(nnx.Module):
  """t -> conditioning vector c (MLP on a sinusoidal embedding)."""

  def __init__(self, cond_dim: int, *, rngs: nnx.Rngs, freq_dim: int = 128):
    self.freq_dim = freq_dim
    self.w1 = param(rngs, _fan_in_init(freq_dim), (freq_dim, cond_dim), (None, "embed"))
    self.b1 = param(rngs, jax.nn.initializers.zeros, (cond_dim,), ("embed",))
    self.w2 = param(rngs, _fan_in_init(cond_dim), (cond_dim, cond_dim), ("embed", None))
    self.b2 = param(rngs, jax.nn.initializers.zeros, (cond_dim,), (None,))

  def __call__(self, t: Array) -> Array:
    h = timestep_embedding(t, self.freq_dim) @ self.w1[...] + self.b1[...]
    return jax.nn.silu(h) @ self.w2[...] + self.b2[...]  # [B, C]


class AdaLNZero(nnx.Module):
  """c -> n (shift, scale, gate) vectors, zero-initialised (DiT adaLN-Zero, Peebles & Xie 2023)."""

  def __init__(self, cond_dim: int, d_model: int, n: int, *, rngs: nnx.Rngs):
    self.n = n
    self.w = param(rngs, jax.nn.initializers.zeros, (cond_dim, n * d_model), (None, "embed"))
    self.b = param(rngs, jax.nn.initializers.zeros, (n * d_model,), ("embed",))

  def __call__(self, c: Array) -> tuple[Array, ...]:
    """c [B, C] (one time per row) -> each [B, 1, D]; c [B, L, C] (per position) -> [B, L, D]."""
    out = jax.nn.silu(c) @ self.w[...] + self.b[...]  # [B, (L,) n*D]
    if out.ndim == 2:
      out = out[:, None, :]
    return tuple(jnp.split(out, self.n, axis=-1))


def modulate(x: Array, shift: Array, scale: Array) -> Array:
  return x * (1.0 + scale.astype(x.dtype)) + shift.astype(x.dtype)
