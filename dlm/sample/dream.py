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

from typing import Any, Callable

import chex
import flax.struct
import jax
import jax.numpy as jnp

from dlm.errors import UserError
from dlm.sample import llada

Array = jax.Array
ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
_FMIN = float(jnp.finfo(jnp.float32).min)


@flax.struct.dataclass
class DreamState:
  x: Array  # int32 [B, L]
  committed_at: Array  # int32 [B, L]
  step: Array  # int32 []
  rng: Array


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


def generate(logits_fn: Callable[[Array, Array | None], Array], prompt: Array,
             attention_mask: Array | None, rng: Array, *, mask_id: int, max_new_tokens: int,
             steps: int, alg: str = "maskgit_plus", eps: float = 1e-3,
             temperature: float = 0.0, top_p: float | None = None, top_k: int | None = None,
             alg_temp: float | None = None) -> DreamState:
  """Dream ``diffusion_generate``: final state, ``x`` = prompt + generation; call under jit."""
  if alg not in ALGS:
    raise UserError(f"alg={alg!r} unknown; use one of {list(ALGS)}")
  if steps < 1 or max_new_tokens < 1:
    raise UserError(f"need steps and max_new_tokens >= 1, got {steps}, {max_new_tokens}")
  if alg_temp:
    raise UserError("alg_temp > 0 (random confidence-weighted transfer) is not implemented;"
                    " use alg_temp=0 or None")
  chex.assert_rank(prompt, 2)
  b, p = prompt.shape
  x = jnp.concatenate([prompt.astype(jnp.int32),
                       jnp.full((b, max_new_tokens), mask_id, jnp.int32)], 1)
  am = None
  if attention_mask is not None:
    am = jnp.concatenate([jnp.asarray(attention_mask, jnp.int32),
                          jnp.ones((b, max_new_tokens), jnp.int32)], 1)
  timesteps = jnp.linspace(1.0, eps, steps + 1, dtype=jnp.float32)

  def step_fn(state: DreamState) -> DreamState:
    i = state.step
    masked = state.x == mask_id
    logits = filter_logits(logits_fn(state.x, am).astype(jnp.float32), top_p, top_k)
    rng, draw_rng, origin_rng = jax.random.split(state.rng, 3)
    if temperature > 0:
      logits = logits / temperature
      x0 = jax.random.categorical(draw_rng, logits, axis=-1).astype(jnp.int32)
    else:
      x0 = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    probs = jax.nn.softmax(logits, axis=-1)
    t, s = timesteps[i], timesteps[i + 1]
    last = i == steps - 1
    if alg == "origin":
      p_transfer = jnp.where(last, 1.0, 1.0 - s / t)
      transfer = masked & (jax.random.uniform(origin_rng, masked.shape) < p_transfer)
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
    committed = jnp.where(transfer, i, state.committed_at)
    return state.replace(x=x, committed_at=committed, step=i + 1, rng=rng)

  init = DreamState(x=x, committed_at=jnp.full(x.shape, -1, jnp.int32),
                    step=jnp.zeros((), jnp.int32), rng=rng)
  return jax.lax.while_loop(lambda s: s.step < steps, step_fn, init)


def run(model: Any, prompt: Any, attention_mask: Any = None, *, seed: int = 0,
        **knobs: Any) -> DreamState:
  """``generate`` on a ``dlm.from_pretrained`` model (its aligned, shifted logits), jitted."""
  prepare, apply = model.sampling
  kw = dict(mask_id=model.ids["mask"])
  kw.update(knobs)

  def build() -> Callable[..., DreamState]:
    def fn(params: Any, pr: Array, am: Array | None, rng: Array) -> DreamState:
      params = prepare(params)
      logits_fn = lambda x, a: apply(params, x, None, attention_mask=a)
      return generate(logits_fn, pr, am, rng, **kw)
    return fn

  am = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
  # params are an argument, not a closure: no weight constants baked into the program
  fn = model.jitted("dream", kw, build)
  return fn(model.sampling_params(), jnp.asarray(prompt, jnp.int32), am, jax.random.key(seed))
