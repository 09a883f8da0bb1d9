"""GenMD4 (Shi et al. 2024, sec. 6): per-token learnable masking schedules and their REINFORCE
leave-one-out gradient (issue 22, part 4)."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm import losses, processes
from dlm.errors import UserError
from dlm.processes import GenMD4Process, MaskedProcess, PolynomialSchedule

V, MASK = 4, 3  # data tokens 0..2 and the mask


def _bound(w: np.ndarray, **kw) -> GenMD4Process:
  raw = np.log(np.expm1(np.asarray(w, np.float64))).astype(np.float32)
  return GenMD4Process(V, MASK, PolynomialSchedule(), **kw).bind({"process": {"w": raw}})


def test_one_exponent_for_every_token_is_md4_with_the_polynomial_schedule():
  """w_v = p for all v, t1 = eps = 0: the NELBO, the marginals and the reverse step are MD4's
  with alpha = 1 - t^p (the state-dependent terms cancel)."""
  gen = _bound([1.7] * V, eps=0.0, t1=0.0)
  md4 = MaskedProcess(V, MASK, PolynomialSchedule(power=1.7, eps=0.0))
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.integers(0, 3, (4, 5)), jnp.int32)
  t = jnp.asarray([0.1, 0.4, 0.7, 0.95], jnp.float32)
  logits = jnp.asarray(rng.normal(size=(4, 5, V)), jnp.float32)
  x_t = md4.corrupt(jax.random.key(0), x0, t)
  np.testing.assert_allclose(gen.nelbo(logits, x0, x_t, t), md4.nelbo(logits, x0, x_t, t),
                             rtol=1e-5)
  np.testing.assert_allclose(gen.marginal(x0, t), md4.marginal(x0, t), atol=1e-6)
  probs = jax.nn.softmax(logits)
  np.testing.assert_allclose(gen.posterior_from_x0_probs(probs, x_t, t, t * 0.5),
                             md4.posterior_from_x0_probs(probs, x_t, t, t * 0.5), atol=1e-6)


def _quadrature(fn, lo: float = 1e-12, panels: int = 40, order: int = 16) -> float:
  """int_lo^1 fn(t) dt on log-spaced Gauss-Legendre panels (fn vectorised over t)."""
  nodes, weights = np.polynomial.legendre.leggauss(order)
  edges = np.geomspace(lo, 1.0, panels + 1)
  a, b = edges[:-1, None], edges[1:, None]  # every panel's nodes in one call of fn
  t = (0.5 * (b - a) * nodes + 0.5 * (a + b)).reshape(-1)
  return float(np.sum((0.5 * (b - a) * weights).reshape(-1) * fn(t)))


@pytest.mark.parametrize("t1", [0.0, 1e-3])
def test_the_exact_denoiser_makes_the_bound_tight(t1):
  """One position, data law p, distinct learned exponents: with the exact x0 posterior
  mu_t(v) ∝ p(v) (1 - alpha_t(v)) the NELBO of every x0 is -log p(x0) (t1 = 0), and above it
  by the reconstruction decoder's gap otherwise."""
  w = np.array([0.6, 1.0, 2.5, 1.0])
  p = np.array([0.5, 0.3, 0.2])
  proc = _bound(w, eps=0.0, t1=t1)

  def nelbo_at(x0: int, t: np.ndarray) -> np.ndarray:
    t = jnp.asarray(t, jnp.float32)
    n = t.shape[0]
    masked = proc.masked_v(t)[:, :3]  # [n, 3]: 1 - alpha_t(v)
    post = jnp.asarray(p, jnp.float32) * masked
    logits = jnp.log(jnp.concatenate([post, jnp.zeros((n, 1))], -1))[:, None, :]
    x0s = jnp.full((n, 1), x0, jnp.int32)
    x_t = jnp.full((n, 1), MASK, jnp.int32)
    per = proc.nelbo(logits, x0s, x_t, t) - proc.reconstruction(x0s)
    return np.asarray(per * masked[:, x0], np.float64)  # E over x_t: masked w.p. 1 - alpha

  totals = []
  for x0 in range(3):
    recon = float(proc.reconstruction(jnp.asarray([[x0]], jnp.int32))[0])
    totals.append(_quadrature(lambda t: nelbo_at(x0, t)) + recon)
    if t1 == 0.0:
      assert totals[-1] == pytest.approx(-math.log(p[x0]), abs=2e-4)
  # with t1 > 0 MD4's decoder p_dec ∝ t1^w ignores p: the bound holds on average (a model's
  # cross-entropy >= the data's entropy), with a gap of order t1
  entropy = float(-np.sum(p * np.log(p)))
  assert entropy - 2e-4 <= float(np.dot(p, totals)) <= entropy + 10 * t1 + 2e-4


