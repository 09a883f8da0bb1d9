"""Continuous embedding diffusion (issue 22, part 5): the forward marginals, VDM's bound with its
prior and rounding terms against the exact NLL, DDPM/DDIM against a known law, CDCD's warp,
self-conditioning."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm import losses
from dlm.errors import UserError
from dlm.processes import GaussianProcess, SqrtSchedule, common
from dlm.sample import engine
from dlm.sample import gaussian as gaussian_sampler

V, MASK = 4, 3  # data tokens 0..2 and a mask id the data never holds
ANGLES = np.array([0.0, 2.2, 4.1, 1.0])
TABLE = np.stack([np.cos(ANGLES), np.sin(ANGLES)], -1).astype(np.float32) * 0.7  # [V, D=2]


def _process(**kw) -> GaussianProcess:
  proc = GaussianProcess(V, MASK, SqrtSchedule(eps=1e-4), **kw)
  return proc.bind({"embed": jnp.asarray(TABLE)})


def exact_logits(proc: GaussianProcess, law: np.ndarray, z: jax.Array, t: jax.Array) -> jax.Array:
  """log p(x0 = v | z_t) + const per position, for x0 ~ law iid per position: log law(v) +
  log N(z_t; sqrt(abar) e_v, (1 - abar) I)."""
  e = proc.embeddings()
  abar = common.bcast_time(proc.schedule.alpha(t), 3)
  d2 = jnp.sum(jnp.square(z[..., None, :] - jnp.sqrt(abar)[..., None] * e), -1)  # [B, L, V]
  logp = jnp.log(jnp.asarray(np.append(law, 0.0), jnp.float32) + 1e-30)
  return logp - 0.5 * d2 / (1.0 - abar)


def test_marginals_and_normalised_embeddings():
  proc = _process()
  e = proc.embeddings()
  np.testing.assert_allclose(jnp.linalg.norm(e, axis=-1), math.sqrt(2.0), rtol=1e-5)
  x0 = jnp.asarray([[0, 1, 2]] * 4000, jnp.int32)
  t = jnp.full((4000,), 0.3, jnp.float32)
  z = proc.corrupt(jax.random.key(0), x0, t)
  mean, std = proc.marginal(x0[:1], t[:1])
  np.testing.assert_allclose(z.mean(0), mean[0], atol=0.03)
  np.testing.assert_allclose(z.std(0), np.broadcast_to(std[0], (3, 2)), rtol=0.05)


def test_ddpm_step_is_the_exact_posterior_given_the_true_x0():
  """DDIM with eta = 1 and x0_hat = e(x0) is q(z_s | z_t, x0) (Ho+ 2020 eq. 7): mean and
  variance; eta = 0 keeps the same mean path's eps."""
  proc = _process()
  x0 = jnp.asarray([[0, 2]], jnp.int32)
  t, s = jnp.asarray([0.6]), jnp.asarray([0.35])
  z = proc.corrupt(jax.random.key(1), x0, t)
  mean, var = proc.exact_posterior_params(x0, z, t, s)
  e0 = proc.clean(x0)
  zero = proc.ddim_step(z, e0, t, s, 1.0, jnp.zeros_like(z))
  one = proc.ddim_step(z, e0, t, s, 1.0, jnp.ones_like(z))
  np.testing.assert_allclose(zero, mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(jnp.square(one - zero), jnp.broadcast_to(var, z.shape), rtol=1e-4)


def _expected_nelbo(proc, law, x0: int, denoiser_law, n_eps: int = 4096, seed: int = 7) -> float:
  """E_{t, eps} NELBO of one position holding x0: Gauss-Legendre over log-spaced panels of t,
  Monte Carlo over eps (fresh antithetic pairs at every node), the denoiser exact for
  ``denoiser_law``."""
  nodes, weights = np.polynomial.legendre.leggauss(12)
  edges = np.concatenate([[0.0], np.geomspace(1e-6, 1.0, 30)])
  a, b = edges[:-1, None], edges[1:, None]
  ts = jnp.asarray((0.5 * (b - a) * nodes + 0.5 * (a + b)).reshape(-1), jnp.float32)
  ws = (0.5 * (b - a) * weights).reshape(-1)

  @jax.jit
  def at(t, key):
    half = jax.random.normal(key, (n_eps // 2, 1, 2))
    eps = jnp.concatenate([half, -half])
    tt = jnp.full((n_eps,), t)
    x0s = jnp.full((n_eps, 1), x0, jnp.int32)
    mean, std = proc.marginal(x0s, tt)
    z = mean + std * eps
    return jnp.mean(proc.nelbo(exact_logits(proc, denoiser_law, z, tt), x0s, z, tt))

  keys = jax.random.split(jax.random.key(seed), ts.shape[0])
  return float(np.dot(ws, np.asarray(jax.lax.map(lambda a: at(*a), (ts, keys)))))


def test_the_bound_of_the_exact_denoiser_is_the_data_entropy_and_a_wrong_one_is_above():
  """One position, x0 ~ law: with the exact p(x0 | z_t) the expected NELBO (diffusion + prior +
  rounding) is H(law) up to the Monte Carlo error; another law's denoiser pays the KL."""
  proc = _process()
  law = np.array([0.5, 0.3, 0.2])
  other = np.array([0.2, 0.2, 0.6])
  entropy = float(-np.sum(law * np.log(law)))
  exact = sum(p * _expected_nelbo(proc, law, v, law) for v, p in enumerate(law))
  assert exact == pytest.approx(entropy, abs=0.02)
  wrong = sum(p * _expected_nelbo(proc, law, v, other) for v, p in enumerate(law))
  assert wrong > exact + 0.5 * float(np.sum(law * np.log(law / other)))


def _sample(name: str, law: np.ndarray, steps: int, n: int, **knobs) -> np.ndarray:
  proc = _process()

  def fn(x_t, t, *, inputs_embeds=None, **kw):
    assert x_t is None and not kw
    return exact_logits(proc, law, inputs_embeds, t), None

  den = engine.Denoiser(fn=fn, mask_id=MASK, vocab_size=V, uses_t=True)
  make = engine.resolve(name)
  given = jnp.zeros((n, 2), jnp.int32)
  fixed = jnp.zeros((n, 2), bool)
  run = jax.jit(lambda k: engine.run(make(den, proc, steps=steps, **knobs), k, given, fixed))
  return np.asarray(run(jax.random.key(11)).x)


def _chi2_pvalue(tokens: np.ndarray, law: np.ndarray) -> float:
  from scipy import stats
  counts = np.bincount(tokens.reshape(-1), minlength=V)[:3]
  return float(stats.chisquare(counts, law * counts.sum()).pvalue)


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_samplers_reproduce_the_law_of_their_exact_denoiser(name):
  law = np.array([0.5, 0.3, 0.2])
  tokens = _sample(name, law, steps=200, n=1500)
  assert _chi2_pvalue(tokens, law) > 1e-3
  assert _chi2_pvalue(tokens, np.array([0.3, 0.3, 0.4])) < 1e-6


def test_clamped_given_positions_stay_and_clamping_knob_runs():
  proc = _process()
  law = np.array([0.5, 0.3, 0.2])
  den = engine.Denoiser(fn=lambda x, t, inputs_embeds=None: (exact_logits(proc, law,
                                                                          inputs_embeds, t), None),
                        mask_id=MASK, vocab_size=V, uses_t=True)
  given = jnp.asarray([[2, 0, 0]] * 8, jnp.int32)
  fixed = jnp.asarray([[True, False, False]] * 8)
  out = engine.run(gaussian_sampler.ddim(den, proc, steps=6, clamp=True), jax.random.key(0),
                   given, fixed)
  assert (np.asarray(out.x)[:, 0] == 2).all() and int(out.nfe) == 6
  assert set(np.asarray(out.x)[:, 1:].reshape(-1)) <= {0, 1, 2}


def test_time_warp_is_a_monotone_cdf_and_its_fit_reaches_only_the_warp():
  proc = GaussianProcess(V, MASK, SqrtSchedule(), time_warp=8)
  raw = jnp.asarray(np.linspace(-1, 2, 8), jnp.float32)
  bound = proc.bind({"embed": jnp.asarray(TABLE), "process": {"warp": raw}})
  knots, f = bound.warp_knots()
  assert bool(jnp.all(jnp.diff(f) > 0))
  u = jnp.linspace(0.0, 1.0, 17)
  t = bound.warp_sample(u)
  np.testing.assert_allclose(jnp.interp(t, knots, f) / f[-1], u, atol=1e-5)
  loss = jnp.asarray([0.5, 2.0])

  def fit(raw_, loss_):
    b = proc.bind({"embed": jnp.asarray(TABLE), "process": {"warp": raw_}})
    return jnp.sum(b.warp_fit(jnp.asarray([0.2, 0.7]), loss_))

  g_raw, g_loss = jax.grad(fit, argnums=(0, 1))(raw, loss)
  assert float(jnp.abs(g_raw).sum()) > 0 and float(jnp.abs(g_loss).sum()) == 0.0
  assert proc.learned_params() == (("warp", (8,), (None,), 0.0),)


def test_self_conditioning_of_a_denoiser_without_it_is_one_line():
  """A self-conditioned process on a Transformer built without the projection: one line."""
  from flax import nnx
  from dlm.models import transformer
  cfg = transformer.ModelConfig(vocab_size=V, d_model=8, num_layers=1, num_heads=2, mlp_dim=16,
                                time_conditioning=True, cond_dim=8)
  graphdef, state = nnx.split(transformer.init_model(cfg, 0))
  proc = GaussianProcess(V, MASK, SqrtSchedule(), self_condition=True).bind(state)
  z = proc.corrupt(jax.random.key(0), jnp.zeros((1, 3), jnp.int32), jnp.asarray([0.5]))
  apply = transformer.apply_fn(graphdef)
  with pytest.raises(UserError, match="self-conditioning was asked of a denoiser without it") as e:
    jax.jit(lambda st, z_: losses.predict(apply, st, proc, z_, jnp.asarray([0.5])))(state, z)
  assert "\n" not in str(e.value)
  with pytest.raises(UserError, match="bind it first"):
    GaussianProcess(V, MASK, SqrtSchedule()).embeddings()
