"""Score entropy discrete diffusion (SEDD, Lou et al. 2024) on the absorbing and uniform graphs.

The forward processes are MaskedProcess's and UniformProcess's: SEDD's graph generators
Q_absorb and Q_uniform with total noise sigma_bar(t) give exactly those marginals with
alpha_t = exp(-sigma_bar(t)), so the rate is sigma(t) = -alpha'_t / alpha_t.  What changes is
the denoiser's output: the log concrete score, logits[..., y] = log s_theta(x_t, t)_y, an
estimate of p_t(..y..) / p_t(x_t) for y a neighbour of x_t (``parameterization = "score"``).
``nelbo`` is the diffusion-weighted denoising score entropy (DWDSE, Lou et al. 2024 eq. 8 /
Thm. 3.6), an upper bound on -log p(x0) (plus the prior term, 0 when alpha(1) = 0):

  int_0^1 sum_l sum_{y != x_t^l} Q_t(y, x_t^l) [s_y - r_y log s_y + K(r_y)] dt,
  r_y = p_t(y | x0) / p_t(x_t | x0),   K(a) = a (log a - 1).

Each bracket is evaluated as r psi(log(s / r)) (+ s where r = 0), psi(d) = e^d - 1 - d >= 0:
non-negative terms, no cancellation.  With the exact score of an x0 predictor the DWDSE is
that predictor's NELBO (the masked and uniform NELBOs; tests/test_sedd.py).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from dlm.processes import common
from dlm.processes.base import PROCESSES
from dlm.processes.masked import MaskedProcess
from dlm.processes.uniform import UniformProcess

Array = jnp.ndarray


def psi(d: Array) -> Array:
  """e^d - 1 - d >= 0 (s - r log s + r log r - r = r psi(log(s / r)))."""
  return jnp.expm1(d) - d


@PROCESSES.register("sedd_absorbing")
@dataclasses.dataclass(frozen=True)
class SEDDAbsorbing(MaskedProcess):
  """SEDD on the absorbing graph: a masked position's neighbours are the tokens y (rate
  sigma(t) from y into the mask), so r_y = alpha / (1 - alpha) at y = x0 and 0 elsewhere."""

  parameterization: ClassVar[str] = "score"
  # SEDD's scale_by_sigma: the network's output plus log r(t) - log(V - 1) is the log score, so
  # a denoiser without time conditioning predicts log p(x0 | x_t) up to a constant
  scale_by_sigma: bool = False

  def log_score(self, logits: Array, t: Array) -> Array:
    """The log score [B, L, V] the network's ``logits`` stand for at time ``t``."""
    if not self.scale_by_sigma:
      return logits.astype(jnp.float32)
    alpha = common.bcast_time(self.schedule.alpha(t), 3)
    log_r = jnp.log(jnp.maximum(alpha, common.TINY)) - jnp.log(jnp.maximum(1.0 - alpha,
                                                                           common.TINY))
    return logits.astype(jnp.float32) + log_r - jnp.log(self.vocab_size - 2.0)

  def nelbo(self, logits: Array, x0: Array, x_t: Array, t: Array,
            loss_mask: Array | None = None) -> Array:
    """DWDSE per sequence, nats [B]: over masked l, sigma(t) [sum_{y != x0} s_y + r psi(log
    s_x0 - log r)], r = alpha / (1 - alpha) (Lou et al. 2024, eq. 8, absorbing graph)."""
    self._check(logits, x0, x_t, t)
    logits = self.log_score(logits, t)
    alpha, dalpha = self.schedule.alpha(t), self.schedule.dalpha(t)  # [B] or [B, L]
    sigma = common.bcast_time(common.safe_div(-dalpha, alpha), 2)  # rate into the mask
    log_r = common.bcast_time(jnp.log(jnp.maximum(alpha, common.TINY))
                              - jnp.log(jnp.maximum(1.0 - alpha, common.TINY)), 2)
    log_s = logits.astype(jnp.float32)
    token = jnp.arange(self.vocab_size) != self.mask_id
    others = token & (jnp.arange(self.vocab_size) != x0[..., None])  # y != x0, y != mask
    rest = jnp.sum(jnp.where(others, jnp.exp(jnp.minimum(log_s, 80.0)), 0.0), -1)  # [B, L]
    log_s_x0 = common.gather_last(log_s, x0)
    per_pos = sigma * (rest + jnp.exp(log_r) * psi(jnp.clip(log_s_x0 - log_r, -80.0, 80.0)))
    counted = self._is_masked(x_t) & (common.loss_mask_or_ones(loss_mask, x0) > 0)
    return jnp.sum(jnp.where(counted, per_pos, 0.0), -1)

  def reverse_rate(self, log_score: Array, x_t: Array) -> Array:
    """R(x_t -> y) / sigma(t) [B, L, V]: Q(y, x_t) s_y, y != x_t (only masks move, to tokens)."""
    token = jnp.arange(self.vocab_size) != self.mask_id
    s = jnp.where(token, jnp.exp(jnp.minimum(log_score.astype(jnp.float32), 80.0)), 0.0)
    return jnp.where(self._is_masked(x_t)[..., None], s, 0.0)

  def tweedie(self, log_score: Array, x_t: Array, dsigma: Array) -> Array:
    """Tweedie tau-leaping p(x_s | x_t) up to normalization [B, L, V] (Lou et al. 2024, eq. 19):
    exp(dsigma Q)(y, x_t) (exp(-dsigma Q)^T s)_y, dsigma = sigma_bar(t) - sigma_bar(s).  On the
    absorbing graph a mask becomes token y with (e^dsigma - 1) s_y and stays with
    1 - (e^dsigma - 1) sum_y s_y; with the exact score this is the exact reverse step."""
    em1 = common.bcast_time(jnp.expm1(dsigma), 3)  # e^dsigma - 1
    s = self.reverse_rate(log_score, x_t)
    stay = jnp.maximum(1.0 - em1 * jnp.sum(s, -1, keepdims=True), 0.0)
    masked = em1 * s + stay * self._mask_onehot()
    return jnp.where(self._is_masked(x_t)[..., None], masked,
                     jax.nn.one_hot(x_t, self.vocab_size, dtype=jnp.float32))

  def score_of_x0_logits(self, x0_logits: Array, t: Array) -> Array:
    """The log score of an x0 predictor at masked positions: log r + log p(x0 = y | x_t)
    (mask column excluded).  SUBS of a log score (``x0_logits``) undoes it: the analytic
    (Tweedie) reverse step is the masked posterior of the normalized score."""
    alpha = common.bcast_time(self.schedule.alpha(t), 3)
    log_r = jnp.log(jnp.maximum(alpha, common.TINY)) - jnp.log(jnp.maximum(1.0 - alpha,
                                                                           common.TINY))
    mask_col = jnp.arange(self.vocab_size) == self.mask_id
    logp = jax.nn.log_softmax(jnp.where(mask_col, common.NEG_INF, x0_logits), -1)
    return jnp.where(mask_col, common.NEG_INF, log_r + logp)


