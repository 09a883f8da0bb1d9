"""Exact ELBO math by enumerating every x_t of a tiny problem (no Monte Carlo except (d)).

Setup: L = 3 positions; masked: 3 data tokens + mask (V = 4); uniform: V = 3.
The "denoiser" is a random lookup table of logits indexed by the whole x_t
sequence (+ a linear term in t), i.e. a valid conditional model p(x0 | x_t, t).
Expectations over x_t are exact sums over all V^L states with weights
q(x_t | x0) = prod_l marginal_l, kept in float64; the process functions run in
float32, so tolerances are float32-sized.

Findings encoded below (verified numerically, see test docstrings):
  * the T-step NELBO upper-bounds the T-step model NLL for every T (a);
  * disc(T) -> cont at rate ~1/T, but disc(T) is NOT monotone in T in general:
    for the uniform process it can increase toward cont from below, and for
    the masked process disc(1) can be below disc(2) (b);
  * masked + exact denoiser: continuous NELBO = -log p_data(x0) exactly (c);
    uniform: the same holds for the x_hat that reproduces the true reverse
    rates, which is NOT the posterior mean E[x0 | x_t] (plug-in posterior).
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm import losses
from dlm.processes import (CosineSchedule, LinearSchedule, MaskedProcess,
                           UniformProcess, common)

L = 3
MASKED = MaskedProcess(vocab_size=4, mask_id=3, schedule=LinearSchedule(eps=0.0))
UNIFORM = UniformProcess(vocab_size=3, mask_id=2, schedule=LinearSchedule(eps=0.0))
MASKED_X0 = [(0, 1, 2), (2, 2, 0), (1, 0, 1)]
UNIFORM_X0 = [(0, 1, 1), (1, 0, 0), (0, 0, 1)]


# --- enumeration helpers ------------------------------------------------------


def all_seqs(vocab_size: int) -> np.ndarray:
  return np.array(list(itertools.product(range(vocab_size), repeat=L)), np.int32)  # [S, L]


def seq_index(x: jnp.ndarray, vocab_size: int) -> jnp.ndarray:
  place = jnp.asarray(vocab_size ** np.arange(L - 1, -1, -1), jnp.int32)
  return jnp.sum(x * place, axis=-1)  # [B]


def table_apply(params, x_t, t):
  """Conditional model: logits = A[x_t] + t B[x_t], tables [S, L, V] indexed by all of x_t."""
  idx = seq_index(x_t, params["a"].shape[-1])
  return params["a"][idx] + t[:, None, None] * params["b"][idx]  # [B, L, V]


def table_params(vocab_size: int, seed: int) -> dict[str, jnp.ndarray]:
  rng = np.random.default_rng(seed)
  shape = (vocab_size**L, L, vocab_size)
  return {"a": jnp.asarray(2.0 * rng.normal(size=shape), jnp.float32),
          "b": jnp.asarray(2.0 * rng.normal(size=shape), jnp.float32)}


def rows_apply(params, x_t, t):
  """'Model' whose logits were precomputed for every row of the (tiled) batch."""
  del x_t, t
  return params["logits"]


@functools.partial(jax.jit, static_argnums=(0, 1))
def _nelbo_values(process, apply, params, x0, x_t, t, loss_mask):
  return process.nelbo(apply(params, x_t, t), x0, x_t, t, loss_mask)


@functools.partial(jax.jit, static_argnums=0)
def _discrete_values(process, params, x0, x_t, t, s):
  return process.discrete_nelbo(table_apply(params, x_t, t), x0, x_t, t, s)


@functools.partial(jax.jit, static_argnums=0)
def _posterior_values(process, params, x_t, t, s):
  return process.posterior(table_apply(params, x_t, t), x_t, t, s)


def state_probs(process, x0, ts, loss_mask=None) -> np.ndarray:
  """q(x_t = state | x0) for every state and time: float64 [n, S].  A position with loss_mask 0
  is conditioning, never corrupted (common.keep_clean): x_t = x0 there."""
  seqs = all_seqs(process.vocab_size)
  x0b = jnp.broadcast_to(jnp.asarray(x0, jnp.int32), (len(ts), L))
  m = np.asarray(process.marginal(x0b, jnp.asarray(ts, jnp.float32)), np.float64)  # [n, L, V]
  if loss_mask is not None:
    clean = np.eye(process.vocab_size)[np.asarray(x0)]  # [L, V]
    keep = np.asarray(loss_mask, np.float64)[:, None] > 0
    m = np.where(keep[None], m, clean[None])
  return np.prod(np.stack([m[:, l, seqs[:, l]] for l in range(L)], -1), -1)


def tiled(process, x0, ts):
  """All (time, state) pairs as one batch: x0 [n S, L], x_t [n S, L], t [n S]."""
  seqs = all_seqs(process.vocab_size)
  x_t = jnp.asarray(np.tile(seqs, (len(ts), 1)))
  t = jnp.asarray(np.repeat(np.asarray(ts, np.float64), len(seqs)), jnp.float32)
  return jnp.broadcast_to(jnp.asarray(x0, jnp.int32), x_t.shape), x_t, t


def expected_nelbo(process, params, x0, ts, loss_mask=None, apply=table_apply) -> np.ndarray:
  """E_{x_t ~ q(.|x0)}[process.nelbo] at each t: float64 [n]."""
  x0b, x_t, t = tiled(process, x0, ts)
  mask = jnp.broadcast_to(jnp.asarray(
      (1.0,) * L if loss_mask is None else loss_mask, jnp.float32), x_t.shape)
  v = np.asarray(_nelbo_values(process, apply, params, x0b, x_t, t, mask), np.float64)
  return np.sum(v.reshape(len(ts), -1) * state_probs(process, x0, ts, loss_mask), -1)


def step_times(num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  i = np.arange(1, num_steps + 1)
  return i / num_steps, (i - 1) / num_steps


def expected_discrete(process, params, x0, ts, ss) -> np.ndarray:
  """E_{x_t ~ q(.|x0)}[discrete_nelbo(t, s)] for each pair (t, s): float64 [n]."""
  x0b, x_t, t = tiled(process, x0, ts)
  _, _, s = tiled(process, x0, ss)
  v = np.asarray(_discrete_values(process, params, x0b, x_t, t, s), np.float64)
  return np.sum(v.reshape(len(ts), -1) * state_probs(process, x0, ts), -1)


def discrete_nelbos(process, params, x0, steps) -> np.ndarray:
  """Exact T-step NELBO for each T in steps (one batched evaluation).

  The prior KL and t = 0 reconstruction terms vanish: alpha(1) = 0, alpha(0) = 1.
  """
  ts, ss = map(np.concatenate, zip(*[step_times(n) for n in steps]))
  terms = expected_discrete(process, params, x0, ts, ss)
  return np.array([c.sum() for c in np.split(terms, np.cumsum(steps)[:-1])])


def gauss_legendre(a: float, b: float, n: int):
  x, w = np.polynomial.legendre.leggauss(n)
  return 0.5 * (a + b) + 0.5 * (b - a) * x, 0.5 * (b - a) * w


def log_panels(lo: float, n: int):
  """Composite Gauss-Legendre on decade panels [lo, 10 lo, ..., 1] (log-singular integrands)."""
  edges = np.geomspace(lo, 1.0, int(round(-np.log10(lo))) + 1)
  nodes, weights = zip(*[gauss_legendre(a, b, n) for a, b in zip(edges[:-1], edges[1:])])
  return np.concatenate(nodes), np.concatenate(weights)


def quadrature(process) -> tuple[np.ndarray, np.ndarray]:
  """Nodes / weights for int_0^1 dt (see continuous_nelbo)."""
  if isinstance(process, MaskedProcess):
    return gauss_legendre(0.0, 1.0, 64)
  nodes, weights = log_panels(common.T_MIN, 24)
  return np.append(nodes, common.T_MIN), np.append(weights, common.T_MIN)


def continuous_nelbo(process, params, x0, loss_mask=None) -> float:
  """int_0^1 E_{x_t}[nelbo] dt by quadrature.

  Masked: the integrand is smooth on [0, 1]: Gauss-Legendre. Uniform: it grows
  like log(1/t) at t -> 0, and float32 cannot resolve 1 - alpha below ~1e-6:
  decade panels on [T_MIN, 1] plus T_MIN * integrand(T_MIN), which is exactly
  the expectation of the clipped-time training estimator and differs from the
  true integral by O(T_MIN log(1/T_MIN)) ~ 1e-5.
  """
  nodes, weights = quadrature(process)
  return float(np.sum(weights * expected_nelbo(process, params, x0, nodes, loss_mask)))


def reverse_chain_nlls(process, params, x0, steps) -> np.ndarray:
  """-log p_T(x0) of the T-step model for each T: prior, then (S x S) matrices from `posterior`."""
  seqs = all_seqs(process.vocab_size)
  num_states = len(seqs)
  ts, ss = map(np.concatenate, zip(*[step_times(n) for n in steps]))
  _, x_t, t = tiled(process, x0, ts)
  _, _, s = tiled(process, x0, ss)
  probs = np.asarray(_posterior_values(process, params, x_t, t, s), np.float64)
  # trans[k, a, b] = prod_l p(x_s^l = seqs[b, l] | x_t = seqs[a]) at step pair k.
  probs = probs.reshape(len(ts), num_states, L, -1)
  trans = np.prod(np.stack([probs[:, :, l, seqs[:, l]] for l in range(L)], -1), -1)
  np.testing.assert_allclose(trans.sum(-1), 1.0, atol=1e-5)
  x0_state = int(seq_index(jnp.asarray(x0), process.vocab_size))
  nlls = []
  for chunk in np.split(trans, np.cumsum(steps)[:-1]):  # steps i = 1..T
    if isinstance(process, MaskedProcess):
      dist = np.zeros(num_states)
      dist[-1] = 1.0  # all-mask state (mask_id = V - 1 is the largest digit)
    else:
      dist = np.full(num_states, 1.0 / num_states)
    for m in chunk[::-1]:  # t = 1 -> 0
      dist = dist @ m
    nlls.append(-np.log(dist[x0_state]))
  return np.array(nlls)


PROCS = [pytest.param(MASKED, MASKED_X0, id="masked"),
         pytest.param(UNIFORM, UNIFORM_X0, id="uniform")]


# --- (a) discrete NELBO >= exact NLL of the T-step model -------------------------


@pytest.mark.parametrize("process,x0s", PROCS)
def test_discrete_nelbo_bounds_exact_nll(process, x0s):
  """NELBO_T >= -log p_T(x0) for the T-step reverse chain built from `posterior`."""
  params = table_params(process.vocab_size, seed=0)
  steps = (1, 2, 5, 20)
  for x0 in x0s:
    bounds = discrete_nelbos(process, params, x0, steps)
    nlls = reverse_chain_nlls(process, params, x0, steps)
    assert np.all(np.isfinite(bounds)) and np.all(np.isfinite(nlls))
    assert np.all(bounds >= nlls - 1e-5 * np.maximum(1.0, np.abs(nlls))), (x0, bounds, nlls)
    assert np.all(bounds[1:] > nlls[1:] + 1e-3)  # a random model has a real gap
    if isinstance(process, MaskedProcess):
      # T = 1: one step from the all-mask prior, no latent left: the bound is tight.
      np.testing.assert_allclose(bounds[0], nlls[0], rtol=1e-5)


def test_bound_is_tight_for_exact_reverse_model():
  """Sanity of the enumeration: a model that knows x0 has NELBO = NLL = 0.

  Masked process, logits = 50 onehot(x0) for every x_t: p(x_s | x_t) is then
  q(x_s | x_t, x0), so every KL term and the NLL vanish.
  """
  x0 = (0, 1, 2)
  logits = 50.0 * jax.nn.one_hot(jnp.asarray(x0), MASKED.vocab_size)  # [L, V]
  params = {"a": jnp.broadcast_to(logits, (4**L, L, 4)), "b": jnp.zeros((4**L, L, 4))}
  np.testing.assert_allclose(discrete_nelbos(MASKED, params, x0, (1, 3)), 0.0, atol=1e-4)
  np.testing.assert_allclose(reverse_chain_nlls(MASKED, params, x0, (1, 3)), 0.0, atol=1e-4)


# --- (b) discrete -> continuous as T grows ----------------------------------------


@pytest.mark.parametrize("process,x0s", PROCS)
@pytest.mark.parametrize("seed", [0, 1])
def test_discrete_nelbo_converges_to_continuous(process, x0s, seed):
  """disc(T) -> cont with an O(1/T) error, T in {2, 10, 100, 1000}.

  Verified behaviour (tabulated over several seeds / x0 while writing this):
    * masked: disc(T) is a Riemann sum of the smooth continuous integrand, the
      error is c/T from T ~ 10 on (err(100)/err(1000) = 10.0), and |err| is
      monotone; but c has either sign (disc(T) < cont happens) and disc(1) <
      disc(2) happens, so "disc(T) decreases in T" is NOT true in general.
    * uniform: also O(1/T) asymptotically, but the integrand is log-singular
      at t = 0 and the error changes sign at moderate T (seed 1: +1.7e-5 at
      T = 100, -1.2e-4 at T = 1000), so even |err| is not monotone.
  The T-step bounds bound different models, so nothing forces an ordering.
  """
  params = table_params(process.vocab_size, seed=seed)
  for x0 in x0s[:2]:
    cont = continuous_nelbo(process, params, x0)
    errs = discrete_nelbos(process, params, x0, (2, 10, 100, 1000)) - cont
    assert abs(errs[-1]) < 1e-3 * cont, (x0, errs, cont)
    assert abs(errs[-1]) < abs(errs[1]) / 20.0, (x0, errs)
    if isinstance(process, MaskedProcess):
      assert np.all(np.diff(np.abs(errs)) < 0), (x0, errs)
      np.testing.assert_allclose(errs[2] / errs[3], 10.0, rtol=0.2)


# --- (c) masked + exact denoiser: continuous NELBO = -log p_data(x0) ------------


def exact_denoiser_params(p_data: np.ndarray) -> dict[str, jnp.ndarray]:
  """Logits log p(x0_l = v | x_t) from the joint p_data over {0,1,2}^L, for all x_t."""
  data_seqs = all_seqs(3)  # [27, L]
  seqs = all_seqs(4)  # [64, L] (3 = mask)
  logits = np.full((len(seqs), L, 4), -30.0)
  for a, x_t in enumerate(seqs):
    visible = x_t != MASKED.mask_id
    consistent = np.all(data_seqs[:, visible] == x_t[visible], axis=-1)  # [27]
    post = p_data * consistent / np.sum(p_data * consistent)
    for l in range(L):
      marg = np.bincount(data_seqs[:, l], weights=post, minlength=3)
      logits[a, l, :3] = np.log(np.maximum(marg, 1e-30))
  return {"a": jnp.asarray(logits, jnp.float32), "b": jnp.zeros(logits.shape, jnp.float32)}


@pytest.mark.parametrize("schedule", [LinearSchedule(eps=0.0), CosineSchedule(eps=0.0)],
                         ids=["linear", "cosine"])
def test_masked_exact_denoiser_nelbo_equals_nll(schedule):
  """AO-ARM identity: with the true conditionals p(x0_l | x_t), NELBO_cont = -log p_data(x0).

  With the linear schedule the integrand is a polynomial of degree L-1 in t, so
  64-point Gauss-Legendre is exact and only float32 error remains; the cosine
  schedule checks that the result is schedule-invariant.
  """
  process = MaskedProcess(vocab_size=4, mask_id=3, schedule=schedule)
  p_data = np.random.default_rng(3).dirichlet(np.ones(27))
  params = exact_denoiser_params(p_data)
  for k, x0 in enumerate(all_seqs(3)):
    cont = continuous_nelbo(process, params, tuple(x0))
    np.testing.assert_allclose(cont, -np.log(p_data[k]), rtol=2e-5, atol=2e-5,
                               err_msg=str(x0))


def uniform_x0_posteriors(p_data: np.ndarray, x_t: np.ndarray, alpha: np.ndarray) -> np.ndarray:
  """p(x0_l = v | x_t) under q_t for the joint p_data over {0,..,V-1}^L: float64 [N, L, V]."""
  vocab = UNIFORM.vocab_size
  seqs = all_seqs(vocab)  # [S, L]
  a = alpha[:, None, None]
  lik = np.prod(a * (x_t[:, None, :] == seqs[None]) + (1 - a) / vocab, -1)  # [N, S]
  w = p_data[None] * lik
  w /= w.sum(-1, keepdims=True)
  return np.einsum("ns,slv->nlv", w, np.eye(vocab)[seqs])


def uniform_rate_matching_x0(post: np.ndarray, x_t: np.ndarray, alpha: np.ndarray) -> np.ndarray:
  """The x_hat whose plug-in rates f_y/f_x equal the true reverse rates: [N, L, V].

  True rate ratio r_y = sum_v p(x0_l = v | x_t) g_y(v) / g_{x_t}(v) with
  g(v) = alpha onehot(v) + (1-alpha)/V; f = r / sum(r) >= (1-alpha)/V, so
  x_hat = (f - (1-alpha)/V) / alpha is a probability vector. It is NOT the
  posterior mean p(x0_l | x_t) (the plug-in posterior is not linear in x0).
  """
  vocab = UNIFORM.vocab_size
  a = alpha[:, None, None, None]
  g = a * np.eye(vocab) + (1 - a) / vocab  # [N, 1, v, y]
  g_x = np.take_along_axis(g[:, 0], np.broadcast_to(x_t[:, None, :], (len(x_t), vocab, L)),
                           -1).transpose(0, 2, 1)  # [N, L, v]: g_{x_t^l}(v)
  r = np.einsum("nlv,nvy->nly", post / g_x, g[:, 0])
  return (r / r.sum(-1, keepdims=True) - (1 - a[..., 0]) / vocab) / a[..., 0]


def test_uniform_true_reverse_rates_nelbo_equals_nll():
  """Uniform analogue of (c): with the TRUE reverse rates, NELBO_cont = -log p_data(x0).

  For any process, NELBO(x0) = -log p_model(x0) + KL(q(path | x0) || p_model(path | x0)),
  and the KL vanishes when p_model's reverse rates are the true ones. With the
  plug-in (UDLM) parameterization those rates come from `uniform_rate_matching_x0`,
  not from the posterior mean E[x0 | x_t]; plugging in the posterior mean gives
  a strictly worse expected NELBO (and a sampler that does not reproduce p_data).
  """
  vocab = UNIFORM.vocab_size
  p_data = np.zeros(vocab**L)
  data = np.all(all_seqs(vocab) != UNIFORM.mask_id, axis=-1)  # the data avoid mask_id
  p_data[data] = np.random.default_rng(4).dirichlet(np.ones(data.sum()))
  nodes, weights = quadrature(UNIFORM)
  _, x_t, t = tiled(UNIFORM, (0,) * L, nodes)
  x_t, alpha = np.asarray(x_t), 1.0 - np.asarray(t, np.float64)  # linear, eps = 0
  post = uniform_x0_posteriors(p_data, x_t, alpha)
  params = {name: {"logits": jnp.asarray(np.log(np.maximum(x0_hat, 1e-30)), jnp.float32)}
            for name, x0_hat in [("rates", uniform_rate_matching_x0(post, x_t, alpha)),
                                 ("mean", post)]}
  nelbo = {name: [] for name in params}
  for k in np.flatnonzero(data):
    for name, prm in params.items():
      cont = np.sum(weights * expected_nelbo(UNIFORM, prm, all_seqs(vocab)[k], nodes,
                                             apply=rows_apply))
      nelbo[name].append(cont)
  nll = -np.log(p_data[data])
  np.testing.assert_allclose(nelbo["rates"], nll, rtol=1e-5, atol=1e-5)
  entropy = np.sum(p_data[data] * nll)
  assert np.sum(p_data[data] * np.array(nelbo["mean"])) > entropy + 1e-2


# --- (d) Monte Carlo training losses match the enumerated values ---------------------


def mc_loss(loss_name, process, params, x0, *, loss_cfg, loss_mask=None,
            batch_size=128, draws=512, seed=0):
  """(mean, standard error) of the per-token loss over independent rng draws."""
  tokens = jnp.broadcast_to(jnp.asarray(x0, jnp.int32), (batch_size, L))
  batch = {"tokens": tokens}
  if loss_mask is not None:
    batch["loss_mask"] = jnp.broadcast_to(jnp.asarray(loss_mask, jnp.float32), tokens.shape)
  loss_fn = losses.get_loss(loss_name)

  def one(rng):
    return loss_fn(params, batch, rng, model=lambda p, x, t, **kw: (table_apply(p, x, t), None),
                   process=process, config=loss_cfg)

  # unsafe_rbg keys only to cut XLA:CPU compile time; the losses are key-impl agnostic.
  keys = jax.random.split(jax.random.key(seed, impl="unsafe_rbg"), draws)
  vals, metrics = jax.jit(jax.vmap(one))(keys)
  vals = np.asarray(vals, np.float64)
  np.testing.assert_allclose(np.asarray(metrics["loss"]), vals)
  num_tokens = batch_size * (L if loss_mask is None else float(np.sum(loss_mask)))
  np.testing.assert_allclose(np.asarray(metrics["num_tokens"]), num_tokens)
  np.testing.assert_allclose(np.asarray(metrics["nelbo_sum"]) / num_tokens, vals, rtol=1e-5)
  return vals.mean(), vals.std(ddof=1) / np.sqrt(draws)


@pytest.mark.parametrize("process,x0s", PROCS)
@pytest.mark.parametrize("antithetic", [True, False])
def test_continuous_loss_matches_exact(process, x0s, antithetic):
  params = table_params(process.vocab_size, seed=1)
  x0 = x0s[1]
  exact = continuous_nelbo(process, params, x0) / L
  mean, se = mc_loss("nelbo", process, params, x0,
                     loss_cfg={"antithetic": antithetic, "num_steps": 0})
  assert abs(mean - exact) < 4.0 * se + 1e-4, (mean, se, exact)
  # The check has power. (The uniform estimator is heavy-tailed: a rare corrupted
  # position at t ~ T_MIN costs ~1/t nats, so its variance grows like log(1/T_MIN).)
  assert se < 0.05 * exact


@pytest.mark.parametrize("process,x0s", PROCS)
def test_continuous_loss_with_loss_mask(process, x0s):
  params = table_params(process.vocab_size, seed=2)
  x0, loss_mask = x0s[0], (1.0, 0.0, 1.0)
  exact = continuous_nelbo(process, params, x0, loss_mask) / 2.0
  ignored = continuous_nelbo(process, params, x0) / 3.0  # if the mask were ignored
  mean, se = mc_loss("nelbo", process, params, x0, loss_cfg={"antithetic": True},
                     loss_mask=loss_mask, draws=2048)
  assert abs(mean - exact) < 4.0 * se + 1e-4, (mean, se, exact)
  assert abs(mean - ignored) > 8.0 * se, (mean, se, ignored)


@pytest.mark.parametrize("process,x0s", PROCS)
def test_discrete_loss_matches_exact(process, x0s, num_steps=5):
  params = table_params(process.vocab_size, seed=1)
  x0 = x0s[2]
  exact = discrete_nelbos(process, params, x0, (num_steps,))[0] / L
  mean, se = mc_loss("discrete_nelbo", process, params, x0,
                     loss_cfg={"antithetic": True, "num_steps": num_steps})
  assert abs(mean - exact) < 4.0 * se + 1e-4, (mean, se, exact)
