"""Categorical draws with float64-grade tails, and temperature / top-p on logits.

Zheng et al. 2024 ("Masked diffusion models are secretly time-agnostic masked
models and exploit inaccurate categorical sampling", Sec. 4) show that
Gumbel-max in float32 truncates the Gumbel tail at -log(-log(1 - 2^-24)) ~ 16.6,
which lowers the sampling temperature of diffusion LMs; they draw in float64.
JAX's float64 needs ``jax_enable_x64`` (and TPUs have no float64), so we draw
the uniform from 64 random bits instead: the Gumbel tail then reaches ~44, beyond
float64's 36.7 (53-bit uniform), and the draw is still float32 arithmetic.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dlm.errors import UserError

_2_32 = 2.0 ** 32


def uniform_64bit(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """v ~ U(0, 1) built from 64 random bits: v = (hi + (lo + 1/2) 2^-32) 2^-32, float32."""
  bits = jax.random.bits(key, shape + (2,), jnp.uint32)
  hi = bits[..., 0].astype(jnp.float32)
  lo = bits[..., 1].astype(jnp.float32)
  v = (hi + (lo + 0.5) / _2_32) / _2_32
  return jnp.minimum(v, jnp.float32(1.0 - 2.0 ** -24))


def uniform_32bit(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """u ~ U[0, 1) on float32's grid k 2^-23 (``jax.random.uniform``'s values), from the top 23
  of the same 64 bits as ``uniform_64bit``, mirrored: u = 1 - ceil(v 2^23) 2^-23 ~ 1 - v, so
  -log(-log u) is the 64-bit draw ``gumbel_from_uniform(v)`` rounded onto float32's grid.
  Both precisions thus share one draw per seed and differ only where the rounding bites
  (common random numbers: a seeded 32- vs 64-bit comparison measures the truncation alone)."""
  hi = jax.random.bits(key, shape + (2,), jnp.uint32)[..., 0]
  return ((2 ** 23 - 1) - (hi >> 9)).astype(jnp.float32) * jnp.float32(2.0 ** -23)


def gumbel_from_uniform(v: jax.Array) -> jax.Array:
  """G = -log(E) with E = -log(1 - v) ~ Exp(1); log1p keeps small E (the far tail) exact."""
  return -jnp.log(-jnp.log1p(-v))


GUMBEL_BITS = (64, 32)
BITS_DOC = ("Gumbel noise from 64 random bits (float64-grade tail, ~44); 32: float32 uniforms"
            " (tail ~16), as MDLM's code drew them (Zheng et al. 2024: a lower temperature)")


def check_bits(bits: Any) -> int:
  if isinstance(bits, bool) or bits not in GUMBEL_BITS:
    raise UserError(f"gumbel_bits={bits!r} must be 64 (default) or 32 (float32 noise)")
  return int(bits)


def gumbel(key: jax.Array, shape: tuple[int, ...], bits: int = 64) -> jax.Array:
  """Standard Gumbel noise.  ``bits=32`` is the float32 draw of the reference PyTorch code,
  -log(-log(u)) with u ~ U[0, 1) in float32: its tail stops at -log(-log(1 - 2^-23)) ~ 15.9
  (Zheng et al. 2024, sec. 4), kept to measure what that truncation costs."""
  if bits == 32:
    return -jnp.log(-jnp.log(uniform_32bit(key, shape)))
  return gumbel_from_uniform(uniform_64bit(key, shape))


def categorical(key: jax.Array, log_probs: jax.Array, bits: int = 64) -> jax.Array:
  """Draws from the last axis of ``log_probs`` [..., V] (unnormalised is fine): int32 [...]."""
  g = gumbel(key, log_probs.shape, bits)
  return jnp.argmax(log_probs.astype(jnp.float32) + g, axis=-1).astype(jnp.int32)


def top_p_filter(logits: jax.Array, top_p: float | jax.Array) -> jax.Array:
  """Nucleus filtering (Holtzman et al. 2020): keep the smallest set of tokens whose mass >= top_p.

  A token is kept iff the probability mass ranked strictly before it is < top_p,
  so the most likely token always survives.  Removed logits become -inf.
  """
  order = jnp.argsort(-logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep_sorted = mass_before < top_p
  keep = jnp.put_along_axis(jnp.zeros_like(keep_sorted), order, keep_sorted, axis=-1,
                            inplace=False)
  return jnp.where(keep, logits, -jnp.inf)


def adjust_logits(logits: jax.Array, temperature: float, top_p: float) -> jax.Array:
  """Temperature then top-p; temperature must be > 0 (0 is handled by the caller as argmax)."""
  logits = logits / temperature
  if top_p < 1.0:
    logits = top_p_filter(logits, top_p)
  return logits