@PROCESSES.register("sedd_uniform")
@dataclasses.dataclass(frozen=True)
class SEDDUniform(UniformProcess):
  """SEDD on the uniform graph: every y != x_t is a neighbour at rate sigma(t) / V, with
  r_y = g_y / g_{x_t}, g = alpha onehot(x0) + (1 - alpha) / V."""

  parameterization: ClassVar[str] = "score"

  def log_score(self, logits: Array, t: Array) -> Array:
    """The log score [B, L, V] the network's ``logits`` stand for (they are it)."""
    del t
    return logits.astype(jnp.float32)

  def nelbo(self, logits: Array, x0: Array, x_t: Array, t: Array,
            loss_mask: Array | None = None) -> Array:
    """DWDSE per sequence, nats [B]: over positions, (sigma / V) sum_{y != x_t} r_y psi(log
    s_y - log r_y) (Lou et al. 2024, eq. 8, uniform graph)."""
    self._check(logits, x0, x_t, t)
    alpha, dalpha = self.schedule.alpha(t), self.schedule.dalpha(t)
    sigma = common.bcast_time(common.safe_div(-dalpha, alpha), 2)
    log_g = self._log_q_t(self._log_onehot(x0), common.bcast_time(alpha, 3))  # [B, L, V]
    log_r = log_g - common.gather_last(log_g, x_t)[..., None]
    log_s = logits.astype(jnp.float32)
    terms = jnp.exp(log_r) * psi(jnp.clip(log_s - log_r, -80.0, 80.0))
    neighbour = jnp.arange(self.vocab_size) != x_t[..., None]
    per_pos = sigma / self.vocab_size * jnp.sum(jnp.where(neighbour, terms, 0.0), -1)
    counted = common.loss_mask_or_ones(loss_mask, x0) > 0
    return jnp.sum(jnp.where(counted, per_pos, 0.0), -1)

  def reverse_rate(self, log_score: Array, x_t: Array) -> Array:
    """R(x_t -> y) / sigma(t) [B, L, V]: Q(y, x_t) s_y = s_y / V for y != x_t."""
    s = jnp.exp(jnp.minimum(log_score.astype(jnp.float32), 80.0)) / self.vocab_size
    return jnp.where(jnp.arange(self.vocab_size) != x_t[..., None], s, 0.0)

  def tweedie(self, log_score: Array, x_t: Array, dsigma: Array) -> Array:
    """Tweedie tau-leaping p(x_s | x_t) up to normalization [B, L, V] (Lou et al. 2024, eq. 19):
    exp(dsigma Q)(y, x_t) (exp(-dsigma Q)^T s)_y with s_{x_t} = 1; Q = 11^T/V - I gives
    exp(+-d Q) = e^{-+d} I + (1 - e^{-+d}) 11^T / V."""
    d = common.bcast_time(dsigma, 3)
    own = jax.nn.one_hot(x_t, self.vocab_size, dtype=jnp.float32) > 0
    s = jnp.where(own, 1.0, jnp.exp(jnp.minimum(log_score.astype(jnp.float32), 80.0)))
    stag = jnp.exp(d) * s - jnp.expm1(d) * jnp.mean(s, -1, keepdims=True)
    into = jnp.exp(-d) * own + -jnp.expm1(-d) / self.vocab_size
    return jnp.maximum(stag, 0.0) * into

  def score_of_x0_logits(self, x0_logits: Array, x_t: Array, t: Array) -> Array:
    """The log score of an x0 predictor: log f_y - log f_{x_t}, f = alpha x_hat + (1-alpha)/V."""
    log_f = self._log_q_t(jax.nn.log_softmax(x0_logits.astype(jnp.float32), -1),
                          common.bcast_time(self.schedule.alpha(t), 3))
    return log_f - common.gather_last(log_f, x_t)[..., None]
