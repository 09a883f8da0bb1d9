"""Masking schedules: endpoints, monotonicity, analytic derivatives, config plumbing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dlm.processes import schedules
from dlm.processes.schedules import SCHEDULES, make_schedule

NAMES = ["linear", "cosine", "polynomial", "loglinear", "geometric"]
# Exact raw schedules (eps = 0); loglinear also needs eps_ll = 0 to reach alpha(1) = 0.
EXACT = {"linear": {}, "cosine": {}, "polynomial": {"power": 3.0},
         "loglinear": {"eps_ll": 0.0}}


def build(name: str, **kw) -> schedules.Schedule:
  return make_schedule({"name": name, **kw})


def test_registry_names():
  assert set(NAMES) <= set(SCHEDULES.names())


@pytest.mark.parametrize("name", list(EXACT))
def test_exact_endpoints_with_eps_zero(name):
  s = build(name, eps=0.0, **EXACT[name])
  np.testing.assert_allclose(s.alpha(jnp.float32(0.0)), 1.0, atol=1e-7)
  np.testing.assert_allclose(s.alpha(jnp.float32(1.0)), 0.0, atol=1e-7)


def test_geometric_endpoints():
  s = build("geometric", eps=0.0)
  np.testing.assert_allclose(s.alpha(jnp.float32(0.0)), np.exp(-1e-4), rtol=1e-6)
  np.testing.assert_allclose(s.alpha(jnp.float32(1.0)), np.exp(-20.0), rtol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_default_endpoints_and_monotone(name):
  s = build(name)
  t = jnp.linspace(0.0, 1.0, 1001, dtype=jnp.float32)
  alpha = np.asarray(s.alpha(t))
  assert alpha.dtype == np.float32 and alpha.shape == (1001,)
  assert alpha[0] > 0.999 and alpha[-1] < 2e-3
  assert np.all(np.diff(alpha) <= 0) and np.all(np.diff(alpha[::50]) < 0)
  assert np.all(np.asarray(s.dalpha(t[1:-1])) < 0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("eps", [0.0, 1e-2])
def test_dalpha_matches_autodiff(name, eps):
  s = build(name, eps=eps)
  t = jnp.linspace(0.005, 0.995, 199, dtype=jnp.float32)
  auto = jax.vmap(jax.grad(s.alpha))(t)
  np.testing.assert_allclose(s.dalpha(t), auto, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_eps_clipping(name):
  eps = 0.01
  s = build(name, eps=eps)
  t = jnp.linspace(0.0, 1.0, 257, dtype=jnp.float32)
  alpha = np.asarray(s.alpha(t))
  assert np.all(alpha >= eps - 1e-7) and np.all(alpha <= 1 - eps + 1e-7)
  raw = np.asarray(build(name, eps=0.0).alpha(t))
  np.testing.assert_allclose(alpha, eps + (1 - 2 * eps) * raw, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(s.dalpha(t), (1 - 2 * eps) * build(name, eps=0.0).dalpha(t),
                             rtol=1e-6)


def test_loglinear_goes_through_sigma():
  s = build("loglinear", eps=0.0)
  t = jnp.linspace(0.0, 1.0, 11, dtype=jnp.float32)
  np.testing.assert_allclose(s.alpha(t), np.exp(-np.asarray(s.sigma(t))), rtol=1e-6)
  np.testing.assert_allclose(s.alpha(t), 1 - (1 - 1e-3) * np.asarray(t), rtol=1e-5, atol=1e-7)


def test_elementwise_and_jit():
  s = build("cosine")
  t = jnp.full((2, 3), 0.25, jnp.float32)
  out = jax.jit(s.alpha)(t)
  assert out.shape == (2, 3)
  np.testing.assert_allclose(out, s.alpha(jnp.float32(0.25)) * np.ones((2, 3)))
  assert jax.jit(s.dalpha)(t).shape == (2, 3)


def test_params_and_configdict():
  cfg = ml_collections.ConfigDict({"name": "polynomial", "power": 0.5, "eps": 0.0})
  s = make_schedule(cfg)
  assert s == schedules.PolynomialSchedule(eps=0.0, power=0.5)
  np.testing.assert_allclose(s.alpha(jnp.float32(0.25)), 0.5)
  assert make_schedule("linear") == schedules.LinearSchedule()
  assert make_schedule(s) is s
  g = make_schedule({"name": "geometric", "sigma_min": 1e-3, "sigma_max": 10.0})
  assert (g.sigma_min, g.sigma_max, g.eps) == (1e-3, 10.0, 1e-4)


def test_unknown_name_lists_known():
  with pytest.raises(ValueError, match="known: cosine, geometric, linear"):
    make_schedule({"name": "quadratic"})


def test_unknown_param_is_one_line_error():
  with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['pwr'\]") as e:
    make_schedule({"name": "polynomial", "pwr": 2.0})
  assert "\n" not in str(e.value) and "power" in str(e.value)


def test_import_path_name(tmp_path, monkeypatch):
  assert isinstance(make_schedule({"name": "dlm.processes.schedules:CosineSchedule"}),
                    schedules.CosineSchedule)
  (tmp_path / "my_sched.py").write_text(
      "import dataclasses\n"
      "from dlm.processes.schedules import Schedule\n"
      "@dataclasses.dataclass(frozen=True)\n"
      "class Sqrt(Schedule):\n"
      "  def alpha_raw(self, t): return 1.0 - t ** 0.5\n"
      "  def dalpha_raw(self, t): return -0.5 * t ** -0.5\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  s = make_schedule({"name": "my_sched:Sqrt", "eps": 0.0})
  np.testing.assert_allclose(s.alpha(jnp.float32(0.25)), 0.5)
  with pytest.raises(ValueError, match="cannot import"):
    make_schedule({"name": "no_such_module_xyz:Sqrt"})
