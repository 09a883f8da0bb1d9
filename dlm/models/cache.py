"""Key/value cache of the denoiser, for samplers that re-run only part of the sequence.

A cache holds every layer's keys and values *before RoPE* (as Fast-dLLM caches
them, so a key can move: Fast-dLLM's windows, BD3's sliding context), except a causal
model's, whose keys never move: those are cached after RoPE (an AR step rotates one key).
Heads-major, so a window pass attends without transposing them: k, v are
[layers, B, kv_heads, L, head_dim] stacked on the layer axis (the scanned layout), or in
the decode layout (decode.py) a tuple of one [B, kv_heads, L, head_dim] buffer per layer:
a pass then reads and updates each layer's buffer in place, where a slice of a stack is
copied for every layer of every pass.  Positions are axis -2 in both.  A full forward with
``fill_cache=True`` fills it.  A forward over a window of W tokens at positions
[start, start + W) (``cache=cache, cache_start=start``) computes fresh keys/values for the
window only, writes them over the cached ones there, and attends from the window's queries
(at their absolute RoPE positions) to all L positions: Fast-dLLM's dual cache.  It returns
the cache as given, or with ``fill_cache=True`` the cache with the window written in.  Keys
outside the window keep the values of the pass that filled the cache.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class KVCache:
  k: Any  # [layers, B, kv_heads, L, head_dim] or a tuple of [B, kv_heads, L, head_dim]
  v: Any

  @property
  def length(self) -> int:
    return jax.tree.leaves(self.k)[0].shape[-2]

  def stacked(self) -> "KVCache":
    """The same cache as [layers, ...] arrays, whichever layout holds it."""
    stack = lambda a: jnp.stack(a) if isinstance(a, (tuple, list)) else a
    return KVCache(k=stack(self.k), v=stack(self.v))


def positions_map(cache: KVCache, fn: Callable[[Array, int], Array]) -> KVCache:
  """``fn(buffer, axis)`` applied to every buffer, with ``axis`` its positions axis."""
  return jax.tree.map(lambda a: fn(a, a.ndim - 2), cache)