def test_rloo_gradient_is_the_exact_gradient_in_expectation():
  """L = 2, every x_t enumerated: E over two independent draws of the RLOO surrogate's gradient
  (w.r.t. the raw exponents) equals the gradient of E_{x_t ~ q_w} NELBO(x_t, w)."""
  x0 = jnp.asarray([[0, 2]], jnp.int32)
  t = jnp.asarray([0.55], jnp.float32)
  table = jax.random.normal(jax.random.key(3), (3, 3, 2, V))  # logits by (x_t state per position)
  raw0 = jnp.asarray(np.log(np.expm1([0.7, 1.3, 2.0, 1.0])), jnp.float32)
  states = [jnp.asarray([[a, b]], jnp.int32) for a, b in itertools.product([0, MASK], [2, MASK])]

  def logits_of(x_t):
    a = (x_t[0, 0] == MASK).astype(jnp.int32)
    b = (x_t[0, 1] == MASK).astype(jnp.int32)
    return table[a, b][None]

  def f_and_logq(raw, x_t):
    proc = GenMD4Process(V, MASK, PolynomialSchedule()).bind({"process": {"w": raw}})
    return proc.nelbo(logits_of(x_t), x0, x_t, t)[0], proc.log_q(x_t, x0, t)[0]

  def exact(raw):
    return sum(jnp.exp(f_and_logq(raw, s)[1]) * f_and_logq(raw, s)[0] for s in states)

  def surrogate(raw, a, b):
    fa, qa = f_and_logq(raw, a)
    fb, qb = f_and_logq(raw, b)
    return losses.rloo_surrogate(fa, fb, qa, qb)

  probs = [float(jnp.exp(f_and_logq(raw0, s)[1])) for s in states]
  assert sum(probs) == pytest.approx(1.0, abs=1e-6)
  grad = jax.jit(jax.grad(surrogate))
  expected = sum(pa * pb * grad(raw0, a, b)
                 for (pa, a), (pb, b) in itertools.product(zip(probs, states), repeat=2))
  np.testing.assert_allclose(expected, jax.grad(exact)(raw0), rtol=1e-4, atol=1e-6)
  # the surrogate's value is the plain NELBO estimate: the score terms are 0 in value
  a, b = states[1], states[2]
  assert float(surrogate(raw0, a, b)) == pytest.approx(
      0.5 * float(f_and_logq(raw0, a)[0] + f_and_logq(raw0, b)[0]), rel=1e-6)


def test_the_denoiser_carries_the_learned_exponents_and_bad_knobs_are_one_line():
  """``loader.build`` declares w in the model config; the Transformer holds it, initialised to
  power_init (MD4's softplus inverse); a bound process reads it back."""
  import ml_collections
  from dlm.models import loader, transformer
  cfg = ml_collections.ConfigDict({
      "model": {"d_model": 16, "num_layers": 1, "num_heads": 2},
      "process": {"name": "genmd4", "power_init": 2.0, "schedule": {"name": "linear"}}})
  model_cfg, proc = loader.build(cfg, 10, 9)
  assert model_cfg.process_params == (("w", (10,), ("vocab",), math.log(math.expm1(2.0))),)
  params = jax.tree.map(lambda x: x, __import__("flax").nnx.state(
      transformer.init_model(model_cfg, 0)))
  np.testing.assert_allclose(processes.bind(proc, params).power(), np.full(10, 2.0), rtol=1e-6)
  with pytest.raises(UserError, match="power_init"):
    GenMD4Process(V, MASK, PolynomialSchedule(), power_init=0.0)
  with pytest.raises(UserError, match="'nelbo_count' assumes one schedule for every token"):
    losses.count_nelbo_loss(None, {"tokens": jnp.zeros((1, 2), jnp.int32)}, jax.random.key(0),
                            model=None, process=proc, config=None)
  with pytest.raises(UserError, match="genmd4"):
    losses.genmd4_loss(None, {"tokens": jnp.zeros((1, 2), jnp.int32)}, jax.random.key(0),
                       model=None, process=MaskedProcess(V, MASK, PolynomialSchedule()),
                       config=None)


def test_marginals_and_ancestral_samples_follow_the_per_token_schedules():
  """Forward: each token is masked with its own probability (1 - eps) tau^{w_v}.  Reverse: with
  the exact one-position denoiser (mu_t(v) ∝ p(v) (1 - alpha_t(v))) the ancestral sampler's
  draws pass a chi-square test against p, and fail it against another law."""
  from scipy import stats
  from dlm.sample import generate
  proc = _bound([0.5, 1.0, 3.0, 1.0])
  x0 = jnp.asarray([[0, 1, 2]] * 20000, jnp.int32)
  t = jnp.full((20000,), 0.4, jnp.float32)
  freq = np.mean(np.asarray(proc.corrupt(jax.random.key(0), x0, t)) == MASK, 0)
  np.testing.assert_allclose(freq, np.asarray(1.0 - proc.marginal(x0[:1], t[:1])[0, :, :3]
                                             .max(-1)), atol=0.015)
  law = np.array([0.5, 0.3, 0.2])

  def exact(denoised_law):
    def logits_fn(x_t, t):
      post = jnp.asarray(denoised_law, jnp.float32) * proc.masked_v(t)[:, :3]
      return jnp.broadcast_to(jnp.log(jnp.concatenate(
          [post, jnp.zeros((t.shape[0], 1))], -1))[:, None, :], x_t.shape + (V,))
    return logits_fn

  def chi(denoised_law):
    tokens, _ = generate.sample_tokens(exact(denoised_law), proc, np.full((1,), MASK),
                                       np.zeros((1,), bool), num_samples=3000, seed=5,
                                       steps=64)
    counts = np.bincount(tokens.reshape(-1), minlength=V)[:3]
    return stats.chisquare(counts, law * counts.sum()).pvalue

  assert chi(law) > 1e-3
  assert chi(np.array([0.3, 0.3, 0.4])) < 1e-6
