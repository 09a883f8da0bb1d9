"""Masked / uniform processes: forward marginals, posteriors, loss formulas, registries."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dlm import losses
from dlm.processes import (PROCESSES, GeometricSchedule, LinearSchedule,
                           MaskedProcess, PolynomialSchedule, UniformProcess,
                           common, make_process)

V, MASK = 5, 4  # masked: data tokens 0..3; uniform: 5 states, 4 never in data
MASKED = MaskedProcess(V, MASK, LinearSchedule(eps=0.0))
UNIFORM = UniformProcess(V, MASK, LinearSchedule(eps=0.0))
BOTH = [pytest.param(MASKED, id="masked"), pytest.param(UNIFORM, id="uniform")]


def random_inputs(process, seed, batch=8, length=6):
  """x0 (data tokens), x_t ~ q(.|x0), logits, t > s, all with float32 times."""
  k = jax.random.split(jax.random.key(seed), 5)
  x0 = jax.random.randint(k[0], (batch, length), 0, MASK)
  t = jax.random.uniform(k[1], (batch,), minval=0.05, maxval=1.0)
  s = t * jax.random.uniform(k[2], (batch,))
  x_t = process.corrupt(k[3], x0, t)
  logits = 3.0 * jax.random.normal(k[4], (batch, length, V))
  return x0, x_t, logits, t, s


# --- forward process -------------------------------------------------------------


@pytest.mark.parametrize("process", BOTH)
def test_monte_carlo_marginals(process):
  n = 200_000
  x0_row = jnp.array([0, 2, 3], jnp.int32)
  for i, t_val in enumerate([0.3, 0.8]):
    t = jnp.full((n,), t_val, jnp.float32)
    x0 = jnp.broadcast_to(x0_row, (n, 3))
    x_t = np.asarray(process.corrupt(jax.random.key(i), x0, t))
    assert x_t.dtype == np.int32 and x_t.shape == (n, 3)
    probs = np.asarray(process.marginal(x0[:1], t[:1]))[0]  # [3, V]
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    for l in range(3):
      freq = np.bincount(x_t[:, l], minlength=V) / n
      tol = 5.0 * np.sqrt(probs[l] * (1 - probs[l]) / n) + 1e-6
      assert np.all(np.abs(freq - probs[l]) <= tol), (t_val, l, freq, probs[l])


def test_masked_corrupt_only_masks():
  for seed in range(4):
    x0, x_t, *_ = random_inputs(MASKED, seed=seed)
    assert np.all((np.asarray(x_t) == np.asarray(x0)) | (np.asarray(x_t) == MASK))


def test_sample_prior():
  assert np.all(np.asarray(MASKED.sample_prior(jax.random.key(0), (3, 4))) == MASK)
  draws = np.asarray(UNIFORM.sample_prior(jax.random.key(0), (1000, 50)))
  assert draws.dtype == np.int32
  np.testing.assert_allclose(np.bincount(draws.ravel(), minlength=V) / draws.size,
                             1.0 / V, atol=0.01)


# --- posteriors ----------------------------------------------------------------------


@pytest.mark.parametrize("process", BOTH)
@pytest.mark.parametrize("times", ["random", "ends"])
def test_posteriors_are_distributions(process, times):
  x0, x_t, logits, t, s = random_inputs(process, seed=1)
  if times == "ends":  # t = 1 -> s = 0 and t = T_MIN -> s = 0 with eps = 0
    t = jnp.where(jnp.arange(8) % 2 == 0, 1.0, common.T_MIN).astype(jnp.float32)
    s = jnp.zeros_like(t)
  rng = np.random.default_rng(2)
  probs = rng.dirichlet(np.full(V, 0.3), x0.shape) * (rng.uniform(size=x0.shape + (V,)) > 0.3)
  probs[..., 0] += 1e-3  # top-p-like zeros, unnormalized, mass on the mask column
  probs = jnp.asarray(probs, jnp.float32)
  for out in [process.posterior(logits, x_t, t, s),
              process.posterior_from_x0_probs(probs, x_t, t, s),
              process.exact_posterior(x0, x_t, t, s)]:
    out = np.asarray(out)
    assert out.dtype == np.float32 and out.shape == x0.shape + (V,)
    assert np.all(np.isfinite(out)) and np.all(out >= 0)
    np.testing.assert_allclose(out.sum(-1), 1.0, atol=1e-5)


def test_masked_posterior_values_and_carry_over():
  x0, x_t, logits, t, s = random_inputs(MASKED, seed=4)
  post = np.asarray(MASKED.posterior(logits, x_t, t, s))
  x_t, t, s = map(np.asarray, (x_t, t, s))
  unmasked = x_t != MASK
  assert unmasked.any() and (~unmasked).any()
  np.testing.assert_array_equal(post[unmasked], np.eye(V)[x_t[unmasked]])
  a_t, a_s = 1 - t[:, None], 1 - s[:, None]  # linear, eps = 0
  p_x0 = np.asarray(jax.nn.softmax(logits[..., :MASK]))  # SUBS: mask column dropped
  np.testing.assert_allclose(post[..., MASK][~unmasked],
                             ((1 - a_s) / (1 - a_t) * np.ones_like(x_t))[~unmasked], rtol=1e-5)
  expect = ((a_s - a_t) / (1 - a_t))[..., None] * p_x0
  np.testing.assert_allclose(post[..., :MASK][~unmasked], expect[~unmasked], rtol=1e-4, atol=1e-7)


def test_x0_logits_subs():
  _, x_t, logits, *_ = random_inputs(MASKED, seed=5)
  logp = np.asarray(MASKED.x0_logits(logits, x_t))
  x_t = np.asarray(x_t)
  assert np.all(np.isfinite(logp))
  np.testing.assert_allclose(np.exp(logp).sum(-1), 1.0, rtol=1e-5)
  assert np.all(np.exp(logp[..., MASK]) == 0)
  unmasked = x_t != MASK
  np.testing.assert_array_equal(np.exp(logp[unmasked]), np.eye(V)[x_t[unmasked]])


def transition(process, a_t, a_s):
  """q(x_t = col | x_s = row) for s < t, built by hand: [V, V]."""
  a_ts = a_t / a_s
  if isinstance(process, MaskedProcess):
    q = a_ts * np.eye(V)
    q[:, MASK] += 1 - a_ts
    q[MASK] = np.eye(V)[MASK]
    return q
  return a_ts * np.eye(V) + (1 - a_ts) / V


@pytest.mark.parametrize("process", BOTH)
def test_exact_posterior_is_bayes(process):
  x0_vals, xt_vals = np.meshgrid(np.arange(MASK), np.arange(V), indexing="ij")
  x0 = jnp.asarray(x0_vals.reshape(1, -1), jnp.int32)  # all (x0, x_t) pairs as positions
  x_t = jnp.asarray(xt_vals.reshape(1, -1), jnp.int32)
  for t_val, s_val in [(0.7, 0.2), (1.0, 0.0), (0.31, 0.3)]:
    t, s = jnp.full((1,), t_val), jnp.full((1,), s_val)
    q_t = np.asarray(process.marginal(x0, t), np.float64)[0]  # [P, V]
    q_s = np.asarray(process.marginal(x0, s), np.float64)[0]
    trans = transition(process, 1 - t_val, 1 - s_val)
    np.testing.assert_allclose(q_s @ trans, q_t, atol=1e-6)  # Chapman-Kolmogorov
    lik = trans[:, np.asarray(x_t)[0]].T  # [P, V]: q(x_t | x_s = v)
    q_xt = q_t[np.arange(q_t.shape[0]), np.asarray(x_t)[0]]  # [P]
    bayes = lik * q_s / np.maximum(q_xt, 1e-30)[:, None]
    possible = q_xt > 0
    got = np.asarray(process.exact_posterior(x0, x_t, t, s))[0]
    np.testing.assert_allclose(got[possible], bayes[possible], atol=1e-5)


@pytest.mark.parametrize("process", BOTH)
def test_posterior_with_confident_model_is_exact(process):
  x0, x_t, _, t, s = random_inputs(process, seed=6)
  logits = 40.0 * jax.nn.one_hot(x0, V)
  np.testing.assert_allclose(process.posterior(logits, x_t, t, s),
                             process.exact_posterior(x0, x_t, t, s), atol=1e-5)
  np.testing.assert_allclose(
      process.posterior_from_x0_probs(jax.nn.one_hot(x0, V), x_t, t, s),
      process.exact_posterior(x0, x_t, t, s), atol=1e-6)


# --- loss formulas ---------------------------------------------------------------------


def test_masked_nelbo_formulas():
  x0, x_t, logits, t, s = random_inputs(MASKED, seed=7)
  mask = (jax.random.uniform(jax.random.key(8), x0.shape) > 0.3).astype(jnp.float32)
  logp = np.asarray(jax.nn.log_softmax(logits[..., :MASK]), np.float64)
  nll = -np.take_along_axis(logp, np.asarray(x0)[..., None], -1)[..., 0]
  counted = (np.asarray(x_t) == MASK) * np.asarray(mask)
  t64, s64 = np.asarray(t, np.float64), np.asarray(s, np.float64)
  np.testing.assert_allclose(MASKED.nelbo(logits, x0, x_t, t, mask),
                             (counted * nll).sum(-1) / t64, rtol=1e-5)
  np.testing.assert_allclose(MASKED.discrete_nelbo(logits, x0, x_t, t, s, mask),
                             (t64 - s64) / t64 * (counted * nll).sum(-1), rtol=1e-5)


def test_uniform_nelbo_matches_closed_form():
  """The spec's simplified integrand, evaluated naively in float64."""
  x0, x_t, logits, t, _ = random_inputs(UNIFORM, seed=9)
  x0, x_t = np.asarray(x0), np.asarray(x_t)
  alpha, beta = 1 - np.asarray(t, np.float64), 1 / (1 - np.asarray(t, np.float64))
  a = alpha[:, None, None]
  f = a * np.asarray(jax.nn.softmax(logits), np.float64) + (1 - a) / V
  g = a * np.eye(V)[x0] + (1 - a) / V
  f_x = np.take_along_axis(f, x_t[..., None], -1)[..., 0]
  g_x = np.take_along_axis(g, x_t[..., None], -1)[..., 0]
  kl = np.sum(g * np.log(g / f), -1)
  per_pos = 1 / f_x - 1 / g_x + (kl - np.log(g_x / f_x)) / g_x
  expect = beta / V * per_pos.sum(-1)
  np.testing.assert_allclose(UNIFORM.nelbo(logits, x0, x_t, t), expect, rtol=1e-4)
  mask = np.ones(x0.shape, np.float32)
  mask[:, 0] = 0
  np.testing.assert_allclose(UNIFORM.nelbo(logits, x0, x_t, t, mask),
                             beta / V * per_pos[:, 1:].sum(-1), rtol=1e-4)


