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

import jax
import jax.numpy as jnp

from dlm.errors import UserError
from dlm.sample import categorical as cat
from dlm.sample import engine, llada

Array = jax.Array
CACHES = ("none", "prefix", "dual")

KNOBS = {
    "steps": engine.Knob(128, "passes in fixed-quota mode (a multiple of the number of blocks)"),
    "gen_length": engine.Knob(128, "tokens generated after the prompt"),
    "block_length": engine.Knob(None, "block decoded left to right (None: one block)"),
    "temperature": engine.Knob(0.0, "Gumbel noise on logits / temperature; 0 = argmax"),
    "remasking": engine.Knob("low_confidence", "confidence: low_confidence (softmax) or random"),
    "threshold": engine.Knob(None, "commit every candidate this confident (None: fixed quota)"),
    "use_cache": engine.Knob("none", "KV cache: none, prefix or dual"),
    "gumbel_bits": engine.Knob(64, cat.BITS_DOC),
}


def _commit(x: Array, logits: Array, start: Array, width: int, quota_k: Array,
            threshold: float | None, mask_id: int, nfe: Array, committed_at: Array,
            fixed: Array, rng: Array, temperature: float, remasking: str,
            gumbel_bits: int = 64) -> tuple[Array, Array]:
  """One pass's decision on the block [start, start + width) from logits aligned with it."""
  blk = jax.lax.dynamic_slice_in_dim(x, start, width, axis=1)
  masked = (blk == mask_id) & ~jax.lax.dynamic_slice_in_dim(fixed, start, width, axis=1)
  noise_rng, rand_rng = jax.random.split(rng)
  if temperature > 0:  # Fast-dLLM's add_gumbel_noise: argmax of logits / T + Gumbel
    x0 = jnp.argmax(logits / temperature + cat.gumbel(noise_rng, logits.shape, gumbel_bits),
                    axis=-1)
  else:
    x0 = jnp.argmax(logits, axis=-1)
  x0 = x0.astype(jnp.int32)
  if remasking == "low_confidence":
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    conf = jnp.take_along_axis(probs, x0[..., None], axis=-1)[..., 0]
  else:
    conf = cat.uniform_64bit(rand_rng, x0.shape)
  conf = jnp.where(masked, conf, -jnp.inf)
  rank = llada.descending_rank(conf)
  if threshold is None:
    transfer = masked & (rank < quota_k[:, None])
  else:
    transfer = masked & ((rank == 0) | (conf >= threshold))
  blk = jnp.where(transfer, x0, blk)
  at = jnp.where(transfer, nfe, jax.lax.dynamic_slice_in_dim(committed_at, start, width, axis=1))
  return (jax.lax.dynamic_update_slice_in_dim(x, blk, start, axis=1),
          jax.lax.dynamic_update_slice_in_dim(committed_at, at, start, axis=1))


