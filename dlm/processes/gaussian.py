"""Continuous embedding diffusion: Diffusion-LM (Li et al. 2022), CDCD (Dieleman et al. 2022),
Plaid (Gulrajani & Hashimoto 2023).

Tokens are embedded with the denoiser's own table, each row scaled to norm sqrt(D) (CDCD's
normalised embeddings: the prior's scale, and no collapse of the learned table), and noised
variance-preserving,

  z_t = sqrt(abar_t) e(x0) + sqrt(1 - abar_t) eps,   abar_t = schedule.alpha(t),

so SNR(t) = abar / (1 - abar).  The denoiser takes z_t as ``inputs_embeds`` and predicts x0
through a softmax over the vocabulary; its estimate of e(x0) is the expected embedding,
x0_hat = softmax(logits) @ e ("score interpolation", CDCD sec. 3).  The bound is VDM's
continuous-time one (Kingma et al. 2021, eq. 17) plus the prior and the rounding term
(Diffusion-LM's -log p(w | z_0)), in nats per token like every other process.
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
from dlm.processes.schedules import Schedule

Array = jnp.ndarray


@PROCESSES.register("gaussian")
@dataclasses.dataclass(frozen=True)
class GaussianProcess:
  """Gaussian diffusion over learned embeddings, x0 through a softmax (Li+ 2022; Dieleman+ 2022).

  ``self_condition`` (CDCD, Plaid): the denoiser also sees its previous x0 estimate (train with
  ``model.self_conditioning=True``).  ``time_warp`` > 0: CDCD's time warping (sec. 6.1) with that
  many bins, learned with the denoiser (the ``cdcd`` loss fits it and draws t from it).
  """

  kind: ClassVar[str] = "gaussian"
  parameterization: ClassVar[str] = "x0"

  vocab_size: int
  mask_id: int
  schedule: Schedule
  self_condition: bool = False
  time_warp: int = 0

  def __post_init__(self):
    if not 0 <= self.mask_id < self.vocab_size:
      raise ValueError(f"mask_id={self.mask_id} must be in [0, vocab_size={self.vocab_size})")
    if self.time_warp < 0:
      raise UserError(f"gaussian: time_warp={self.time_warp} must be >= 0 (0 = off)")

  # --- what it reads from the denoiser's parameters ---------------------------------

  def learned_params(self) -> tuple[tuple[str, tuple[int, ...], tuple[None], float], ...]:
    """CDCD's warp: unnormalised log-widths of ``time_warp`` equal-mass bins (0: uniform t)."""
    return (("warp", (self.time_warp,), (None,), 0.0),) if self.time_warp else ()

  def bind(self, params: Any) -> "GaussianProcess":
    """This process with the denoiser's embedding table (and its warp, when it learns one)."""
    from dlm import processes
    bound = copy.copy(self)
    object.__setattr__(bound, "_table", processes.param_value(params, "embed"))
    if self.time_warp:
      object.__setattr__(bound, "_warp", processes.param_value(params, "process", "warp"))
    return bound

  def embeddings(self) -> Array:
    """e [V, D]: the denoiser's table, rows scaled to norm sqrt(D) (CDCD's normalisation)."""
    table = self.__dict__.get("_table")
    if table is None:
      raise UserError("the gaussian process reads the denoiser's embedding table: bind it first"
                      " (dlm.processes.bind(process, params))")
    table = table.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(table * table, -1, keepdims=True) + 1e-12)
    return table / norm * math.sqrt(table.shape[-1])

  def clean(self, x0: Array) -> Array:
    """e(x0) [B, L, D]: the clean state of tokens (conditioning positions stay here)."""
    return jnp.take(self.embeddings(), x0, axis=0)

  # --- forward process ------------------------------------------------------------

  def _abar(self, t: Array, ndim: int = 3) -> Array:
    return common.bcast_time(self.schedule.alpha(t), ndim)

  def corrupt(self, rng: chex.PRNGKey, x0: Array, t: Array) -> Array:
    """z_t ~ N(sqrt(abar) e(x0), (1 - abar) I): [B, L, D] (VDM eq. 1, variance preserving)."""
    common.check_tokens_and_times(x0, t)
    e = self.clean(x0)
    abar = self._abar(t)
    return jnp.sqrt(abar) * e + jnp.sqrt(1.0 - abar) * jax.random.normal(rng, e.shape)

  def marginal(self, x0: Array, t: Array) -> tuple[Array, Array]:
    """q(z_t | x0) as (mean [B, L, D], std [B, 1, 1] or [B, L, 1])."""
    common.check_tokens_and_times(x0, t)
    abar = self._abar(t)
    return jnp.sqrt(abar) * self.clean(x0), jnp.sqrt(1.0 - abar)

  def sample_prior(self, rng: chex.PRNGKey, shape: tuple[int, ...]) -> Array:
    """z_1 ~ N(0, I): [*shape, D]."""
    return jax.random.normal(rng, tuple(shape) + (self.embeddings().shape[-1],))

  # --- the denoiser's x0 --------------------------------------------------------------

  def x0_probs(self, logits: Array) -> Array:
    """p(x0 | z_t) [B, L, V]: softmax over the vocabulary, the mask token excluded."""
    logits = jnp.where(jnp.arange(self.vocab_size) == self.mask_id, common.NEG_INF,
                       logits.astype(jnp.float32))
    return jax.nn.softmax(logits, axis=-1)

  def x0_estimate(self, probs: Array) -> Array:
    """x0_hat = probs @ e [B, L, D] (score interpolation, CDCD sec. 3)."""
    return probs @ self.embeddings()

  # --- the bound -------------------------------------------------------------------------

  def snr(self, t: Array) -> Array:
    abar = self.schedule.alpha(t)
    return abar / (1.0 - abar)

  def nelbo(self, logits: Array, x0: Array, x_t: Array, t: Array,
            loss_mask: Array | None = None) -> Array:
    """NELBO per sequence, nats [B] (VDM, Kingma+ 2021, eq. 17, + prior and rounding terms):

      sum_l  -1/2 SNR'(t) ||e(x0_l) - x0_hat_l||^2                      (diffusion)
           + KL(q(z_1 | x0_l) || N(0, I))                                (prior, closed form)
           + -log p(x0_l | z_0),  p(v | z_0) ∝ N(z_0; sqrt(abar_0) e_v, (1 - abar_0) I)  (rounding)

    z_0 = sqrt(abar_0) e + sqrt(1 - abar_0) eps reuses the eps of x_t (one unbiased draw).
    """
    common.check_tokens_and_times(x0, t)
    common.check_logits(logits, x0, self.vocab_size)
    chex.assert_rank(x_t, 3)
    e = self.embeddings()  # [V, D]
    e0 = jnp.take(e, x0, axis=0)  # [B, L, D]
    abar = self.schedule.alpha(t)  # [B] or [B, L]
    dabar = self.schedule.dalpha(t)
    # SNR = abar / (1 - abar): SNR' = abar' / (1 - abar)^2 (< 0)
    weight = -0.5 * dabar / jnp.square(1.0 - abar)
    sq = jnp.sum(jnp.square(e0 - self.x0_estimate(self.x0_probs(logits))), -1)  # [B, L]
    diffusion = common.bcast_time(weight, 2) * sq
    counted = common.loss_mask_or_ones(loss_mask, x0) > 0
    per_pos = diffusion + self.prior_kl(x0) + self.rounding(x0, x_t, t)
    return jnp.sum(jnp.where(counted, per_pos, 0.0), -1)

  def prior_kl(self, x0: Array) -> Array:
    """KL(N(sqrt(abar_1) e, (1 - abar_1) I) || N(0, I)) per position [B, L]."""
    a1 = self.schedule.alpha(jnp.ones((), jnp.float32))
    e0 = self.clean(x0)
    d = e0.shape[-1]
    return 0.5 * (a1 * jnp.sum(e0 * e0, -1) + d * (-a1 - jnp.log1p(-a1)))

  def rounding(self, x0: Array, x_t: Array, t: Array) -> Array:
    """-log p(x0 | z_0) per position [B, L] (Diffusion-LM's rounding term), z_0 from x_t's eps."""
    e = self.embeddings()
    e0 = jnp.take(e, x0, axis=0)
    abar_t = self._abar(t)
    eps = (x_t - jnp.sqrt(abar_t) * e0) / jnp.sqrt(jnp.maximum(1.0 - abar_t, common.TINY))
    a0 = self.schedule.alpha(jnp.zeros((), jnp.float32))
    z0 = jnp.sqrt(a0) * e0 + jnp.sqrt(1.0 - a0) * eps
    # log N(z0; sqrt(a0) e_v, (1 - a0) I) up to a constant in v: sqrt(a0) z0.e_v / (1-a0) - a0|e_v|^2/(2(1-a0))
    logit = (jnp.sqrt(a0) * (z0 @ e.T) - 0.5 * a0 * jnp.sum(e * e, -1)) / (1.0 - a0)
    logit = jnp.where(jnp.arange(self.vocab_size) == self.mask_id, -jnp.inf, logit)
    return common.nll_at(logit, x0)

  # --- the reverse step --------------------------------------------------------------------

  def ddim_step(self, z_t: Array, x0_hat: Array, t: Array, s: Array, eta: float,
                noise: Array) -> Array:
    """z_s from z_t and x0_hat (DDIM, Song et al. 2021, eq. 12): eta = 1 is DDPM's ancestral
    step q(z_s | z_t, x0_hat) (Ho et al. 2020, eq. 7), eta = 0 deterministic.  t, s [B]."""
    a_t, a_s = self._abar(t), self._abar(s)
    eps_hat = (z_t - jnp.sqrt(a_t) * x0_hat) / jnp.sqrt(jnp.maximum(1.0 - a_t, common.TINY))
    sigma = eta * jnp.sqrt(jnp.clip((1.0 - a_s) / jnp.maximum(1.0 - a_t, common.TINY)
                                    * (1.0 - a_t / a_s), 0.0, None))
    direction = jnp.sqrt(jnp.clip(1.0 - a_s - sigma * sigma, 0.0, None))
    return jnp.sqrt(a_s) * x0_hat + direction * eps_hat + sigma * noise

  def exact_posterior_params(self, x0: Array, z_t: Array, t: Array,
                             s: Array) -> tuple[Array, Array]:
    """q(z_s | z_t, x0) = N(mean, var) (Ho+ 2020, eq. 7): (mean [B, L, D], var [B, 1, 1])."""
    a_t, a_s = self._abar(t), self._abar(s)
    a_ts = a_t / a_s
    e0 = self.clean(x0)
    mean = (jnp.sqrt(a_s) * (1.0 - a_ts) * e0 + jnp.sqrt(a_ts) * (1.0 - a_s) * z_t) / (1.0 - a_t)
    return mean, (1.0 - a_s) * (1.0 - a_ts) / (1.0 - a_t)

  # --- CDCD's time warping --------------------------------------------------------------------

  def warp_knots(self) -> tuple[Array, Array]:
    """(t knots [K+1], F at the knots [K+1]): the learned monotone piecewise-linear F(t)
    (CDCD sec. 6.1), F(0) = 0, K bins of equal width in t with increments exp(warp) / K."""
    k = self.time_warp
    raw = self.__dict__.get("_warp")
    raw = jnp.zeros((k,), jnp.float32) if raw is None else raw.astype(jnp.float32)
    f = jnp.concatenate([jnp.zeros((1,)), jnp.cumsum(jnp.exp(raw) / k)])
    return jnp.linspace(0.0, 1.0, k + 1), f

  def warp_sample(self, u: Array) -> Array:
    """t = F^{-1}(u F(1)) for u in [0, 1]: times drawn with density F'(t) / F(1)."""
    knots, f = self.warp_knots()
    return jnp.interp(u * f[-1], f, knots)

  def warp_fit(self, t: Array, loss: Array) -> Array:
    """(F(t) - loss(t))^2 [B]: CDCD's fit of the unnormalised CDF F to the loss curve (the loss
    stopped: its gradient reaches only the warp)."""
    knots, f = self.warp_knots()
    return jnp.square(jnp.interp(t, knots, f) - jax.lax.stop_gradient(loss))
