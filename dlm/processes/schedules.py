"""Masking / noising schedules alpha(t): the probability a token is still clean.

Every schedule maps t in [0, 1] to alpha(t) with alpha(0) ~ 1 (data) and
alpha(1) ~ 0 (pure noise), strictly decreasing, and provides the analytic
derivative dalpha(t) = d alpha / dt (< 0) that the continuous-time ELBO weights
need. Both are elementwise on float32 arrays and jit-able.

Clipping (MD4, Shi et al. 2024, masking_schedule.py): the raw schedule is
squeezed into [eps, 1 - eps],

  alpha(t) = eps + (1 - 2 eps) alpha_raw(t),   dalpha(t) = (1 - 2 eps) dalpha_raw(t),

so eps = 0 gives the exact raw schedule. The default eps = 1e-4 (MD4's value)
keeps 1 - alpha(t) >= 1e-4 near t = 0 (the masked ELBO weight dalpha/(1-alpha)
stays <= ~1e4 instead of diverging) and alpha(t) >= 1e-4 near t = 1 (the
uniform-process rate -dalpha/alpha stays finite); the price is a prior /
reconstruction mismatch of order eps, which the continuous-time NELBO ignores.
Use eps = 0 for exact-math tests.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax.numpy as jnp

from dlm.registry import Registry

Array = jnp.ndarray

SCHEDULES: Registry[type] = Registry("schedule")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Base class: subclasses implement alpha_raw / dalpha_raw; eps clips them."""

  eps: float = 1e-4

  def alpha_raw(self, t: Array) -> Array:
    raise NotImplementedError

  def dalpha_raw(self, t: Array) -> Array:
    raise NotImplementedError

  def alpha(self, t: Array) -> Array:
    t = jnp.asarray(t, jnp.float32)
    return self.eps + (1.0 - 2.0 * self.eps) * self.alpha_raw(t)

  def dalpha(self, t: Array) -> Array:
    t = jnp.asarray(t, jnp.float32)
    return (1.0 - 2.0 * self.eps) * self.dalpha_raw(t)


@SCHEDULES.register("linear")
@dataclasses.dataclass(frozen=True)
class LinearSchedule(Schedule):
  """alpha = 1 - t (Shi et al. 2024, MD4; = D3PM's beta_i = 1/(T-i+1), Austin et al. 2021)."""

  def alpha_raw(self, t: Array) -> Array:
    return 1.0 - t

  def dalpha_raw(self, t: Array) -> Array:
    return -jnp.ones_like(t)


@SCHEDULES.register("cosine")
@dataclasses.dataclass(frozen=True)
class CosineSchedule(Schedule):
  """alpha = 1 - cos(pi/2 (1 - t)) (Shi et al. 2024, MD4, Sec. 2 'cosine' schedule)."""

  def alpha_raw(self, t: Array) -> Array:
    return 1.0 - jnp.cos(0.5 * math.pi * (1.0 - t))

  def dalpha_raw(self, t: Array) -> Array:
    # d/dt [-cos(pi/2 (1-t))] = -(pi/2) sin(pi/2 (1-t))
    return -0.5 * math.pi * jnp.sin(0.5 * math.pi * (1.0 - t))


@SCHEDULES.register("polynomial")
@dataclasses.dataclass(frozen=True)
class PolynomialSchedule(Schedule):
  """alpha = 1 - t**power (Shi et al. 2024, MD4, Sec. 2 'polynomial' schedule).

  Default power = 2.0 (power = 1.0 would duplicate "linear"); power > 1 keeps
  more tokens clean at small t. power < 1 makes dalpha infinite at t = 0, which
  the common.T_MIN clip of sampled times keeps finite.
  """

  power: float = 2.0

  def alpha_raw(self, t: Array) -> Array:
    return 1.0 - t**self.power

  def dalpha_raw(self, t: Array) -> Array:
    return -self.power * t ** (self.power - 1.0)


