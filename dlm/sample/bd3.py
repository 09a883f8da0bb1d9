"""BD3-LM block-by-block decoding (Arriola et al. 2025, Alg. 2) with the clean blocks' KV cache.

Blocks of ``block_length`` (the model's ``block_size``) after the prompt are generated left to
right.  Inside a block, ``steps`` passes each predict x0 = argmax (or a Gumbel draw at
``temperature``; the mask token is never predicted) at the block's masked positions and
commit the most confident on LLaDA's quota schedule; a block's pass sees itself and the
clean blocks before it (the ``bd3`` mask).  ``use_cache``: the clean blocks' keys and values
are cached (the prompt in one pass, each finished block in one more), so a pass costs one
block; without it every pass runs x_t (+) x_0 whole: the same tokens.  ``stop_at_eos``:
decoding ends after the block in which every row has produced EOS (the engine cuts the
blocks no row reached).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dlm.errors import UserError
from dlm.models import cache as cache_lib
from dlm.sample import categorical as cat
from dlm.sample import engine, llada

Array = jax.Array

KNOBS = {
    "gen_length": engine.Knob(128, "tokens generated after the prompt (whole blocks)"),
    "block_length": engine.Knob(None, "the block (None: the model's block_size)"),
    "steps": engine.Knob(None, "passes per block (None: block_length, one token per pass)"),
    "temperature": engine.Knob(0.0, "Gumbel noise on logits / temperature; 0 = argmax"),
    "stop_at_eos": engine.Knob(True, "stop after the block where every row has an EOS"),
    "use_cache": engine.Knob(True, "cache the clean blocks' keys/values (False: full passes)"),
}

PROMPT, DENOISE, CLEAN = 0, 1, 2  # the pass a step makes


@engine.register("bd3", knobs=KNOBS)
def make(denoiser: engine.Denoiser, process: Any = None, *, gen_length: int,
         block_length: int | None, steps: int | None, temperature: float, stop_at_eos: bool,
         use_cache: bool) -> engine.Sampler:
  """Semi-autoregressive block diffusion with confidence commits inside each block."""
  del process
  if not denoiser.block_size:
    raise UserError("sampler 'bd3' needs a block diffusion model (model.mask_kind='bd3'); use"
                    " the model's own sampler")
  bs = block_length or denoiser.block_size
  if bs != denoiser.block_size:
    raise UserError(f"block_length={bs} must be the model's block_size {denoiser.block_size}")
  if gen_length % bs:
    raise UserError(f"gen_length={gen_length} must be a multiple of the block {bs}")
  steps = steps or bs
  if not 1 <= steps <= bs:
    raise UserError(f"steps={steps} per block must be in [1, {bs}]")
  blocks = gen_length // bs
  mask_id, eos_id = denoiser.mask_id, denoiser.eos_id

  def init(rng: Array, given: Array, fixed: Array, am: Array | None) -> engine.State:
    b, length = given.shape
    p = length - gen_length
    if p % bs or p < bs:
      raise UserError(f"sampler 'bd3' needs a prompt of whole blocks ({p} tokens, block {bs}):"
                      f" pass prompt_bucket={bs} (left padding; --prompt_bucket={bs})")
    x = jnp.where(fixed, given, mask_id)
    aux = dict(block=jnp.int32(0), i=jnp.int32(0), n=jnp.zeros((b,), jnp.int32),
               phase=jnp.int32(PROMPT if use_cache else DENOISE), stop=jnp.bool_(False), am=am)
    if use_cache:  # [layers, B, kv, L, H]: a full pass over x_t (+) x_0 has 2L
      _, c = jax.eval_shape(lambda x: denoiser(jnp.concatenate([x, x], 1), None,
                                               fill_cache=True), x)
      shape = lambda a: jnp.zeros(a.shape[:3] + (length,) + a.shape[4:], a.dtype)
      aux["cache"] = jax.tree.map(shape, c)
    return engine.initial_state(rng, given, fixed, x, **aux)

  def start_of(state: engine.State) -> Array:
    return state.x.shape[1] - gen_length + state.aux["block"] * bs

  def window(state: engine.State, start: Any, width: int, fill: bool) -> tuple[Array, Any]:
    """A window pass at [start, start + width) against the cache (its keys written in)."""
    c = state.aux["cache"]
    tokens = jax.lax.dynamic_slice_in_dim(state.x, start, width, axis=1)
    logits, win = denoiser(tokens, None, attention_mask=state.aux["am"], cache=c,
                           cache_start=jnp.int32(start) if isinstance(start, int) else start,
                           fill_cache=True)
    return logits, cache_lib.write(c, win, start) if fill else c

  def prompt_pass(state: engine.State) -> engine.State:
    p = state.x.shape[1] - gen_length
    _, c = window(state, 0, p, True)
    return state.replace(nfe=state.nfe + 1, aux=dict(state.aux, cache=c, phase=DENOISE))

  def clean_pass(state: engine.State) -> engine.State:
    start = start_of(state) - bs  # the block just finished
    _, c = window(state, start, bs, True)
    return state.replace(nfe=state.nfe + 1, aux=dict(state.aux, cache=c, phase=DENOISE))

  def denoise_pass(state: engine.State) -> engine.State:
    """One denoising pass on the current block (the only pass that draws: the cache's own
    passes leave the key stream as it is, so cached and uncached runs draw alike)."""
    rng, noise_rng = jax.random.split(state.rng)
    state = state.replace(rng=rng)
    start = start_of(state)
    if use_cache:
      logits, _ = window(state, start, bs, False)
    else:  # x_t (+) x_0 whole: the block sees the clean blocks before it in the x_0 half
      am = state.aux["am"]
      logits, _ = denoiser(jnp.concatenate([state.x, state.x], 1), None,
                           attention_mask=None if am is None else jnp.concatenate([am, am], 1))
      logits = jax.lax.dynamic_slice_in_dim(logits, start, bs, axis=1)
    logits = jnp.where(jnp.arange(logits.shape[-1]) == mask_id, -jnp.inf, logits)
    blk = jax.lax.dynamic_slice_in_dim(state.x, start, bs, axis=1)
    masked = blk == mask_id
    i = state.aux["i"]
    n = jnp.where(i == 0, jnp.sum(masked, axis=1).astype(jnp.int32), state.aux["n"])
    k = llada.quota_of(n, i, steps)
    scores = logits / temperature + cat.gumbel(noise_rng, logits.shape) if temperature > 0 \
        else logits
    x0 = jnp.argmax(scores, axis=-1).astype(jnp.int32)
    conf = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), x0[..., None], -1)[..., 0]
    conf = jnp.where(masked, conf, -jnp.inf)
    transfer = masked & (llada.descending_rank(conf) < k[:, None])
    blk = jnp.where(transfer, x0, blk)
    at = jnp.where(transfer, state.nfe,
                   jax.lax.dynamic_slice_in_dim(state.committed_at, start, bs, axis=1))
    x = jax.lax.dynamic_update_slice_in_dim(state.x, blk, start, axis=1)
    committed_at = jax.lax.dynamic_update_slice_in_dim(state.committed_at, at, start, axis=1)
    filled = i + 1 >= steps
    stop = state.aux["stop"]
    if stop_at_eos and eos_id is not None:  # every row has an EOS among its generated tokens
      gen = jnp.arange(x.shape[1]) >= x.shape[1] - gen_length
      stop = filled & jnp.all(jnp.any((x == eos_id) & gen & (committed_at >= 0), axis=1))
    aux = dict(state.aux, i=jnp.where(filled, 0, i + 1), n=n, stop=stop,
               block=state.aux["block"] + filled.astype(jnp.int32),
               phase=jnp.where(filled & use_cache, CLEAN, DENOISE).astype(jnp.int32))
    return state.replace(x=x, committed_at=committed_at, nfe=state.nfe + 1, aux=aux)

  def step(state: engine.State) -> engine.State:
    if not use_cache:
      return denoise_pass(state)
    return jax.lax.switch(state.aux["phase"], [prompt_pass, denoise_pass, clean_pass], state)

  def done(state: engine.State) -> Array:
    finished = (state.aux["block"] >= blocks) | state.aux["stop"]
    return finished & (state.aux["phase"] != PROMPT)

  return engine.Sampler(init, step, done)