def test_uniform_discrete_nelbo_is_kl():
  x0, x_t, logits, t, s = random_inputs(UNIFORM, seed=10)
  p = np.asarray(UNIFORM.exact_posterior(x0, x_t, t, s), np.float64)
  q = np.asarray(UNIFORM.posterior(logits, x_t, t, s), np.float64)
  kl = np.sum(np.where(p > 0, p * np.log(np.maximum(p, 1e-300) / q), 0.0), -1)
  np.testing.assert_allclose(UNIFORM.discrete_nelbo(logits, x0, x_t, t, s), kl.sum(-1),
                             rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("process", BOTH)
@pytest.mark.parametrize("schedule", [LinearSchedule(eps=0.0), PolynomialSchedule(eps=0.0),
                                      GeometricSchedule(eps=0.0), LinearSchedule()],
                         ids=["linear0", "poly0", "geometric0", "linear"])
def test_losses_and_grads_finite_at_extreme_times(process, schedule):
  process = type(process)(V, MASK, schedule)
  x0, _, logits, _, _ = random_inputs(process, seed=11)
  t = jnp.array([common.T_MIN, 1.0, 0.5, 1e-3] * 2, jnp.float32)
  s = jnp.array([0.0, 0.999, 0.0, 0.0] * 2, jnp.float32)
  x_t = process.corrupt(jax.random.key(12), x0, t)
  for fn in [lambda lg: process.nelbo(lg, x0, x_t, t),
             lambda lg: process.discrete_nelbo(lg, x0, x_t, t, s)]:
    val, grad = jax.value_and_grad(lambda lg: jnp.sum(fn(lg)))(logits)
    assert np.isfinite(val) and np.all(np.isfinite(np.asarray(grad)))
    assert np.all(np.asarray(fn(logits)) >= -1e-5)


@pytest.mark.parametrize("process", BOTH)
def test_methods_jit(process):
  x0, x_t, logits, t, s = random_inputs(process, seed=13)
  np.testing.assert_allclose(jax.jit(process.nelbo)(logits, x0, x_t, t),
                             process.nelbo(logits, x0, x_t, t), rtol=1e-5)
  np.testing.assert_allclose(jax.jit(process.posterior)(logits, x_t, t, s),
                             process.posterior(logits, x_t, t, s), atol=1e-6)
  assert jax.jit(process.corrupt)(jax.random.key(0), x0, t).shape == x0.shape


def test_shape_checks():
  x0, x_t, logits, t, _ = random_inputs(MASKED, seed=14)
  with pytest.raises(AssertionError):
    MASKED.nelbo(logits[..., :-1], x0, x_t, t)
  with pytest.raises(AssertionError):
    MASKED.corrupt(jax.random.key(0), x0.astype(jnp.float32), t)
  with pytest.raises(ValueError, match="mask_id"):
    MaskedProcess(4, 4, LinearSchedule())


# --- times -----------------------------------------------------------------------------


def test_sample_times():
  b = 16
  t = np.asarray(common.sample_times(jax.random.key(0), b))
  assert t.dtype == np.float32 and t.shape == (b,)
  np.testing.assert_array_equal(np.sort(np.floor(t * b)), np.arange(b))  # one per bin
  many = np.asarray(jax.vmap(lambda k: common.sample_times(k, b, antithetic=False))(
      jax.random.split(jax.random.key(1), 2000)))
  assert many.min() >= common.T_MIN and many.max() <= 1.0
  assert abs(many.mean() - 0.5) < 0.01
  assert not np.all(np.sort(np.floor(many * b), -1) == np.arange(b))  # iid, not stratified


@pytest.mark.parametrize("antithetic", [True, False])
def test_row_randomness_is_independent_of_batching(antithetic):
  """Rows 1, 5, 9, 13 of a 16-row batch draw the same times and noise alone as in the batch."""
  rng, b = jax.random.key(3), 16
  ids = jnp.arange(1, b, 4)
  full = common.sample_times(rng, b, antithetic=antithetic)
  part = common.sample_times(rng, 4, antithetic=antithetic, row_ids=ids, num_rows=b)
  np.testing.assert_array_equal(np.asarray(full)[1::4], part)
  u_full = common.row_uniform(rng, jnp.arange(b), (7,))
  np.testing.assert_array_equal(np.asarray(u_full)[1::4], common.row_uniform(rng, ids, (7,)))


# --- registries ------------------------------------------------------------------------


def test_process_registry(tmp_path, monkeypatch):
  assert {"masked", "uniform"} <= set(PROCESSES.names())
  cfg = {"name": "uniform", "schedule": {"name": "cosine", "eps": 0.0}}
  p = make_process(cfg, vocab_size=V, mask_id=MASK)
  assert isinstance(p, UniformProcess) and p.schedule.eps == 0.0
  p = make_process({"name": "dlm.processes.masked:MaskedProcess", "schedule": {"name": "linear"}},
                   vocab_size=V, mask_id=MASK)
  assert p == MaskedProcess(V, MASK, LinearSchedule())
  (tmp_path / "my_proc.py").write_text(
      "import dataclasses\n"
      "from dlm.processes import MaskedProcess\n"
      "@dataclasses.dataclass(frozen=True)\n"
      "class Mine(MaskedProcess):\n"
      "  temperature: float = 1.0\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  p = make_process({"name": "my_proc:Mine", "schedule": "linear", "temperature": 0.5},
                   vocab_size=V, mask_id=MASK)
  assert type(p).__name__ == "Mine" and p.temperature == 0.5
  with pytest.raises(ValueError, match="unknown parameter"):
    make_process({"name": "masked", "schedule": "linear", "temp": 1}, vocab_size=V, mask_id=MASK)
  with pytest.raises(ValueError, match="schedule"):
    make_process({"name": "masked"}, vocab_size=V, mask_id=MASK)
  with pytest.raises(ValueError, match="known: .*masked.*uniform"):
    make_process({"name": "flow", "schedule": "linear"}, vocab_size=V, mask_id=MASK)


def test_loss_registry(tmp_path, monkeypatch):
  assert {"discrete_nelbo", "nelbo"} <= set(losses.LOSSES.names())
  assert losses.get_loss("nelbo") is losses.nelbo_loss
  assert losses.get_loss("dlm.losses:discrete_nelbo_loss") is losses.discrete_nelbo_loss
  (tmp_path / "my_loss.py").write_text(
      "def zero(params, batch, rng, *, model, process, config):\n"
      "  return 0.0, {'loss': 0.0}\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  assert losses.get_loss("my_loss:zero")(None, None, None, model=None, process=None,
                                         config=None)[0] == 0.0
  with pytest.raises(ValueError, match="known: bd3_nelbo, cdcd, discrete_nelbo, .*nelbo"):
    losses.get_loss("mse")


def test_loss_metrics_and_config_errors():
  x0, *_ = random_inputs(MASKED, seed=15)
  params = jnp.zeros((V,))
  model = lambda p, x, t, **kw: (jnp.broadcast_to(p, x.shape + (V,)), None)  # -> (logits, cache)
  batch = {"tokens": x0, "loss_mask": jnp.ones(x0.shape, bool).at[:, 0].set(False)}
  loss, metrics = jax.jit(lambda p, b, r: losses.nelbo_loss(
      p, b, r, model=model, process=MASKED,
      config=ml_collections.ConfigDict({"antithetic": True, "num_steps": 8})))(
          params, batch, jax.random.key(0))
  assert set(metrics) >= {"loss", "nelbo_sum", "num_tokens"}
  assert float(metrics["num_tokens"]) == x0.shape[0] * (x0.shape[1] - 1)
  np.testing.assert_allclose(loss, metrics["nelbo_sum"] / metrics["num_tokens"], rtol=1e-6)
  with pytest.raises(ValueError, match="num_steps"):
    losses.discrete_nelbo_loss(params, batch, jax.random.key(0), model=model,
                               process=MASKED, config={"num_steps": 0})
