"""The autoregressive model as a (noise-free) process: p(x) = prod_l p(x_l | x_<l).

An AR model is this framework's Transformer with ``mask_kind="causal"`` and
``shift_logits=True`` (the prediction of token l is the network's output l-1), and the
"process" that goes with it corrupts nothing: x_t = x_0 at every t, so the loss,
``nelbo`` below, is the exact negative log-likelihood (Bengio et al. 2003, eq. 1; the
chain rule) and ``dlm eval`` reports it as bits per byte beside the diffusion NELBOs on
the same rows.  Position 0 has no prediction and is not counted.  There is no prior and
no reverse step: AR models generate with the ``ar`` sampler (dlm/sample/ar.py).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import chex
import jax
import jax.numpy as jnp

from dlm.processes import common
from dlm.processes.base import PROCESSES
from dlm.processes.schedules import LinearSchedule, Schedule

Array = jnp.ndarray


@PROCESSES.register("autoregressive")
@dataclasses.dataclass(frozen=True)
class AutoregressiveProcess:
  """Next-token prediction: x_t = x_0; nelbo = sum_{l >= 1} -log p(x_l | x_<l) per sequence."""

  kind: ClassVar[str] = "identity"
  parameterization: ClassVar[str] = "x0"

  vocab_size: int
  mask_id: int | None = None  # AR models have no mask token; unused
  schedule: Schedule = dataclasses.field(default_factory=LinearSchedule)  # unused: no noise

  def corrupt(self, rng: chex.PRNGKey, x0: Array, t: Array) -> Array:
    """x_t = x_0 (no noise at any t)."""
    del rng
    common.check_tokens_and_times(x0, t)
    return x0

  def marginal(self, x0: Array, t: Array) -> Array:
    """q(x_t | x_0) = onehot(x_0): probs [B, L, V]."""
    common.check_tokens_and_times(x0, t)
    return jax.nn.one_hot(x0, self.vocab_size, dtype=jnp.float32)

  def sample_prior(self, rng: chex.PRNGKey, shape: tuple[int, ...]) -> Array:
    raise ValueError("an autoregressive model has no prior to start from: generate after a"
                     " prompt with sampler='ar'")

  def nll(self, logits: Array, x0: Array, loss_mask: Array | None = None) -> Array:
    """sum_{l >= 1, counted} -log softmax(logits_l)[x0_l] per sequence, nats [B]; logits_l is
    the (shifted) prediction of token l from x_<l."""
    common.check_logits(logits, x0, self.vocab_size)
    counted = (common.loss_mask_or_ones(loss_mask, x0) > 0) & (jnp.arange(x0.shape[1]) > 0)
    return jnp.sum(jnp.where(counted, common.nll_at(logits, x0), 0.0), axis=-1)

  def nelbo(self, logits: Array, x0: Array, x_t: Array, t: Array,
            loss_mask: Array | None = None) -> Array:
    """The exact NLL (``nll``): with no noise the bound is tight at every t."""
    common.check_tokens_and_times(x0, t)
    chex.assert_equal_shape([x0, x_t])
    return self.nll(logits, x0, loss_mask)

  def discrete_nelbo(self, logits: Array, x0: Array, x_t: Array, t: Array, s: Array,
                     loss_mask: Array | None = None) -> Array:
    """The NLL divided among T steps: T * this = ``nll`` (discrete_nelbo_loss multiplies by T)."""
    chex.assert_equal_shape([t, s])
    return (t - s) * self.nelbo(logits, x0, x_t, t, loss_mask)

  def _no_reverse(self, *_: Array) -> Array:
    raise ValueError("an autoregressive model has no reverse diffusion step: generate with"
                     " sampler='ar'")

  posterior = posterior_from_x0_probs = exact_posterior = _no_reverse
