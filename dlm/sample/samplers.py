"""Ancestral sampling over any process, in the one sampling contract (``dlm/sample/engine.py``).

The sampler sees only the ``Denoiser`` and the process, so a converted
checkpoint and our own Transformer are interchangeable.  Given tokens (prompt,
infilling context) are clamped after every step: they never change.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dlm.processes import base
from dlm.sample import categorical as cat
from dlm.sample import engine

Array = jax.Array

KNOBS = {
    "steps": engine.Knob(128, "denoising steps on t = 1, 1 - 1/T, ..., 0"),
    "gen_length": engine.Knob(64, "tokens generated after a prompt (generate)"),
    "temperature": engine.Knob(1.0, "softmax temperature of p(x0 | x_t); 0 = argmax"),
    "top_p": engine.Knob(1.0, "nucleus mass of p(x0 | x_t), in (0, 1]"),
    "gumbel_bits": engine.Knob(64, cat.BITS_DOC),
}


def x0_log_probs(process: Any, logits: Array, x_t: Array, temperature: float,
                 top_p: float) -> Array:
  """log p(x0 | x_t) after temperature and top-p; SUBS carry-over for absorbing processes."""
  if base.describe(process)[0] == "absorbing":
    logits = process.x0_logits(logits, x_t)
  if temperature == 0.0:
    best = jnp.argmax(logits, axis=-1)
    return jnp.where(jax.nn.one_hot(best, logits.shape[-1], dtype=bool), 0.0, -jnp.inf)
  return jax.nn.log_softmax(cat.adjust_logits(logits, temperature, top_p), axis=-1)


@engine.register("ancestral", knobs=KNOBS, pads=False, infill=True,
                 kinds=("absorbing", "uniform", "general"))
def ancestral(denoiser: engine.Denoiser, process: Any, *, steps: int, gen_length: int = 64,
              temperature: float = 1.0, top_p: float = 1.0,
              gumbel_bits: int = 64) -> engine.Sampler:
  """Ancestral sampling x_s ~ p(x_s | x_t) on t = 1, 1-1/T, ..., 0 (MDLM eq. 7 / D3PM eq. 4).

  For absorbing processes the last step draws every still-masked position from
  p(x_0 | x_t) ("noise removal", MDLM), since alpha(0) = 1 - eps would leave a
  few masks; other processes take the posterior at s = 0 as is.

  A denoiser without time conditioning (``denoiser.uses_t`` False) turns on MDLM's
  denoiser cache (Sahoo et al. 2024, sec. 3.4): when no token changed since the
  last call, its logits are reused and no call is made (``nfe`` counts calls).
  The draws are the same as without the cache; only the calls are saved.
  """
  del gen_length  # sizes the template in engine.generate
  absorbing = base.describe(process)[0] == "absorbing"
  cache = not denoiser.uses_t
  bits = cat.check_bits(gumbel_bits)
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")

  def call(x: Array, t: Array) -> Array:
    return denoiser(x, t)[0].astype(jnp.float32)  # a model without time conditioning ignores t

  def init(rng: Array, given: Array, fixed: Array, am: Array | None) -> engine.State:
    del am  # registered with pads=False
    rng, prior_rng = jax.random.split(rng)
    x = process.sample_prior(prior_rng, given.shape)
    aux: dict[str, Any] = {"step": jnp.zeros((), jnp.int32)}
    if cache:
      shape = jax.eval_shape(call, x, jnp.ones((x.shape[0],), jnp.float32)).shape
      aux.update(logits=jnp.zeros(shape, jnp.float32), logits_x=jnp.full(x.shape, -1, jnp.int32))
    return engine.initial_state(rng, given, fixed, x, **aux)

  def step(state: engine.State) -> engine.State:
    b = state.x.shape[0]
    i = state.aux["step"]
    aux = dict(state.aux, step=i + 1)
    t = jnp.full((b,), 1.0 - i / steps, jnp.float32)
    s = jnp.full((b,), 1.0 - (i + 1) / steps, jnp.float32)
    if cache:
      fresh = jnp.any(state.x != state.aux["logits_x"])
      logits = jax.lax.cond(fresh, lambda: call(state.x, t), lambda: state.aux["logits"])
      aux.update(logits=logits, logits_x=state.x)
      calls = fresh.astype(jnp.int32)
    else:
      logits, calls = call(state.x, t), 1  # [B, L, V]
    logp_x0 = x0_log_probs(process, logits, state.x, temperature, top_p)
    post = process.posterior_from_x0_probs(jnp.exp(logp_x0), state.x, t, s)  # [B, L, V]
    log_probs = jnp.log(post)
    if absorbing:
      log_probs = jnp.where(i + 1 >= steps, logp_x0, log_probs)
    rng, draw_rng = jax.random.split(state.rng)
    x = cat.categorical(draw_rng, log_probs, bits)
    x = jnp.where(state.fixed, state.given, x)
    committed = jnp.where(x != state.x, state.nfe + calls - 1, state.committed_at)
    return state.replace(x=x, rng=rng, nfe=state.nfe + calls, committed_at=committed, aux=aux)

  def done(state: engine.State) -> Array:
    return state.aux["step"] >= steps

  return engine.Sampler(init, step, done)
