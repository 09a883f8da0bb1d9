"""State-dependent, learnable masking: GenMD4 (Shi et al. 2024, "Simplified and Generalized Masked
Diffusion for Discrete Data", sec. 6).

Each clean token v is masked on its own polynomial schedule,

  alpha_t(v) = 1 - (1 - eps) tau^{w_v},   tau = t1 + (1 - t1) t,   w = softplus(w_raw) [V],

so the continuous time t in [0, 1] of the framework covers MD4's [t1, 1].  The exponents w are
learned with the denoiser: they live in the denoiser's parameters (``params["process"]["w"]``,
declared by ``learned_params``) and a bound process (``bind``) reads them.  Their gradient through
the discrete draw of x_t is REINFORCE leave-one-out over two draws (``losses.genmd4_loss``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, ClassVar

import chex
import jax
import jax.numpy as jnp

from dlm.errors import UserError
from dlm.processes import common
from dlm.processes.base import PROCESSES
from dlm.processes.masked import MaskedProcess

Array = jnp.ndarray


@PROCESSES.register("genmd4")
@dataclasses.dataclass(frozen=True)
class GenMD4Process(MaskedProcess):
  """GenMD4 (Shi+ 2024, sec. 6, eq. 12): absorbing diffusion with per-token learnable schedules.

  ``power_init`` (MD4's, default 1: every token starts on the linear schedule), ``eps`` (MD4's
  1e-4: alpha_1 = eps), ``t1`` (MD4's 1e-3: the smallest time; the reconstruction term covers
  [0, t1]).  ``schedule`` is not used (the per-token polynomial replaces it).
  """

  kind: ClassVar[str] = "absorbing"
  parameterization: ClassVar[str] = "x0"
  # alpha depends on the clean token: the any-order (count) form of the NELBO does not hold
  per_token_schedule: ClassVar[bool] = True

  power_init: float = 1.0
  eps: float = 1e-4
  t1: float = 1e-3

  def __post_init__(self):
    super().__post_init__()
    if not self.power_init > 0:
      raise UserError(f"genmd4: power_init={self.power_init} must be > 0 (1 = linear schedule)")
    if not 0.0 <= self.eps < 1.0 or not 0.0 <= self.t1 < 1.0:
      raise UserError(f"genmd4: need 0 <= eps < 1 and 0 <= t1 < 1, got eps={self.eps},"
                      f" t1={self.t1}")

  # --- the learned parameters --------------------------------------------------

  def learned_params(self) -> tuple[tuple[str, tuple[int, ...], tuple[str], float], ...]:
    """w_raw [V] (``softplus(w_raw)`` = the exponents), initialised to power_init (MD4's init)."""
    return (("w", (self.vocab_size,), ("vocab",), math.log(math.expm1(self.power_init))),)

  def bind(self, params: Any) -> "GenMD4Process":
    """This process with the exponents of ``params["process"]["w"]`` (traced: gradients flow)."""
    from dlm import processes
    bound = copy.copy(self)
    object.__setattr__(bound, "_w_raw", processes.param_value(params, "process", "w"))
    return bound

  def power(self) -> Array:
    """w [V] = softplus(w_raw); before ``bind``, power_init everywhere."""
    raw = self.__dict__.get("_w_raw")
    if raw is None:
      return jnp.full((self.vocab_size,), self.power_init, jnp.float32)
    chex.assert_shape(raw, (self.vocab_size,))
    return jax.nn.softplus(raw.astype(jnp.float32))

  # --- the schedule, per token -------------------------------------------------

  def _tau(self, t: Array) -> Array:
    return self.t1 + (1.0 - self.t1) * jnp.asarray(t, jnp.float32)

  def alpha_v(self, t: Array) -> Array:
    """alpha_t(v) for every token v: [*t.shape, V] (the mask column is irrelevant)."""
    return 1.0 - self.masked_v(t)

  def masked_v(self, t: Array) -> Array:
    """1 - alpha_t(v) = (1 - eps) tau^{w_v}: [*t.shape, V], exact where alpha rounds to 1."""
    tau = common.bcast_time(self._tau(t), jnp.ndim(t) + 1)
    return (1.0 - self.eps) * tau ** self.power()

  def rate_v(self, t: Array) -> Array:
    """-alpha_t'(v) / (1 - alpha_t(v)) = (1 - t1) w_v / tau: [*t.shape, V] (MD4's dgamma*alpha)."""
    tau = common.bcast_time(self._tau(t), jnp.ndim(t) + 1)
    return (1.0 - self.t1) * self.power() / tau

  def _alpha_x(self, x0: Array, t: Array) -> Array:
    """alpha_t(x0) per position [B, L]."""
    a = self.alpha_v(t)  # [B, V] or [B, L, V]
    if a.ndim == 2:
      a = jnp.broadcast_to(a[:, None, :], x0.shape + a.shape[-1:])
    return common.gather_last(a, x0)

  # --- forward process ---------------------------------------------------------

  def corrupt(self, rng: chex.PRNGKey, x0: Array, t: Array) -> Array:
    """x_t ~ q(x_t | x_0): position l kept w.p. alpha_t(x0_l), else mask_id (MD4 GenMD4)."""
    common.check_tokens_and_times(x0, t)
    keep = jax.random.uniform(rng, x0.shape, jnp.float32) < self._alpha_x(x0, t)
    return jnp.where(keep, x0, jnp.asarray(self.mask_id, x0.dtype))

  def marginal(self, x0: Array, t: Array) -> Array:
    """q(x_t | x_0) probs [B, L, V]."""
    common.check_tokens_and_times(x0, t)
    a = self._alpha_x(x0, t)[..., None]
    return a * jax.nn.one_hot(x0, self.vocab_size) + (1.0 - a) * self._mask_onehot()

  def log_q(self, x_t: Array, x0: Array, t: Array, loss_mask: Array | None = None) -> Array:
    """log q(x_t | x_0) summed over counted positions [B]: the REINFORCE score's argument."""
    common.check_tokens_and_times(x0, t)
    a = self._alpha_x(x0, t)
    tau = common.bcast_time(self._tau(t), 2)
    w_x = common.gather_last(jnp.broadcast_to(self.power(), x0.shape + (self.vocab_size,)), x0)
    log_masked = math.log1p(-self.eps) + w_x * jnp.log(tau)  # log(1 - alpha_t(x0))
    log_kept = jnp.log(jnp.maximum(a, common.TINY))
    per_pos = jnp.where(self._is_masked(x_t), log_masked, log_kept)
    return jnp.sum(jnp.where(common.loss_mask_or_ones(loss_mask, x0) > 0, per_pos, 0.0), -1)

  # --- losses --------------------------------------------------------------------

  def nelbo(self, logits: Array, x0: Array, x_t: Array, t: Array,
            loss_mask: Array | None = None) -> Array:
    """NELBO per sequence [B] (Shi+ 2024, GenMD4 eq. 12), the integrand at t plus the [0, t1]
    reconstruction term:

      sum_{l masked} [ r_t(x0) (-log mu(x0)) + sum_v r_t(v) mu(v) - r_t(x0) ]
      + sum_l (1 - alpha_0(x0_l)) (-log p_dec(x0_l)),   r_t(v) = -alpha_t'(v) / (1 - alpha_t(v)),

    mu = SUBS softmax of the logits, p_dec(v) ∝ t1^{w_v} (MD4's decoder of a token masked at t1).
    With one w for every token the second and third terms cancel: MD4's eq. 4.
    """
    self._check(logits, x0, x_t, t)
    rate = self.rate_v(t)  # [B, V] or [B, L, V]
    if rate.ndim == 2:
      rate = jnp.broadcast_to(rate[:, None, :], x0.shape + rate.shape[-1:])
    rate = jnp.where(jnp.arange(self.vocab_size) == self.mask_id, 0.0, rate)
    log_mu = jnp.where(jnp.arange(self.vocab_size) == self.mask_id, common.NEG_INF,
                       logits.astype(jnp.float32))
    log_mu = jax.nn.log_softmax(log_mu, axis=-1)
    r_x = common.gather_last(rate, x0)
    integrand = (r_x * -common.gather_last(log_mu, x0)
                 + jnp.sum(rate * jnp.exp(log_mu), -1) - r_x)  # [B, L] (>= 0)
    counted = common.loss_mask_or_ones(loss_mask, x0) > 0
    diffusion = jnp.sum(jnp.where(counted & self._is_masked(x_t), integrand, 0.0), -1)
    return diffusion + self.reconstruction(x0, loss_mask)

  def reconstruction(self, x0: Array, loss_mask: Array | None = None) -> Array:
    """sum_l (1 - alpha_0(x0_l)) (-log p_dec(x0_l)) [B], p_dec(v) ∝ t1^{w_v} over data tokens
    (MD4's recon_loss; 0 when t1 = 0)."""
    if self.t1 == 0.0:
      return jnp.zeros(x0.shape[:1], jnp.float32)
    w = self.power()
    logit = jnp.where(jnp.arange(self.vocab_size) == self.mask_id, -jnp.inf, w * math.log(self.t1))
    log_dec = jax.nn.log_softmax(logit)[x0]  # [B, L]
    masked0 = 1.0 - self._alpha_x(x0, jnp.zeros(x0.shape[:1], jnp.float32))
    counted = common.loss_mask_or_ones(loss_mask, x0) > 0
    return jnp.sum(jnp.where(counted, masked0 * -log_dec, 0.0), -1)

  def discrete_nelbo(self, logits: Array, x0: Array, x_t: Array, t: Array,
                     s: Array, loss_mask: Array | None = None) -> Array:
    raise UserError("genmd4 has a continuous-time NELBO only: use loss 'genmd4' (or 'nelbo')")

  # --- reverse process -------------------------------------------------------------

  def posterior_from_x0_probs(self, x0_probs: Array, x_t: Array, t: Array,
                              s: Array) -> Array:
    """p(x_s | x_t) [B, L, V] (GenMD4's reverse step): from a mask, token v w.p.
    mu(v) (alpha_s(v) - alpha_t(v)) / (1 - alpha_t(v)), the rest stays masked; others carried."""
    common.check_tokens_and_times(x_t, t)
    common.check_logits(x0_probs, x_t, self.vocab_size)
    chex.assert_equal_shape([t, s])
    m_t, m_s = self.masked_v(t), self.masked_v(s)  # [B, V] or [B, L, V]
    if m_t.ndim == 2:
      m_t, m_s = m_t[:, None, :], m_s[:, None, :]
    unmask = jnp.clip(common.safe_div(m_t - m_s, m_t), 0.0, 1.0)
    p = jnp.where(self._mask_onehot() > 0, 0.0, x0_probs.astype(jnp.float32))
    p = common.safe_div(p, jnp.sum(p, axis=-1, keepdims=True))
    move = p * unmask  # [B, L, V], mask column 0
    from_mask = move + (1.0 - jnp.sum(move, -1, keepdims=True)) * self._mask_onehot()
    carry = jax.nn.one_hot(x_t, self.vocab_size, dtype=jnp.float32)
    return jnp.where(self._is_masked(x_t)[..., None], from_mask, carry)
