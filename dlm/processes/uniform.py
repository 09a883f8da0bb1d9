"""Uniform-state diffusion: D3PM-uniform, UDLM, Duo.

Forward: each token independently stays clean w.p. alpha(t) and is otherwise
resampled uniformly over ALL vocab_size ids (the resample may return the same
token),

  q(x_t | x_0) = alpha_t onehot(x_0) + (1 - alpha_t) / V.

mask_id is only a vocabulary entry the data never contains; this process does
not treat it specially (noise can produce it, the prior draws it with prob 1/V).
The model's x0 prediction is x_hat = softmax(logits) (no SUBS), and all model
distributions are the forward-process formulas with onehot(x_0) -> x_hat.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar
import math

import chex
import jax
import jax.numpy as jnp

from dlm.processes import common
from dlm.processes.base import PROCESSES
from dlm.processes.schedules import Schedule

Array = jnp.ndarray

_LOG_RATIO_MIN = -80.0  # log(p/q) below this is treated as p = 0 (exp(-80) ~ 2e-35)


def phi_exp(d: Array) -> Array:
  """phi(e^d) for phi(u) = u log u - u + 1 (>= 0, ~ d^2/2 near 0); valid for d <= 1."""
  series = d * d * (0.5 + d * (1.0 / 3.0 + d * (1.0 / 8.0 + d / 30.0)))
  direct = d * jnp.exp(d) - jnp.expm1(d)
  return jnp.where(jnp.abs(d) < 1e-2, series, direct)


def generalized_kl(log_p: Array, log_q: Array) -> Array:
  """Elementwise p log(p/q) - p + q = q phi(p/q) >= 0, stable, p = 0 allowed.

  Summed over a normalized pair this is KL(p || q); every term is
  non-negative, so there is no cancellation when p ~ q (small steps, t -> 1).
  log_q must be finite.
  """
  d = jnp.maximum(log_p - log_q, _LOG_RATIO_MIN)  # log(p/q)
  q = jnp.exp(log_q)
  d_big = jnp.maximum(d, 1.0)
  big = jnp.exp(log_q + d_big) * (d_big - 1.0) + q  # p (d - 1) + q, both >= 0
  small = q * phi_exp(jnp.minimum(d, 1.0))
  return jnp.where(d > 1.0, big, small)


@PROCESSES.register("uniform")
@dataclasses.dataclass(frozen=True)
class UniformProcess:
  """Uniform-state process (D3PM-uniform, Austin+ 2021; UDLM, Schiff+ 2025; Duo, Sahoo+ 2025).

  Noise is uniform over all vocab_size ids, mask_id included (it is just a
  token the data never contains). Logits are [B, L, vocab_size].
  """

  kind: ClassVar[str] = "uniform"
  parameterization: ClassVar[str] = "x0"

  vocab_size: int
  mask_id: int
  schedule: Schedule

  def __post_init__(self):
    if not 0 <= self.mask_id < self.vocab_size:
      raise ValueError(
          f"mask_id={self.mask_id} must be in [0, vocab_size={self.vocab_size})")

  # --- forward process -------------------------------------------------------

  def corrupt(self, rng: chex.PRNGKey, x0: Array, t: Array) -> Array:
    """x_t ~ q(x_t | x_0): keep w.p. alpha(t), else a uniform draw over V ids. [B, L]."""
    common.check_tokens_and_times(x0, t)
    k_keep, k_noise = jax.random.split(rng)
    alpha = common.bcast_time(self.schedule.alpha(t), 2)  # [B, 1]
    keep = jax.random.uniform(k_keep, x0.shape, jnp.float32) < alpha
    noise = jax.random.randint(k_noise, x0.shape, 0, self.vocab_size, x0.dtype)
    return jnp.where(keep, x0, noise)

  def marginal(self, x0: Array, t: Array) -> Array:
    """q(x_t | x_0) = alpha onehot(x0) + (1 - alpha)/V: probs [B, L, V]."""
    common.check_tokens_and_times(x0, t)
    alpha = common.bcast_time(self.schedule.alpha(t), 3)  # [B, 1, 1]
    return (alpha * jax.nn.one_hot(x0, self.vocab_size, dtype=jnp.float32)
            + (1.0 - alpha) / self.vocab_size)

  def sample_prior(self, rng: chex.PRNGKey, shape: tuple[int, ...]) -> Array:
    """p(x_1) = uniform over all vocab_size ids."""
    return jax.random.randint(rng, shape, 0, self.vocab_size, jnp.int32)

  # --- losses ----------------------------------------------------------------

  def nelbo(self, logits: Array, x0: Array, x_t: Array, t: Array,
            loss_mask: Array | None = None) -> Array:
    """Continuous-time NELBO per sequence, nats [B] (Campbell+ 2022 CTMC ELBO L_CT; UDLM, Schiff+).

    Uniform rate matrix R_t = beta_t (11^T/V - I), beta_t = -alpha'_t / alpha_t.

    With beta = -alpha'/alpha, f = alpha x_hat + (1-alpha)/V (model), g = alpha
    onehot(x0) + (1-alpha)/V (data), x = x_t, the per-position integrand is the
    path-KL between the true reverse rates (beta/V) g_y/g_x and the model's
    (beta/V) f_y/f_x:

      (beta/V) sum_y [f_y/f_x - g_y/g_x + (g_y/g_x) log(g_y f_x / (g_x f_y))]
      = (beta/V) [1/f_x - 1/g_x + (KL(g||f) - log(g_x/f_x)) / g_x]   (sum f = sum g = 1)
      = (beta/V) sum_y (f_y/f_x) phi((g_y/g_x) / (f_y/f_x)),   phi(u) = u log u - u + 1.

    The last form (non-negative terms, computed in log space) is what is
    evaluated: it has no cancellation as alpha -> 0, where the integrand is
    O(alpha^2) * beta -> 0, and no overflow as alpha -> 1. (The closed form
    loses ~3 digits at alpha ~ 1e-4 in float32.) Cost: a few [B, L, V] float32
    temporaries, versus one for the masked loss.
    """
    self._check(logits, x0, x_t, t)
    alpha, dalpha = self.schedule.alpha(t), self.schedule.dalpha(t)  # [B]
    a = common.bcast_time(alpha, 3)  # [B, 1, 1]
    log_f = self._log_q_t(jax.nn.log_softmax(logits.astype(jnp.float32)), a)
    log_g = self._log_q_t(self._log_onehot(x0), a)  # [B, L, V]
    log_f_x = common.gather_last(log_f, x_t)[..., None]  # [B, L, 1]
    log_g_x = common.gather_last(log_g, x_t)[..., None]
    per_pos = jnp.sum(generalized_kl(log_g - log_g_x, log_f - log_f_x), -1)  # [B, L]
    counted = common.loss_mask_or_ones(loss_mask, x0) > 0
    beta = common.safe_div(-dalpha, alpha)  # [B] or [B, L]; integrand is 0 where alpha = 0
    if beta.ndim == 1:  # one time per row
      return beta / self.vocab_size * jnp.sum(jnp.where(counted, per_pos, 0.0), -1)
    return jnp.sum(jnp.where(counted, beta / self.vocab_size * per_pos, 0.0), -1)

  def discrete_nelbo(self, logits: Array, x0: Array, x_t: Array, t: Array,
                     s: Array, loss_mask: Array | None = None) -> Array:
    """sum_l KL(q(x_s|x_t,x0) || q(x_s|x_t,x_hat)) per sequence [B], s < t (D3PM eq. 1)."""
    self._check(logits, x0, x_t, t)
    chex.assert_equal_shape([t, s])
    log_p = self._log_posterior(self._log_onehot(x0), x_t, t, s)  # [B, L, V]
    log_q = self._log_posterior(
        jax.nn.log_softmax(logits.astype(jnp.float32)), x_t, t, s)
    per_pos = jnp.sum(generalized_kl(log_p, log_q), -1)  # [B, L]
    counted = common.loss_mask_or_ones(loss_mask, x0) > 0
    return jnp.sum(jnp.where(counted, per_pos, 0.0), -1)

  # --- reverse process -------------------------------------------------------

  def posterior(self, logits: Array, x_t: Array, t: Array, s: Array) -> Array:
    """Model step q(x_s | x_t, x0 = x_hat) probs [B, L, V] (D3PM eq. 3, x0 -> softmax(logits))."""
    common.check_tokens_and_times(x_t, t)
    common.check_logits(logits, x_t, self.vocab_size)
    chex.assert_equal_shape([t, s])
    return jnp.exp(self._log_posterior(
        jax.nn.log_softmax(logits.astype(jnp.float32)), x_t, t, s))

  def posterior_from_x0_probs(self, x0_probs: Array, x_t: Array, t: Array,
                              s: Array) -> Array:
    """q(x_s | x_t, x0 = x0_probs) probs [B, L, V] (D3PM eq. 3, linear in x0; rows renormalized).

      propto [alpha_{t|s} 1(x_t = x_s) + (1 - alpha_{t|s})/V]
             * [alpha_s x0_probs + (1 - alpha_s)/V],
      alpha_{t|s} = alpha_t / alpha_s.
    """
    common.check_tokens_and_times(x_t, t)
    common.check_logits(x0_probs, x_t, self.vocab_size)
    chex.assert_equal_shape([t, s])
    a_s = common.bcast_time(self.schedule.alpha(s), 3)  # [B, 1, 1]
    p = x0_probs.astype(jnp.float32)
    p = common.safe_div(p, jnp.sum(p, axis=-1, keepdims=True))
    prior_s = a_s * p + (1.0 - a_s) / self.vocab_size  # q(x_s | x0_probs)
    joint = self._likelihood(x_t, t, s) * prior_s  # [B, L, V]
    return common.safe_div(joint, jnp.sum(joint, axis=-1, keepdims=True))

  def exact_posterior(self, x0: Array, x_t: Array, t: Array, s: Array) -> Array:
    """q(x_s | x_t, x_0) probs [B, L, V] (D3PM eq. 3, one-hot x_0)."""
    chex.assert_equal_shape([x0, x_t])
    return self.posterior_from_x0_probs(
        jax.nn.one_hot(x0, self.vocab_size, dtype=jnp.float32), x_t, t, s)

  # --- helpers ---------------------------------------------------------------

  def _log_onehot(self, x: Array) -> Array:
    return jnp.where(jax.nn.one_hot(x, self.vocab_size) > 0, 0.0, -jnp.inf)

  def _log_q_t(self, log_x0: Array, alpha: Array) -> Array:
    """log(alpha x0 + (1 - alpha)/V) from log x0 [B, L, V] (alpha broadcastable)."""
    return jnp.logaddexp(jnp.log(alpha) + log_x0,
                         jnp.log1p(-alpha) - math.log(self.vocab_size))

  def _likelihood(self, x_t: Array, t: Array, s: Array) -> Array:
    """q(x_t | x_s = y) as a function of y: [B, L, V], floored at TINY."""
    alpha_t = common.bcast_time(self.schedule.alpha(t), 3)  # [B, 1, 1]
    alpha_s = common.bcast_time(self.schedule.alpha(s), 3)
    alpha_ts = jnp.clip(common.safe_div(alpha_t, alpha_s), 0.0, 1.0)  # alpha_{t|s}
    lik = (alpha_ts * jax.nn.one_hot(x_t, self.vocab_size, dtype=jnp.float32)
           + (1.0 - alpha_ts) / self.vocab_size)
    return jnp.maximum(lik, common.TINY)

  def _log_posterior(self, log_x0: Array, x_t: Array, t: Array,
                     s: Array) -> Array:
    """log q(x_s | x_t, x0) [B, L, V] for an x0 distribution given in log space."""
    alpha_s = common.bcast_time(self.schedule.alpha(s), 3)  # [B, 1, 1]
    log_joint = jnp.log(self._likelihood(x_t, t, s)) + self._log_q_t(log_x0, alpha_s)
    return log_joint - jax.nn.logsumexp(log_joint, axis=-1, keepdims=True)

  def _check(self, logits: Array, x0: Array, x_t: Array, t: Array) -> None:
    common.check_tokens_and_times(x0, t)
    chex.assert_equal_shape([x0, x_t])
    common.check_logits(logits, x0, self.vocab_size)
