"""The process interface and its registry.

A process is a frozen dataclass built as `cls(vocab_size=..., mask_id=...,
schedule=..., **extra_fields)`; every method is pure and jit-able. Shapes:
tokens int32 [B, L], times float32 [B], logits float32 [B, L, V] with
V = vocab_size.
"""

from __future__ import annotations

from typing import Protocol

import chex
import jax.numpy as jnp

from dlm.processes.schedules import Schedule
from dlm.registry import Registry

Array = jnp.ndarray

PROCESSES: Registry[type] = Registry("process")


class Process(Protocol):
  """What losses and samplers rely on (see MaskedProcess for the semantics)."""

  vocab_size: int
  mask_id: int
  schedule: Schedule

  def corrupt(self, rng: chex.PRNGKey, x0: Array, t: Array) -> Array:
    ...

  def marginal(self, x0: Array, t: Array) -> Array:
    ...

  def sample_prior(self, rng: chex.PRNGKey, shape: tuple[int, ...]) -> Array:
    ...

  def nelbo(self, logits: Array, x0: Array, x_t: Array, t: Array,
            loss_mask: Array | None = None) -> Array:
    ...

  def discrete_nelbo(self, logits: Array, x0: Array, x_t: Array, t: Array,
                     s: Array, loss_mask: Array | None = None) -> Array:
    ...

  def posterior(self, logits: Array, x_t: Array, t: Array, s: Array) -> Array:
    ...

  def posterior_from_x0_probs(self, x0_probs: Array, x_t: Array, t: Array,
                              s: Array) -> Array:
    ...

  def exact_posterior(self, x0: Array, x_t: Array, t: Array, s: Array) -> Array:
    ...