@engine.register("fast_dllm", knobs=KNOBS, kinds=("absorbing",))
def make(denoiser: engine.Denoiser, process: Any = None, *, steps: int, gen_length: int,
         block_length: int | None, temperature: float, remasking: str, threshold: float | None,
         use_cache: str, gumbel_bits: int = 64) -> engine.Sampler:
  """Fast-dLLM ``generate`` / ``generate_with_prefix_cache`` / ``generate_with_dual_cache``."""
  del process
  bits = cat.check_bits(gumbel_bits)
  if use_cache not in CACHES:
    raise UserError(f"use_cache={use_cache!r} unknown; use one of {list(CACHES)}")
  block_length = block_length or gen_length
  blocks = llada.check_knobs(steps, gen_length, block_length, remasking)
  per_block = steps // blocks
  if threshold is None and use_cache != "none" and per_block < 2:
    raise UserError(f"fixed-quota decoding with use_cache={use_cache!r} needs >= 2 steps per"
                    f" block, got {per_block}; raise steps or set threshold")
  if use_cache != "none" and denoiser.shifted:
    raise UserError(f"use_cache={use_cache!r} needs a model with unshifted logits (LLaDA); this"
                    " one predicts position i at output i-1 (Dream): use use_cache='none' or"
                    " sampler='dream'")
  mask_id = denoiser.mask_id

  def init(rng: Array, given: Array, fixed: Array, am: Array | None) -> engine.State:
    b, length = given.shape
    x = jnp.where(fixed, given, mask_id)
    aux = dict(block=jnp.zeros((), jnp.int32), i=jnp.zeros((), jnp.int32),
               n=jnp.zeros((b,), jnp.int32), am=am)
    if use_cache != "none":  # a cache of the right shape, filled by each block's first pass
      _, cache = jax.eval_shape(lambda x: denoiser(x, None, attention_mask=am, fill_cache=True),
                                x)
      aux["cache"] = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), cache)
    return engine.initial_state(rng, given, fixed, x, **aux)

  def pass_on(state: engine.State, logits: Array, start: Array, rng: Array) -> engine.State:
    i = state.aux["i"]
    blk = jax.lax.dynamic_slice_in_dim(state.x, start, block_length, axis=1)
    # the quota schedule from the masks at the block's start (LLaDA's), one per pass
    n = jnp.where(i == 0, jnp.sum(blk == mask_id, axis=1).astype(jnp.int32), state.aux["n"])
    j = jnp.minimum(i, per_block - 1)
    k = llada.quota_of(n, j, per_block)
    x, at = _commit(state.x, logits, start, block_length, k, threshold, mask_id, state.nfe,
                    state.committed_at, state.fixed, rng, temperature, remasking, bits)
    return state.replace(x=x, committed_at=at, nfe=state.nfe + 1,
                         aux=dict(state.aux, i=i + 1, n=n))

  def block_start(state: engine.State) -> Array:
    return state.x.shape[1] - gen_length + state.aux["block"] * block_length

  def full_pass(state: engine.State, rng: Array) -> engine.State:
    start = block_start(state)
    am = state.aux["am"]
    if use_cache == "none":
      logits, _ = denoiser(state.x, None, attention_mask=am)
    else:
      logits, cache = denoiser(state.x, None, attention_mask=am, fill_cache=True)
      state = state.replace(aux=dict(state.aux, cache=cache))
    logits = jax.lax.dynamic_slice_in_dim(logits, start, block_length, axis=1)
    return pass_on(state, logits, start, rng)

  def cached_pass(state: engine.State, rng: Array) -> engine.State:
    start = block_start(state)
    if use_cache == "dual":  # the block alone, attending to the cached prefix and suffix
      window = jax.lax.dynamic_slice_in_dim(state.x, start, block_length, axis=1)
      logits, _ = denoiser(window, None, attention_mask=state.aux["am"],
                           cache=state.aux["cache"], cache_start=start)
      return pass_on(state, logits, start, rng)
    p = state.x.shape[1] - gen_length

    def at_block(blk: int):  # prefix: x[start:] has a static width per block
      def go(state: engine.State) -> engine.State:
        w0 = p + blk * block_length
        logits, _ = denoiser(state.x[:, w0:], None, attention_mask=state.aux["am"],
                             cache=state.aux["cache"], cache_start=jnp.int32(w0))
        return pass_on(state, logits[:, :block_length], jnp.int32(w0), rng)
      return go

    return jax.lax.switch(state.aux["block"], [at_block(k) for k in range(blocks)], state)

  def step(state: engine.State) -> engine.State:
    rng, pass_rng = jax.random.split(state.rng)
    state = state.replace(rng=rng)
    if use_cache == "none":
      state = full_pass(state, pass_rng)
      check = jnp.bool_(True)
    else:  # a block starts with a full pass; completion is checked after cached passes only
      first = state.aux["i"] == 0
      state = jax.lax.cond(first, full_pass, cached_pass, state, pass_rng)
      check = ~first
    start = block_start(state)
    blk = jax.lax.dynamic_slice_in_dim(state.x, start, block_length, axis=1)
    filled = check & ~jnp.any(blk == mask_id)
    aux = dict(state.aux, block=state.aux["block"] + filled.astype(jnp.int32),
               i=jnp.where(filled, 0, state.aux["i"]))
    return state.replace(aux=aux)

  def done(state: engine.State) -> Array:
    return state.aux["block"] >= blocks

  return engine.Sampler(init, step, done)


def unmasked_per_nfe(committed_at: Any, nfe: int) -> list[list[int]]:
  """Row 0's positions committed by each pass, in order (the fixtures' format)."""
  import numpy as np
  at = np.asarray(committed_at)[0]
  return [np.flatnonzero(at == s).tolist() for s in range(int(nfe))]