@SCHEDULES.register("sqrt")
@dataclasses.dataclass(frozen=True)
class SqrtSchedule(Schedule):
  """alpha = 1 - sqrt((t + s) / (1 + s)) (Li et al. 2022, Diffusion-LM, sec. 4.2 'sqrt' schedule;
  their s = 1e-4, normalised here so alpha(1) = 0): noise rises fast from a low start."""

  s: float = 1e-4

  def alpha_raw(self, t: Array) -> Array:
    return 1.0 - jnp.sqrt((t + self.s) / (1.0 + self.s))

  def dalpha_raw(self, t: Array) -> Array:
    return -0.5 / jnp.sqrt((t + self.s) * (1.0 + self.s))


@SCHEDULES.register("loglinear")
@dataclasses.dataclass(frozen=True)
class LogLinearSchedule(Schedule):
  """sigma = -log(1 - (1-eps_ll) t), alpha = exp(-sigma) (Sahoo+ 2024 MDLM, log-linear noise).

  eps_ll = 1e-3 is MDLM's default (alpha(1) = eps_ll, so sigma stays finite);
  it is separate from, and applied before, the MD4-style `eps` clip.
  """

  eps_ll: float = 1e-3

  def sigma(self, t: Array) -> Array:
    return -jnp.log1p(-(1.0 - self.eps_ll) * t)

  def dsigma(self, t: Array) -> Array:
    return (1.0 - self.eps_ll) / (1.0 - (1.0 - self.eps_ll) * t)

  def alpha_raw(self, t: Array) -> Array:
    return jnp.exp(-self.sigma(t))

  def dalpha_raw(self, t: Array) -> Array:
    # -dsigma * exp(-sigma) = -(1 - eps_ll): the closed form avoids inf * 0 at
    # t = 1 when eps_ll = 0.
    return jnp.full_like(t, -(1.0 - self.eps_ll))


@SCHEDULES.register("geometric")
@dataclasses.dataclass(frozen=True)
class GeometricSchedule(Schedule):
  """sigma = sigma_min^(1-t) sigma_max^t, alpha = exp(-sigma) (Lou+ 2024 SEDD, geometric)."""

  sigma_min: float = 1e-4
  sigma_max: float = 20.0

  def sigma(self, t: Array) -> Array:
    return self.sigma_min ** (1.0 - t) * self.sigma_max**t

  def dsigma(self, t: Array) -> Array:
    return self.sigma(t) * math.log(self.sigma_max / self.sigma_min)

  def alpha_raw(self, t: Array) -> Array:
    return jnp.exp(-self.sigma(t))

  def dalpha_raw(self, t: Array) -> Array:
    return -self.dsigma(t) * jnp.exp(-self.sigma(t))


def config_to_dict(cfg: Any) -> dict[str, Any]:
  """ConfigDict / FrozenConfigDict / Mapping / bare name -> plain dict."""
  if isinstance(cfg, str):
    return {"name": cfg}
  if hasattr(cfg, "to_dict"):
    return dict(cfg.to_dict())
  if isinstance(cfg, Mapping):
    return dict(cfg)
  raise TypeError(f"expected a config mapping or a name, got {type(cfg).__name__}")


def build_from_config(cls: Any, params: dict[str, Any], *, kind: str,
                      name: str, **fixed: Any) -> Any:
  """cls(**fixed, **params), rejecting params that are not dataclass fields."""
  if dataclasses.is_dataclass(cls):
    allowed = {f.name for f in dataclasses.fields(cls) if f.init} - set(fixed)
    unknown = sorted(set(params) - allowed)
    if unknown:
      raise ValueError(
          f"{kind} {name!r} got unknown parameter(s) {unknown}; allowed:"
          f" {sorted(allowed)} (remove or rename them in the config)")
  return cls(**fixed, **params)


def make_schedule(cfg: Any) -> Schedule:
  """Builds a schedule from {'name': ..., **fields} (e.g. eps, power, sigma_min)."""
  if isinstance(cfg, Schedule):
    return cfg
  params = config_to_dict(cfg)
  if "name" not in params:
    raise ValueError("schedule config needs a 'name', e.g. {'name': 'linear'}")
  name = params.pop("name")
  return build_from_config(SCHEDULES.get(name), params, kind="schedule", name=name)
