"""Samplers as ``init / step / done`` over a fixed-shape state, run in a jitted ``lax.while_loop``.

A sampler sees only the denoiser ``denoise(x_t, t) -> logits`` and the process,
so a converted checkpoint and our own Transformer are interchangeable.  Given
tokens (prompt, infilling context) are clamped after every step: they never
change.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import chex
import flax.struct
import jax
import jax.numpy as jnp

from dlm.registry import Registry
from dlm.sample import categorical as cat

Array = jax.Array
Denoiser = Callable[[Array, Array], Array]

SAMPLERS: Registry[Callable[..., "Sampler"]] = Registry("sampler")


@flax.struct.dataclass
class SamplerState:
  x: Array  # int32 [B, L], the current x_t
  given: Array  # int32 [B, L], tokens that are fixed
  fixed: Array  # bool [B, L]
  rng: Array  # key
  step: Array  # int32 [], steps taken
  nfe: Array  # int32 [], denoiser calls
  logits: Array | None = None  # float32 [B, L, V]: the last call's (denoisers that ignore t)
  logits_x: Array | None = None  # int32 [B, L]: the x those logits were computed from


@dataclasses.dataclass(frozen=True)
class Sampler:
  init: Callable[[Array, Array, Array], SamplerState]
  step: Callable[[SamplerState], SamplerState]
  done: Callable[[SamplerState], Array]


def x0_log_probs(process: Any, logits: Array, x_t: Array, temperature: float,
                 top_p: float) -> Array:
  """log p(x0 | x_t) after temperature and top-p; SUBS carry-over for absorbing processes."""
  if hasattr(process, "x0_logits"):
    logits = process.x0_logits(logits, x_t)
  if temperature == 0.0:
    best = jnp.argmax(logits, axis=-1)
    return jnp.where(jax.nn.one_hot(best, logits.shape[-1], dtype=bool), 0.0, -jnp.inf)
  return jax.nn.log_softmax(cat.adjust_logits(logits, temperature, top_p), axis=-1)


@SAMPLERS.register("ancestral")
def ancestral(denoise: Denoiser, process: Any, *, steps: int, temperature: float = 1.0,
              top_p: float = 1.0, denoiser_uses_t: bool = True) -> Sampler:
  """Ancestral sampling x_s ~ p(x_s | x_t) on t = 1, 1-1/T, ..., 0 (MDLM eq. 7 / D3PM eq. 4).

  For absorbing processes the last step draws every still-masked position from
  p(x_0 | x_t) ("noise removal", MDLM), since alpha(0) = 1 - eps would leave a
  few masks; other processes take the posterior at s = 0 as is.

  ``denoiser_uses_t=False`` (a model without time conditioning) turns on MDLM's
  denoiser cache (Sahoo et al. 2024, sec. 3.4): when no token changed since the
  last call, its logits are reused and no call is made (``nfe`` counts calls).
  The draws are the same as without the cache; only the calls are saved.
  """
  absorbing = hasattr(process, "x0_logits")
  cache = not denoiser_uses_t
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")

  def init(rng: Array, given: Array, fixed: Array) -> SamplerState:
    chex.assert_type(given, jnp.int32)
    chex.assert_equal_shape([given, fixed])
    rng, prior_rng = jax.random.split(rng)
    x = jnp.where(fixed, given, process.sample_prior(prior_rng, given.shape))
    logits = logits_x = None
    if cache:
      shape = jax.eval_shape(denoise, x, jnp.ones((x.shape[0],), jnp.float32)).shape
      logits, logits_x = jnp.zeros(shape, jnp.float32), jnp.full(x.shape, -1, jnp.int32)
    return SamplerState(x=x, given=given, fixed=fixed, rng=rng, step=jnp.zeros((), jnp.int32),
                        nfe=jnp.zeros((), jnp.int32), logits=logits, logits_x=logits_x)

  def step(state: SamplerState) -> SamplerState:
    b = state.x.shape[0]
    t = jnp.full((b,), 1.0 - state.step / steps, jnp.float32)
    s = jnp.full((b,), 1.0 - (state.step + 1) / steps, jnp.float32)
    if cache:
      fresh = jnp.any(state.x != state.logits_x)
      logits = jax.lax.cond(fresh, lambda: denoise(state.x, t).astype(jnp.float32),
                            lambda: state.logits)
      state = state.replace(logits=logits, logits_x=state.x)
      calls = fresh.astype(jnp.int32)
    else:
      logits, calls = denoise(state.x, t), 1  # [B, L, V]
    logp_x0 = x0_log_probs(process, logits, state.x, temperature, top_p)
    post = process.posterior_from_x0_probs(jnp.exp(logp_x0), state.x, t, s)  # [B, L, V]
    log_probs = jnp.log(post)
    if absorbing:
      log_probs = jnp.where(state.step + 1 >= steps, logp_x0, log_probs)
    rng, draw_rng = jax.random.split(state.rng)
    x = cat.categorical(draw_rng, log_probs)
    x = jnp.where(state.fixed, state.given, x)
    return state.replace(x=x, rng=rng, step=state.step + 1, nfe=state.nfe + calls)

  def done(state: SamplerState) -> Array:
    return state.step >= steps

  return Sampler(init, step, done)


def run(sampler: Sampler, rng: Array, given: Array, fixed: Array) -> SamplerState:
  """The whole loop; call under ``jax.jit`` (the sampler's knobs are static)."""
  return jax.lax.while_loop(lambda s: ~sampler.done(s), sampler.step, sampler.init(rng, given, fixed))


def make_sampler(name: str, denoise: Denoiser, process: Any, **knobs: Any) -> Sampler:
  return SAMPLERS.get(name)(denoise, process, **knobs)
