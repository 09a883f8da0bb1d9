"""SEDD's samplers (Lou et al. 2024, sec. 4.2) for score-parameterized processes
(``sedd_absorbing``, ``sedd_uniform``), in the one sampling contract.

On t_i = 1 - i (1 - eps) / steps each position moves independently with the reverse rates
R(x_t -> y) = sigma(t) Q(y, x_t) s_theta(x_t)_y:

* ``euler``: p(y) = dt sigma(t) R_y for y != x_t, the rest stays (clipped, renormalized);
* ``tau_leaping``: one jump with probability 1 - exp(-dt sigma(t) sum_y R_y), to y in
  proportion to R_y (the exponential of the step's total rate);
* ``analytic`` (Tweedie tau-leaping, eq. 19): the process's ``tweedie`` step, exact for the
  exact score of one position.

``denoise`` adds SEDD's last step from t = eps to 0 (Tweedie with the whole remaining noise;
on the absorbing graph the mask is excluded, so every position ends as a token).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dlm.errors import UserError
from dlm.processes import base
from dlm.sample import categorical as cat
from dlm.sample import engine

Array = jax.Array
PREDICTORS = ("euler", "tau_leaping", "analytic")

KNOBS = {
    "steps": engine.Knob(128, "predictor steps on t = 1 .. eps (SEDD's steps)"),
    "gen_length": engine.Knob(64, "tokens generated after a prompt (generate)"),
    "predictor": engine.Knob("analytic", "euler, tau_leaping or analytic (Tweedie)"),
    "denoise": engine.Knob(True, "a last Tweedie step from eps to 0 (SEDD's denoise)"),
    "eps": engine.Knob(1e-5, "the last time of the grid (SEDD's eps)"),
    "gumbel_bits": engine.Knob(64, cat.BITS_DOC),
}


@engine.register("sedd", knobs=KNOBS, pads=False, infill=True, kinds=("absorbing", "uniform"),
                 params=("score",))
def make(denoiser: engine.Denoiser, process: Any, *, steps: int, gen_length: int = 64,
         predictor: str = "analytic", denoise: bool = True, eps: float = 1e-5,
         gumbel_bits: int = 64) -> engine.Sampler:
  """SEDD's sampling loop (Lou et al. 2024, sec. 4.2; Euler, tau-leaping, Tweedie eq. 19)."""
  del gen_length  # sizes the template in engine.generate
  if predictor not in PREDICTORS:
    raise UserError(f"predictor={predictor!r} unknown; use one of {', '.join(PREDICTORS)}")
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise UserError(f"steps={steps!r} must be an integer >= 1")
  if not 0.0 < eps < 1.0:
    raise UserError(f"eps={eps!r} must be in (0, 1)")
  bits = cat.check_bits(gumbel_bits)
  absorbing = base.describe(process)[0] == "absorbing"
  dt = (1.0 - eps) / steps
  total = steps + int(bool(denoise))

  def sigma_bar(t: Array) -> Array:
    return -jnp.log(jnp.maximum(process.schedule.alpha(t), 1e-30))

  def init(rng: Array, given: Array, fixed: Array, am: Array | None) -> engine.State:
    del am  # registered with pads=False
    rng, prior_rng = jax.random.split(rng)
    x = process.sample_prior(prior_rng, given.shape)
    return engine.initial_state(rng, given, fixed, x, step=jnp.zeros((), jnp.int32))

  def step(state: engine.State) -> engine.State:
    b = state.x.shape[0]
    i = state.aux["step"]
    last = i >= steps  # the denoising step, from eps to 0
    t = jnp.full((b,), 1.0 - jnp.minimum(i, steps) * dt, jnp.float32)
    log_s = process.log_score(denoiser(state.x, t)[0], t)
    s_next = jnp.where(last, 0.0, t - dt)
    dsigma = sigma_bar(t) - jnp.where(last, 0.0, sigma_bar(jnp.maximum(s_next, 0.0)))
    if predictor == "analytic":
      probs = process.tweedie(log_s, state.x, dsigma)
    else:
      rate = process.reverse_rate(log_s, state.x) * (dt * process.schedule.dalpha(t)
                                                     / -jnp.maximum(process.schedule.alpha(t),
                                                                    1e-30))[:, None, None]
      out = jnp.sum(rate, -1, keepdims=True)
      if predictor == "euler":
        move, stay = rate, jnp.maximum(1.0 - out, 0.0)
      else:  # tau-leaping: one jump with probability 1 - exp(-total rate)
        jump = -jnp.expm1(-out)
        move, stay = jump * rate / jnp.maximum(out, 1e-30), 1.0 - jump
      probs = move + stay * jax.nn.one_hot(state.x, rate.shape[-1], dtype=jnp.float32)
      probs = jnp.where(last, process.tweedie(log_s, state.x, dsigma), probs)
    if absorbing:  # the last step ends every position as a token
      drop = last & (jnp.arange(probs.shape[-1]) == process.mask_id)
      probs = jnp.where(drop, 0.0, probs)
    rng, key = jax.random.split(state.rng)
    x = cat.categorical(key, jnp.log(jnp.maximum(probs, 0.0)), bits)
    x = jnp.where(state.fixed, state.given, x)
    committed = jnp.where(x != state.x, state.nfe, state.committed_at)
    return state.replace(x=x, rng=rng, nfe=state.nfe + 1, committed_at=committed,
                         aux=dict(state.aux, step=i + 1))

  def done(state: engine.State) -> Array:
    return state.aux["step"] >= total

  return engine.Sampler(init, step, done)
