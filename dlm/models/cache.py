"""Key/value cache of the denoiser, for samplers that re-run only part of the sequence.

A cache holds every layer's keys and values *before RoPE* (as Fast-dLLM caches
them, so a key can move: Fast-dLLM's windows, BD3's sliding context), except a causal
model's, whose keys never move: those are cached after RoPE (an AR step rotates one key), stacked on the layer axis and heads-major: k, v [layers, B, kv_heads, L, head_dim]
(a window pass attends without transposing them).  A
full forward with ``fill_cache=True`` fills it.  A forward over a window of W
tokens at positions [start, start + W) (``cache=cache, cache_start=start``)
computes fresh keys/values for the window only, writes them over the cached
ones there, and attends from the window's queries (at their absolute RoPE
positions) to all L positions: Fast-dLLM's dual cache.  Keys outside the
window keep the values of the pass that filled the cache.
"""

from __future__ import annotations

import flax.struct
import jax


@flax.struct.dataclass
class KVCache:
  k: jax.Array  # [layers, B, kv_heads, L, head_dim], pre-RoPE (post-RoPE if causal)
  v: jax.Array

  @property
  def length(self) -> int:
    return self.k.shape[3]


def write(cache: KVCache, window: KVCache, start: jax.Array | int) -> KVCache:
  """``cache`` with a window pass's keys/values (``fill_cache=True``: [layers, B, kv, W, H])
  written in at positions [start, start + W)."""
  put = lambda a, w: jax.lax.dynamic_update_slice_in_dim(a, w.astype(a.dtype), start, axis=3)
  return KVCache(k=put(cache.k, window.k), v=put(cache.v, window.v))
