"""Fast-dLLM parallel decoding (Wu et al. 2025, Alg. 1-2): threshold commits and KV caches.

Blocks of ``block_length`` are decoded left to right.  Each pass predicts
x0 = argmax and its softmax confidence at the masked positions of the current
block and commits either the top ``quota[i]`` (fixed-quota mode, LLaDA's
schedule) or every candidate with confidence >= ``threshold`` and always the
most confident one.  ``use_cache``:
  - ``none``: every pass is a full forward; a block ends right after the pass
    that fills it;
  - ``prefix``: a block starts with a full forward that caches every layer's
    K/V; later passes feed x[block_start:] and attend to the cached prefix;
  - ``dual``: later passes feed only the block and attend to the cached prefix
    and suffix.
With a cache, completion is checked only after a cached pass, so one cached
pass always follows the block-start pass (it may commit nothing).  Blocks are
a Python loop (each window has a static shape); passes run in ``lax.while_loop``.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from dlm.errors import UserError
from dlm.sample import llada

Array = jax.Array
CACHES = ("none", "prefix", "dual")


@flax.struct.dataclass
class FastState:
  x: Array  # int32 [B, L]
  committed_at: Array  # int32 [B, L]: the pass (nfe index) that committed each position
  nfe: Array  # int32 []
  i: Array  # int32 []: passes in this block
  done: Array  # bool []


def _commit(x: Array, logits: Array, start: int, end: int, i: Array, quota: Array | None,
            threshold: float | None, mask_id: int, nfe: Array,
            committed_at: Array) -> tuple[Array, Array]:
  """One pass's decision on the block [start, end) from logits aligned with x[:, start:end]."""
  blk = x[:, start:end]
  masked = blk == mask_id
  x0 = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  conf = jnp.where(masked, jnp.take_along_axis(probs, x0[..., None], axis=-1)[..., 0], -jnp.inf)
  rank = llada.descending_rank(conf)
  if threshold is None:
    k = quota[jnp.minimum(i, quota.shape[0] - 1)]
    transfer = masked & (rank < k)
  else:
    transfer = masked & ((rank == 0) | (conf >= threshold))
  blk = jnp.where(transfer, x0, blk)
  at = jnp.where(transfer, nfe, committed_at[:, start:end])
  return x.at[:, start:end].set(blk), committed_at.at[:, start:end].set(at)


def generate(model: Any, prompt: Array, *, mask_id: int, steps: int, gen_length: int,
             block_length: int | None = None, threshold: float | None = None,
             use_cache: str = "none", params: Any = None) -> FastState:
  """Fast-dLLM ``generate`` / ``generate_with_prefix_cache`` / ``generate_with_dual_cache``."""
  if use_cache not in CACHES:
    raise UserError(f"use_cache={use_cache!r} unknown; use one of {list(CACHES)}")
  block_length = block_length or gen_length
  blocks = llada.check_knobs(steps, gen_length, block_length, "low_confidence")
  per_block = steps // blocks
  if threshold is None and use_cache != "none" and per_block < 2:
    raise UserError(f"fixed-quota decoding with use_cache={use_cache!r} needs >= 2 steps per"
                    f" block, got {per_block}; raise steps or set threshold")
  prepare, apply = model.sampling
  params = prepare(model.params if params is None else params)
  b, p = prompt.shape
  x = jnp.concatenate([prompt.astype(jnp.int32), jnp.full((b, gen_length), mask_id, jnp.int32)], 1)
  state = FastState(x=x, committed_at=jnp.full(x.shape, -1, jnp.int32),
                    nfe=jnp.zeros((), jnp.int32), i=jnp.zeros((), jnp.int32),
                    done=jnp.zeros((), bool))
  for blk in range(blocks):
    start, end = p + blk * block_length, p + (blk + 1) * block_length
    n = jnp.sum(state.x[:, start:end] == mask_id, axis=1)[0]  # batch 1, as the reference
    quota = n // per_block + (jnp.arange(per_block) < n % per_block).astype(jnp.int32)
    state = state.replace(i=jnp.zeros((), jnp.int32), done=jnp.zeros((), bool))
    if use_cache == "none":
      def body(s: FastState) -> FastState:
        logits = apply(params, s.x, None)[:, start:end]
        x, at = _commit(s.x, logits, start, end, s.i, quota, threshold, mask_id, s.nfe,
                        s.committed_at)
        done = ~jnp.any(x[:, start:end] == mask_id)
        return s.replace(x=x, committed_at=at, nfe=s.nfe + 1, i=s.i + 1, done=done)

      state = jax.lax.while_loop(lambda s: ~s.done, body, state)
      continue
    logits, cache = apply(params, state.x, None, return_kv=True)
    x, at = _commit(state.x, logits[:, start:end], start, end, state.i, quota, threshold,
                    mask_id, state.nfe, state.committed_at)
    state = state.replace(x=x, committed_at=at, nfe=state.nfe + 1, i=state.i + 1)
    w0 = start
    w1 = end if use_cache == "dual" else x.shape[1]

    def cached(s: FastState, cache=cache, w0=w0, w1=w1, start=start, end=end,
               quota=quota) -> FastState:
      logits = apply(params, s.x[:, w0:w1], None, kv_cache=cache, cache_start=jnp.int32(w0))
      x, at = _commit(s.x, logits[:, start - w0:end - w0], start, end, s.i, quota, threshold,
                      mask_id, s.nfe, s.committed_at)
      done = ~jnp.any(x[:, start:end] == mask_id)
      return s.replace(x=x, committed_at=at, nfe=s.nfe + 1, i=s.i + 1, done=done)

    state = jax.lax.while_loop(lambda s: ~s.done, cached, state)
  return state


def run(model: Any, prompt: Any, **knobs: Any) -> FastState:
  """``generate`` on a ``dlm.from_pretrained`` model, jitted."""
  kw = dict(mask_id=model.ids["mask"])
  kw.update(knobs)
  fn = model.jitted("fast_dllm", kw, lambda: lambda params, pr: generate(model, pr, params=params,
                                                                         **kw))
  return fn(model.sampling_params(), jnp.asarray(prompt, jnp.int32))


def unmasked_per_nfe(state: FastState) -> list[list[int]]:
  import numpy as np
  at = np.asarray(state.committed_at)[0]
  return [np.flatnonzero(at == s).tolist() for s in range(int(state.nfe))]
