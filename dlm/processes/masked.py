"""Absorbing-state ("masked") diffusion: D3PM-absorb, MDLM, MD4.

Forward: each token independently stays clean with probability alpha(t) and is
otherwise replaced by the absorbing token mask_id,

  q(x_t | x_0) = alpha_t onehot(x_0) + (1 - alpha_t) onehot(mask_id).

The denoiser is used through the SUBS parameterization of MDLM: p(x_0 | x_t)
never predicts mask_id and copies every unmasked token of x_t.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import chex
import jax
import jax.numpy as jnp

from dlm.processes import common
from dlm.processes.base import PROCESSES
from dlm.processes.schedules import Schedule

Array = jnp.ndarray


@PROCESSES.register("masked")
@dataclasses.dataclass(frozen=True)
class MaskedProcess:
  """Absorbing-state process (D3PM-absorb, Austin+ 2021; MDLM, Sahoo+ 2024; MD4, Shi+ 2024).

  vocab_size INCLUDES the mask token; data tokens are all ids except mask_id.
  Logits are [B, L, vocab_size]; the mask column is ignored (SUBS).
  """

  kind: ClassVar[str] = "absorbing"
  parameterization: ClassVar[str] = "x0"

  vocab_size: int
  mask_id: int
  schedule: Schedule

  def __post_init__(self):
    if not 0 <= self.mask_id < self.vocab_size:
      raise ValueError(
          f"mask_id={self.mask_id} must be in [0, vocab_size={self.vocab_size});"
          " vocab_size counts the mask token")

  # --- forward process -------------------------------------------------------

  def corrupt(self, rng: chex.PRNGKey, x0: Array, t: Array) -> Array:
    """x_t ~ q(x_t | x_0): keep each token w.p. alpha(t), else mask_id. [B, L]."""
    common.check_tokens_and_times(x0, t)
    alpha = common.bcast_time(self.schedule.alpha(t), 2)  # [B, 1]
    keep = jax.random.uniform(rng, x0.shape, jnp.float32) < alpha
    return jnp.where(keep, x0, jnp.asarray(self.mask_id, x0.dtype))

  def marginal(self, x0: Array, t: Array) -> Array:
    """q(x_t | x_0) = alpha onehot(x0) + (1 - alpha) onehot(mask): probs [B, L, V]."""
    common.check_tokens_and_times(x0, t)
    alpha = common.bcast_time(self.schedule.alpha(t), 3)  # [B, 1, 1]
    return (alpha * jax.nn.one_hot(x0, self.vocab_size, dtype=jnp.float32)
            + (1.0 - alpha) * self._mask_onehot())

  def sample_prior(self, rng: chex.PRNGKey, shape: tuple[int, ...]) -> Array:
    """p(x_1) = all mask_id (rng unused; kept for a uniform interface)."""
    del rng
    return jnp.full(shape, self.mask_id, jnp.int32)

  # --- denoiser parameterization ---------------------------------------------

  def x0_logits(self, logits: Array, x_t: Array) -> Array:
    """SUBS log p(x_0 | x_t) [B, L, V] (Sahoo et al. 2024, MDLM, 'SUBS' parameterization).

    Masked positions: log_softmax with the mask logit at NEG_INF (zero-masking
    probabilities). Unmasked positions: log one-hot on x_t (carry-over), with
    NEG_INF (finite) instead of -inf so nothing downstream turns into NaN.
    """
    common.check_logits(logits, x_t, self.vocab_size)
    mask_col = jnp.arange(self.vocab_size) == self.mask_id  # [V]
    logp = jax.nn.log_softmax(
        jnp.where(mask_col, common.NEG_INF, logits.astype(jnp.float32)), axis=-1)
    carry = jnp.where(
        jax.nn.one_hot(x_t, self.vocab_size, dtype=jnp.float32) > 0, 0.0,
        common.NEG_INF)  # [B, L, V]
    return jnp.where(self._is_masked(x_t)[..., None], logp, carry)

  # --- losses ----------------------------------------------------------------

  def nelbo(self, logits: Array, x0: Array, x_t: Array, t: Array,
            loss_mask: Array | None = None) -> Array:
    """Continuous-time NELBO per sequence, nats [B] (Shi+ 2024 MD4 eq. 4; Sahoo+ 2024 MDLM eq. 10).

      sum_l masked_l * (dalpha_t / (1 - alpha_t)) * log p(x0_l | x_t)  (>= 0)
    """
    self._check(logits, x0, x_t, t)
    alpha, dalpha = self.schedule.alpha(t), self.schedule.dalpha(t)  # [B] or [B, L]
    weight = common.safe_div(-dalpha, 1.0 - alpha)  # >= 0
    return self._masked_nll(logits, x0, x_t, loss_mask, weight)

  def discrete_nelbo(self, logits: Array, x0: Array, x_t: Array, t: Array,
                     s: Array, loss_mask: Array | None = None) -> Array:
    """sum_l KL(q(x_s|x_t,x0) || p(x_s|x_t)) per sequence [B], s < t (Austin+ 2021 D3PM eq. 1).

    For masking this is (alpha_s - alpha_t) / (1 - alpha_t) * sum_{masked} -log p(x0 | x_t).
    """
    self._check(logits, x0, x_t, t)
    chex.assert_equal_shape([t, s])
    alpha_t, alpha_s = self.schedule.alpha(t), self.schedule.alpha(s)  # [B] or [B, L]
    weight = common.safe_div(alpha_s - alpha_t, 1.0 - alpha_t)
    return self._masked_nll(logits, x0, x_t, loss_mask, weight)

  # --- reverse process -------------------------------------------------------

  def posterior(self, logits: Array, x_t: Array, t: Array, s: Array) -> Array:
    """Model step p(x_s | x_t) probs [B, L, V] (D3PM eq. 3 with x0 -> MDLM's SUBS x_theta)."""
    return self.posterior_from_x0_probs(
        jnp.exp(self.x0_logits(logits, x_t)), x_t, t, s)

  def posterior_from_x0_probs(self, x0_probs: Array, x_t: Array, t: Array,
                              s: Array) -> Array:
    """p(x_s | x_t) [B, L, V] given x0 probabilities [B, L, V] (e.g. after temperature / top-p).

    Masked x_t: stays masked w.p. (1-alpha_s)/(1-alpha_t), else becomes v w.p.
    (alpha_s-alpha_t)/(1-alpha_t) * x0_probs[v] (mask column zeroed, rows
    renormalized). Unmasked x_t: carried over with probability 1.
    """
    common.check_tokens_and_times(x_t, t)
    common.check_logits(x0_probs, x_t, self.vocab_size)
    chex.assert_equal_shape([t, s])
    alpha_t = common.bcast_time(self.schedule.alpha(t), 3)  # [B, 1, 1]
    alpha_s = common.bcast_time(self.schedule.alpha(s), 3)
    stay = jnp.clip(common.safe_div(1.0 - alpha_s, 1.0 - alpha_t), 0.0, 1.0)
    p = jnp.where(self._mask_onehot() > 0, 0.0, x0_probs.astype(jnp.float32))
    p = common.safe_div(p, jnp.sum(p, axis=-1, keepdims=True))  # [B, L, V]
    from_mask = (1.0 - stay) * p + stay * self._mask_onehot()  # [B, L, V]
    carry = jax.nn.one_hot(x_t, self.vocab_size, dtype=jnp.float32)
    return jnp.where(self._is_masked(x_t)[..., None], from_mask, carry)

  def exact_posterior(self, x0: Array, x_t: Array, t: Array, s: Array) -> Array:
    """q(x_s | x_t, x_0) probs [B, L, V] (closed form, one-hot x_0)."""
    chex.assert_equal_shape([x0, x_t])
    return self.posterior_from_x0_probs(
        jax.nn.one_hot(x0, self.vocab_size, dtype=jnp.float32), x_t, t, s)

  # --- helpers ---------------------------------------------------------------

  def _is_masked(self, x: Array) -> Array:
    return x == self.mask_id

  def _mask_onehot(self) -> Array:
    return jax.nn.one_hot(self.mask_id, self.vocab_size, dtype=jnp.float32)  # [V]

  def _masked_nll(self, logits: Array, x0: Array, x_t: Array, loss_mask: Array | None,
                  weight: Array) -> Array:
    """sum over counted masked positions of weight * -log p(x0_l | x_t): [B]; ``weight`` per
    row [B] or per position [B, L]."""
    counted = self._is_masked(x_t) & (common.loss_mask_or_ones(loss_mask, x0) > 0)
    if weight.ndim == 1:  # one time per row: the weight comes out of the sum
      return weight * jnp.sum(jnp.where(counted, self.masked_nll(logits, x0), 0.0), axis=-1)
    return jnp.sum(jnp.where(counted, weight * self.masked_nll(logits, x0), 0.0), axis=-1)

  def masked_nll(self, logits: Array, x0: Array) -> Array:
    """-log p(x0_l | x_t) [B, L] where x_t is masked: the SUBS log-probability of
    ``x0_logits`` at x0 (mask column excluded), without its [B, L, V] arrays."""
    common.check_logits(logits, x0, self.vocab_size)
    return common.nll_at(logits, x0, exclude=self.mask_id)

  def _check(self, logits: Array, x0: Array, x_t: Array, t: Array) -> None:
    common.check_tokens_and_times(x0, t)
    chex.assert_equal_shape([x0, x_t])
    common.check_logits(logits, x0, self.vocab_size)
