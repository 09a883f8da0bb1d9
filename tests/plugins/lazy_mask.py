"""A process written outside dlm (test-local), named by ``lazy_mask:LazyMaskProcess`` in a config.

"Lazy" absorbing diffusion: a token is masked with probability m(t) = t^2 (alpha = 1 - t^2), and
the denoiser is read through MDLM's SUBS.  Its continuous-time NELBO is MD4's eq. 4 with that
schedule, written here from scratch: nothing in dlm/ knows this class.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class LazyMaskProcess:
  kind: ClassVar[str] = "absorbing"
  parameterization: ClassVar[str] = "x0"

  vocab_size: int
  mask_id: int
  schedule: Any  # required by make_process; the t^2 schedule below replaces it
  floor: float = 1e-4  # keeps the weight 2t / t^2 = 2 / t finite near t = 0

  def _masked_prob(self, t):
    return jnp.maximum(jnp.square(t), self.floor)

  def corrupt(self, rng, x0, t):
    m = self._masked_prob(t).reshape(t.shape + (1,) * (x0.ndim - t.ndim))
    return jnp.where(jax.random.uniform(rng, x0.shape) < m, self.mask_id, x0)

  def sample_prior(self, rng, shape):
    del rng
    return jnp.full(shape, self.mask_id, jnp.int32)

  def x0_logits(self, logits, x_t):
    col = jnp.arange(self.vocab_size) == self.mask_id
    logp = jax.nn.log_softmax(jnp.where(col, -1e9, logits.astype(jnp.float32)), -1)
    carry = jnp.where(jax.nn.one_hot(x_t, self.vocab_size) > 0, 0.0, -1e9)
    return jnp.where((x_t == self.mask_id)[..., None], logp, carry)

  def nelbo(self, logits, x0, x_t, t, loss_mask=None):
    """sum over masked counted positions of (2t / t^2) (-log p(x0 | x_t)) per row [B]."""
    weight = 2.0 * t / self._masked_prob(t)
    nll = -jnp.take_along_axis(self.x0_logits(logits, x_t), x0[..., None], -1)[..., 0]
    counted = (x_t == self.mask_id) & ((jnp.ones_like(nll) if loss_mask is None
                                        else loss_mask) > 0)
    per_pos = jnp.where(counted, nll, 0.0)
    return weight * jnp.sum(per_pos, -1) if weight.ndim == 1 else jnp.sum(weight * per_pos, -1)

  def posterior_from_x0_probs(self, x0_probs, x_t, t, s):
    """From a mask: stay w.p. m(s) / m(t), else a token from x0_probs; others carried."""
    stay = (self._masked_prob(s) / self._masked_prob(t))[:, None, None]
    mask_col = jax.nn.one_hot(self.mask_id, self.vocab_size)
    p = jnp.where(mask_col > 0, 0.0, x0_probs)
    p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
    from_mask = (1.0 - stay) * p + stay * mask_col
    carry = jax.nn.one_hot(x_t, self.vocab_size)
    return jnp.where((x_t == self.mask_id)[..., None], from_mask, carry)
