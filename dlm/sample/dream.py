"""Dream's ``diffusion_generate`` (Ye et al. 2025): confidence-ordered unmasking, one jitted loop.

At step i of ``steps`` (t, s = linspace(1, eps, steps + 1)[i, i + 1]) every
masked position gets x0 = argmax of its filtered logits (top-p, then top-k)
and a confidence by ``alg``: ``maskgit_plus`` max p, ``topk_margin`` p1 - p2,
``entropy`` sum p log p; then k = int(n (1 - s / t)) of the n masked positions
per row (all of them at the last step) with the highest confidence are
committed.  ``origin`` commits each masked position with probability 1 - s/t.
Logits are the shifted (aligned) ones; rows are left-padded with a mask.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dlm.errors import UserError
from dlm.sample import categorical as cat
from dlm.sample import engine, llada

Array = jax.Array
ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
_FMIN = float(jnp.finfo(jnp.float32).min)


def filter_logits(logits: Array, top_p: float | None, top_k: int | None) -> Array:
  """Dream's top-p (keep while the mass ranked above is <= top_p) then top-k; removed -> f32 min."""
  if top_p is not None and top_p < 1:
    order = jnp.argsort(-logits, axis=-1, stable=True)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    mass_before = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1) - jax.nn.softmax(
        sorted_logits, axis=-1)
    remove_sorted = mass_before > top_p
    remove = jnp.zeros_like(remove_sorted).at[
        jnp.arange(logits.shape[0])[:, None, None], jnp.arange(logits.shape[1])[None, :, None],
        order].set(remove_sorted)
    logits = jnp.where(remove, _FMIN, logits)
  if top_k is not None:
    kth = jax.lax.top_k(logits, min(int(top_k), logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth, _FMIN, logits)
  return logits


KNOBS = {
    "max_new_tokens": engine.Knob(128, "tokens generated after the prompt"),
    "steps": engine.Knob(128, "denoiser calls"),
    "alg": engine.Knob("maskgit_plus", "confidence: origin, maskgit_plus, topk_margin, entropy"),
    "alg_temp": engine.Knob(None, "random confidence-weighted transfer (only None or 0)"),
    "eps": engine.Knob(1e-3, "last time of the linspace(1, eps, steps + 1) grid"),
    "temperature": engine.Knob(0.0, "softmax temperature of the x0 draw; 0 = argmax"),
    "top_p": engine.Knob(None, "nucleus filter before the draw (None: off)"),
    "top_k": engine.Knob(None, "keep the k largest logits (None: off)"),
    "gumbel_bits": engine.Knob(64, cat.BITS_DOC),
}


@engine.register("dream", knobs=KNOBS, length="max_new_tokens", kinds=("absorbing",))
def make(denoiser: engine.Denoiser, process: Any = None, *, max_new_tokens: int, steps: int,
         alg: str, alg_temp: float | None, eps: float, temperature: float, top_p: float | None,
         top_k: int | None, gumbel_bits: int = 64) -> engine.Sampler:
  """Dream ``diffusion_generate`` (Ye et al. 2025) on a prompt and ``max_new_tokens`` masks."""
  del process
  if alg not in ALGS:
    raise UserError(f"alg={alg!r} unknown; use one of {list(ALGS)}")
  if steps < 1 or max_new_tokens < 1:
    raise UserError(f"need steps and max_new_tokens >= 1, got {steps}, {max_new_tokens}")
  if alg_temp:
    raise UserError("alg_temp > 0 (random confidence-weighted transfer) is not implemented;"
                    " use alg_temp=0 or None")
  bits = cat.check_bits(gumbel_bits)
  mask_id = denoiser.mask_id
  timesteps = jnp.linspace(1.0, eps, steps + 1, dtype=jnp.float32)

  def init(rng: Array, given: Array, fixed: Array, am: Array | None) -> engine.State:
    return engine.initial_state(rng, given, fixed, jnp.full(given.shape, mask_id, jnp.int32),
                                step=jnp.zeros((), jnp.int32), am=am)

  def step_fn(state: engine.State) -> engine.State:
    i = state.aux["step"]
    b = state.x.shape[0]
    masked = (state.x == mask_id) & ~state.fixed
    logits, _ = denoiser(state.x, None, attention_mask=state.aux["am"])
    logits = filter_logits(logits.astype(jnp.float32), top_p, top_k)
    rng, draw_rng, origin_rng = jax.random.split(state.rng, 3)
    if temperature > 0:
      logits = logits / temperature
      x0 = cat.categorical(draw_rng, logits, bits)
    else:
      x0 = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    probs = jax.nn.softmax(logits, axis=-1)
    t, s = timesteps[i], timesteps[i + 1]
    last = i == steps - 1
    if alg == "origin":
      p_transfer = jnp.where(last, 1.0, 1.0 - s / t)
      transfer = masked & (cat.uniform_64bit(origin_rng, masked.shape) < p_transfer)
    else:
      if alg == "maskgit_plus":
        conf = jnp.take_along_axis(probs, x0[..., None], axis=-1)[..., 0]
      elif alg == "topk_margin":
        top2 = jax.lax.top_k(probs, 2)[0]
        conf = top2[..., 0] - top2[..., 1]
      else:
        conf = jnp.sum(probs * jnp.log(probs + 1e-10), axis=-1)
      conf = jnp.where(masked, conf, -jnp.inf)
      n = jnp.sum(masked).astype(jnp.float32) / b  # masked positions per row
      k = jnp.where(last, jnp.floor(n), jnp.floor(n * (1.0 - s / t))).astype(jnp.int32)
      rank = llada.descending_rank(conf)
      transfer = masked & (rank < k)
    x = jnp.where(transfer, x0, state.x)
    committed = jnp.where(transfer, state.nfe, state.committed_at)
    return state.replace(x=x, committed_at=committed, nfe=state.nfe + 1, rng=rng,
                         aux=dict(state.aux, step=i + 1))

  def done(state: engine.State) -> Array:
    return state.aux["step"] >= steps

  return engine.Sampler(init, step_fn, done)
