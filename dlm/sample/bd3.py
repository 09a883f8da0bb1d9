"""BD3-LM block-by-block decoding (Arriola et al. 2025, Alg. 2) with the clean blocks' KV cache.

Blocks of ``block_length`` (the model's ``block_size``) after the prompt are generated left to
right; a block's pass sees itself and the clean blocks before it (the ``bd3`` mask).  Inside
a block (``algorithm``):

* ``"confidence"``: ``steps`` passes each predict x0 = argmax (or a Gumbel draw at
  ``temperature``) at the block's masked positions and commit the most confident on LLaDA's
  quota schedule;
* ``"ancestral"`` (bd3lms ``_ddpm_caching_update``): the reverse posterior of the masked
  process over ``steps`` times t_i = 1 - i/T, each masked token revealed with probability
  (alpha_s - alpha_t) / (1 - alpha_t) (MDLM, Sahoo et al. 2024, eq. 7) as x0 ~ p_theta
  (after ``nucleus_p``); a pass whose input did not change reuses the last logits (no model
  call).  ``first_hitting`` (Zheng et al. 2025, Sec. 4.2; the reference's default): each pass
  reveals one masked token chosen uniformly, the exact first-hitting time of that chain,
  so a block takes as many passes as it has masks, whatever ``steps``.

The mask token is never predicted.  ``use_cache`` (bd3lms ``kv_cache``): the clean blocks'
keys and values are cached (the prompt in one pass, each finished block in one more), so a
pass costs one block; without it every pass runs x_t (+) x_0 whole: the same tokens.
``stop_at_eos`` (bd3lms ``var_length``): decoding ends after the block in which every row has
produced EOS (the engine cuts the blocks no row reached).  ``context_size`` (bd3lms
``context_size``): a pass sees at most this many tokens, its own block included; past it
the context slides by whole blocks, so the cache holds ``context_size`` positions whatever
the length generated, and positions stay inside the range the model was trained on (keys
are cached before RoPE, so a slid key is re-rotated at its slot).
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
    "steps": engine.Knob(None, "passes per block, bd3lms T (None: block_length)"),
    "algorithm": engine.Knob("confidence", "inside a block: 'confidence' (top-k commits) or"
                                           " 'ancestral' (bd3lms DDPM update)"),
    "first_hitting": engine.Knob(True, "ancestral: one uniformly chosen token per pass (bd3lms"
                                       " first_hitting)"),
    "nucleus_p": engine.Knob(1.0, "ancestral: draw x0 within this nucleus (bd3lms nucleus_p)"),
    "temperature": engine.Knob(None, "logits / temperature; 0 = argmax (None: 0 for"
                                     " confidence, 1 for ancestral)"),
    "stop_at_eos": engine.Knob(True, "stop after the block where every row has an EOS"
                                     " (bd3lms var_length)"),
    "use_cache": engine.Knob(True, "cache the clean blocks' keys/values (bd3lms kv_cache;"
                                   " False: full passes)"),
    "context_size": engine.Knob(None, "tokens a pass sees, its block included; longer"
                                      " sequences slide (None: the training context)"),
    "gumbel_bits": engine.Knob(64, cat.BITS_DOC),
}

PROMPT, DENOISE, CLEAN = 0, 1, 2  # the pass a step makes


def nucleus(logits: Array, p: float) -> Array:
  """bd3lms ``_nucleus_sample`` on logits: keep the sorted tokens whose cumulative probability
  is <= p (the most likely always), renormalise; removed logits become -inf."""
  if p >= 1.0:
    return logits
  order = jnp.argsort(-logits, axis=-1)
  probs = jax.nn.softmax(jnp.take_along_axis(logits, order, axis=-1), axis=-1)
  keep_sorted = (jnp.cumsum(probs, axis=-1) <= p) | (jnp.arange(logits.shape[-1]) == 0)
  keep = jnp.put_along_axis(jnp.zeros_like(keep_sorted), order, keep_sorted, axis=-1,
                            inplace=False)
  return jnp.where(keep, logits, -jnp.inf)


def reveal_probability(alpha: Any, i: Array, steps: int) -> Array:
  """MDLM's reverse step t_i = 1 - i/T -> s = t_i - 1/T for a masked token (Sahoo et al. 2024,
  eq. 7): P(x_s = x0) = (alpha_s - alpha_t) / (1 - alpha_t); 1 at the last step."""
  t = 1.0 - i.astype(jnp.float32) / steps
  s = 1.0 - (i + 1).astype(jnp.float32) / steps
  a_t, a_s = alpha(t), alpha(s)
  return jnp.where(i + 1 >= steps, 1.0, (a_s - a_t) / jnp.maximum(1.0 - a_t, 1e-12))


def _alpha(process: Any):
  schedule = getattr(process, "schedule", None)
  return (lambda t: 1.0 - t) if schedule is None else schedule.alpha


@engine.register("bd3", knobs=KNOBS, kinds=("absorbing",))
def make(denoiser: engine.Denoiser, process: Any = None, *, gen_length: int,
         block_length: int | None, steps: int | None, algorithm: str, first_hitting: bool,
         nucleus_p: float, temperature: float | None, stop_at_eos: bool, use_cache: bool,
         context_size: int | None, gumbel_bits: int = 64) -> engine.Sampler:
  """Semi-autoregressive block diffusion: confidence or ancestral steps inside each block."""
  if not denoiser.block_size:
    raise UserError("sampler 'bd3' needs a block diffusion model (model.mask_kind='bd3'); use"
                    " the model's own sampler")
  bs = block_length or denoiser.block_size
  if bs != denoiser.block_size:
    raise UserError(f"block_length={bs} must be the model's block_size {denoiser.block_size}")
  if gen_length % bs:
    raise UserError(f"gen_length={gen_length} must be a multiple of the block {bs}")
  if algorithm not in ("confidence", "ancestral"):
    raise UserError(f"algorithm={algorithm!r} unknown; use 'confidence' or 'ancestral'")
  ancestral = algorithm == "ancestral"
  hitting = ancestral and bool(first_hitting)
  steps = steps or bs
  if not (1 <= steps <= bs or (ancestral and steps >= 1)):
    raise UserError(f"steps={steps} per block must be in [1, {bs}] with algorithm="
                    f"'confidence' (any >= 1 with 'ancestral')")
  if not 0 < nucleus_p <= 1:
    raise UserError(f"nucleus_p={nucleus_p!r} must be in (0, 1]")
  if temperature is None:
    temperature = 1.0 if ancestral else 0.0
  if temperature < 0:
    raise UserError(f"temperature={temperature!r} must be >= 0")
  bits = cat.check_bits(gumbel_bits)
  context = context_size or denoiser.context or None
  if context is not None and (context % bs or context < 2 * bs):
    raise UserError(f"context_size={context} must be a multiple of the block {bs}, at least"
                    f" two blocks")
  blocks = gen_length // bs
  mask_id, eos_id = denoiser.mask_id, denoiser.eos_id
  alpha = _alpha(process)

  def sizes(length: int) -> tuple[int, int, int]:
    """(prompt length, window W, first offset): the window is the cache and a pass's reach."""
    p = length - gen_length
    w = length if context is None or context >= length else context
    return p, w, max(0, p - (w - bs))

  def init(rng: Array, given: Array, fixed: Array, am: Array | None) -> engine.State:
    b, length = given.shape
    p, w, offset = sizes(length)
    if p % bs or p < bs:
      raise UserError(f"sampler 'bd3' needs a prompt of whole blocks ({p} tokens, block {bs}):"
                      f" pass prompt_bucket={bs} (left padding; --prompt_bucket={bs})")
    x = jnp.where(fixed, given, mask_id)
    aux = dict(block=jnp.int32(0), i=jnp.int32(0), n=jnp.zeros((b,), jnp.int32),
               phase=jnp.int32(PROMPT if use_cache else DENOISE), stop=jnp.bool_(False), am=am,
               offset=jnp.int32(offset))
    if use_cache:  # W positions per layer: a full pass over x_t (+) x_0 has 2W
      _, c = jax.eval_shape(lambda x: denoiser(jnp.concatenate([x, x], 1), None,
                                               fill_cache=True), x[:, :w])
      shape = lambda a, axis: jnp.zeros(a.shape[:axis] + (w,) + a.shape[axis + 1:], a.dtype)
      aux["cache"] = cache_lib.positions_map(c, shape)
    if ancestral and not hitting:  # the last pass's logits, reused while x does not change
      aux["logits"] = jnp.zeros((b, bs, denoiser.vocab_size), jnp.float32)
      aux["fresh"] = jnp.bool_(True)
    return engine.initial_state(rng, given, fixed, x, **aux)

  def start_of(state: engine.State) -> Array:
    return state.x.shape[1] - gen_length + state.aux["block"] * bs

  def window_mask(state: engine.State) -> Array | None:
    am = state.aux["am"]
    w = sizes(state.x.shape[1])[1]
    return None if am is None else jax.lax.dynamic_slice_in_dim(am, state.aux["offset"], w, 1)

  def window(state: engine.State, start: Any, width: int, fill: bool) -> tuple[Array, Any]:
    """A pass over x[start, start + width) at its cache slots (its keys written in)."""
    c = state.aux["cache"]
    slot = jnp.asarray(start, jnp.int32) - state.aux["offset"]
    tokens = jax.lax.dynamic_slice_in_dim(state.x, start, width, axis=1)
    return denoiser(tokens, None, attention_mask=window_mask(state), cache=c, cache_start=slot,
                    fill_cache=fill)

  def slide(aux: dict, start: Array, length: int) -> dict:
    """After the block at ``start``: if the next block would not fit the window, the
    context moves on by one block (the cache's oldest block dropped)."""
    w = sizes(length)[1]
    full = start - aux["offset"] + 2 * bs > w
    aux = dict(aux, offset=aux["offset"] + jnp.where(full, bs, 0).astype(jnp.int32))
    if "cache" in aux:  # rolled only when the window moves (a copy of the cache)
      aux["cache"] = jax.lax.cond(
          full, lambda c: cache_lib.positions_map(c, lambda a, axis: jnp.roll(a, -bs, axis)),
          lambda c: c,
          aux["cache"])
    return aux

  def prompt_pass(state: engine.State) -> engine.State:
    p, _, offset = sizes(state.x.shape[1])
    _, c = window(state, offset, p - offset, True)
    return state.replace(nfe=state.nfe + 1, aux=dict(state.aux, cache=c, phase=DENOISE))

  def clean_pass(state: engine.State) -> engine.State:
    start = start_of(state) - bs  # the block just finished
    _, c = window(state, start, bs, True)
    aux = slide(dict(state.aux, cache=c, phase=DENOISE), start, state.x.shape[1])
    return state.replace(nfe=state.nfe + 1, aux=aux)

  def block_logits(state: engine.State, start: Array) -> Array:
    if use_cache:
      return window(state, start, bs, False)[0]
    # x_t (+) x_0 over the window: the block sees the clean blocks before it in the x_0 half
    w = sizes(state.x.shape[1])[1]
    xw = jax.lax.dynamic_slice_in_dim(state.x, state.aux["offset"], w, axis=1)
    am = window_mask(state)
    logits, _ = denoiser(jnp.concatenate([xw, xw], 1), None,
                         attention_mask=None if am is None else jnp.concatenate([am, am], 1))
    return jax.lax.dynamic_slice_in_dim(logits, start - state.aux["offset"], bs, axis=1)

  def commit(i: Array, n: Array, rng: Array, logits: Array, masked: Array
             ) -> tuple[Array, Array]:
    """(tokens of the block, which positions this pass reveals) at pass i of the block."""
    x0_rng, pick_rng = jax.random.split(rng)
    if not ancestral:
      k = llada.quota_of(n, i, steps)
      scores = logits / temperature + cat.gumbel(x0_rng, logits.shape, bits) if temperature > 0 \
          else logits
      x0 = jnp.argmax(scores, axis=-1).astype(jnp.int32)
      conf = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), x0[..., None], -1)[..., 0]
      conf = jnp.where(masked, conf, -jnp.inf)
      return x0, masked & (llada.descending_rank(conf) < k[:, None])
    if temperature > 0:
      x0 = cat.categorical(x0_rng, nucleus(logits / temperature, nucleus_p), bits)
    else:
      x0 = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if hitting:  # one masked position, uniformly: the first to be hit going backwards in t
      u = jnp.where(masked, jax.random.uniform(pick_rng, masked.shape), -1.0)
      return x0, masked & (jnp.arange(bs) == jnp.argmax(u, axis=1)[:, None])
    reveal = reveal_probability(alpha, i, steps)
    return x0, masked & (jax.random.uniform(pick_rng, masked.shape) < reveal)

  def denoise_pass(state: engine.State) -> engine.State:
    """One denoising step on the current block (the only step that draws: the cache's own
    passes leave the key stream as it is, so cached and uncached runs draw alike)."""
    rng, noise_rng = jax.random.split(state.rng)
    state = state.replace(rng=rng)
    start = start_of(state)
    aux = dict(state.aux)
    calls = 1
    if "fresh" in aux:  # ancestral: no change since the last call, no new call
      logits = jax.lax.cond(aux["fresh"], lambda: block_logits(state, start),
                            lambda: aux["logits"])
      calls = aux["fresh"].astype(jnp.int32)
    else:
      logits = block_logits(state, start)
    logits = jnp.where(jnp.arange(logits.shape[-1]) == mask_id, -jnp.inf, logits)
    blk = jax.lax.dynamic_slice_in_dim(state.x, start, bs, axis=1)
    masked = blk == mask_id
    i = aux["i"]  # confidence: the block's masks at its first pass set the quota
    n = aux["n"] if ancestral else jnp.where(i == 0, jnp.sum(masked, 1).astype(jnp.int32),
                                             aux["n"])
    x0, transfer = commit(i, n, noise_rng, logits, masked)
    blk = jnp.where(transfer, x0, blk)
    at = jnp.where(transfer, state.nfe + calls - 1,
                   jax.lax.dynamic_slice_in_dim(state.committed_at, start, bs, axis=1))
    x = jax.lax.dynamic_update_slice_in_dim(state.x, blk, start, axis=1)
    committed_at = jax.lax.dynamic_update_slice_in_dim(state.committed_at, at, start, axis=1)
    filled = ~jnp.any(blk == mask_id)
    stop = aux["stop"]
    if stop_at_eos and eos_id is not None:  # every row has an EOS among its generated tokens
      gen = jnp.arange(x.shape[1]) >= x.shape[1] - gen_length
      stop = filled & jnp.all(jnp.any((x == eos_id) & gen & (committed_at >= 0), axis=1))
    if "fresh" in aux:
      aux.update(logits=logits, fresh=jnp.any(transfer) | filled)
    aux.update(i=jnp.where(filled, 0, i + 1), n=n, stop=stop,
               block=aux["block"] + filled.astype(jnp.int32),
               phase=jnp.where(filled & use_cache, CLEAN, DENOISE).astype(jnp.int32))
    if not use_cache:
      aux = jax.lax.cond(filled, lambda a: slide(a, start, x.shape[1]), lambda a: a, aux)
    return state.replace(x=x, committed_at=committed_at, nfe=state.nfe + calls, aux=aux)

  def step(state: engine.State) -> engine.State:
    if not use_cache:
      return denoise_pass(state)
    return jax.lax.switch(state.aux["phase"], [prompt_pass, denoise_pass, clean_pass], state)

  def done(state: engine.State) -> Array:
    finished = (state.aux["block"] >= blocks) | state.aux["stop"]
    return finished & (state.aux["phase"] != PROMPT)

  return engine.Sampler(init, step, done)
