"""The process interface and its registry.

A process is a frozen dataclass built as `cls(vocab_size=..., mask_id=...,
schedule=..., **extra_fields)`; every method is pure and jit-able. Shapes:
tokens int32 [B, L], times float32 [B] (one per row) or [B, L] (one per position),
logits float32 [B, L, V] with V = vocab_size.

Every process declares what it is, as class attributes (never probed from its methods):
``kind`` (how x_t is corrupted: absorbing, uniform, general, gaussian, or identity for the
autoregressive x_t = x_0) and ``parameterization`` (what the denoiser predicts: x0, score or
noise).  Losses and samplers say which kinds they take; a mismatch is one line naming both.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import chex
import jax.numpy as jnp

from dlm.errors import UserError
from dlm.processes.schedules import Schedule
from dlm.registry import Registry

Array = jnp.ndarray

PROCESSES: Registry[type] = Registry("process")
KINDS = ("absorbing", "uniform", "general", "gaussian", "identity")
PARAMETERIZATIONS = ("x0", "score", "noise")


class Process(Protocol):
  """What losses and samplers rely on (see MaskedProcess for the semantics)."""

  kind: ClassVar[str]  # one of KINDS
  parameterization: ClassVar[str]  # one of PARAMETERIZATIONS
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


def describe(process: Any) -> tuple[str, str]:
  """(kind, parameterization) a process declares; one line if it declares none or others."""
  name = type(process).__name__
  for attr, allowed in (("kind", KINDS), ("parameterization", PARAMETERIZATIONS)):
    value = getattr(type(process), attr, None)
    if value is None:
      raise UserError(f"process {name!r} declares no `{attr}`: give its class"
                      f" `{attr}: ClassVar[str] = ...`, one of {', '.join(allowed)}")
    if value not in allowed:
      raise UserError(f"process {name!r}: {attr} {value!r} is not one of {', '.join(allowed)}")
  return type(process).kind, type(process).parameterization


def check_takes(what: str, name: str, kinds: tuple[str, ...] | None, process: Any,
                fix: str = "", params: tuple[str, ...] | None = None) -> None:
  """One line unless ``process``'s kind is among ``kinds`` and its parameterization among
  ``params`` (None: any)."""
  if kinds is None and params is None:
    return
  kind, param = describe(process)
  if kinds is not None and kind not in kinds:
    raise UserError(f"{what} {name!r} cannot take process {type(process).__name__!r} (kind"
                    f" {kind}, {param}-parameterized): it takes {' or '.join(kinds)} processes"
                    + (f"; {fix}" if fix else ""))
  if params is not None and param not in params:
    raise UserError(f"{what} {name!r} cannot take process {type(process).__name__!r} (kind"
                    f" {kind}, {param}-parameterized): it takes {' or '.join(params)}-"
                    f"parameterized processes" + (f"; {fix}" if fix else ""))
