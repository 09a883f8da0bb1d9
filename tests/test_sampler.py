"""The sampler driven by an exact denoiser of a known distribution reproduces it (chi-square)."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from dlm import processes
from dlm.sample import categorical as cat
from dlm.sample import generate, samplers

V, L = 3, 3  # data tokens, sequence length
MASK = V  # vocab_size = V + 1 for the masked process


def _joint(seed: int = 0) -> np.ndarray:
  """A correlated distribution over V^L: p(x) ∝ exp(w . features)."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(V,) * L) * 1.5
  p = np.exp(logits)
  return p / p.sum()


def _all_x0() -> np.ndarray:
  return np.array(list(itertools.product(range(V), repeat=L)), np.int32)  # [V^L, L]


def masked_exact_denoiser(p: np.ndarray):
  """p(x0_l | x_t) of the data distribution, tabulated for every x_t in (V+1)^L."""
  xs = _all_x0()
  probs = p.reshape(-1)
  states = np.array(list(itertools.product(range(V + 1), repeat=L)), np.int32)
  table = np.zeros((len(states), L, V + 1))
  for i, x_t in enumerate(states):
    ok = np.all((x_t == MASK) | (xs == x_t), axis=1)
    w = probs * ok
    for l in range(L):
      table[i, l, :V] = np.bincount(xs[:, l], weights=w, minlength=V) / w.sum()
  logits = jnp.asarray(np.log(np.maximum(table, 1e-30)), jnp.float32)
  radix = (V + 1) ** np.arange(L - 1, -1, -1)

  def denoise(x_t, t):
    return logits[jnp.sum(x_t * radix, axis=-1)]

  return denoise


def uniform_exact_denoiser(p: np.ndarray, process):
  """The x0-prediction whose reverse rates are the true ones (UDLM's NELBO minimiser).

  The true reverse rate from x_t to y at position l is R(y -> x) r_y with
  r_y = sum_v p(x0_l = v | x_t) g_y(v) / g_{x_t}(v), g(v) = q_t(. | x0 = v); the
  model's is R(y -> x) f_y / f_x with f = alpha x̂ + (1 - alpha) / V, so
  f = r / sum(r) and x̂ = (f - (1 - alpha) / V) / alpha.  (The posterior mean
  E[x0 | x_t] is not it: plugged in, the chain does not converge to p.)
  """
  xs = jnp.asarray(_all_x0())  # [N, L]
  logp = jnp.log(jnp.asarray(p.reshape(-1), jnp.float32))

  def denoise(x_t, t):
    alpha = process.schedule.alpha(t)[:, None, None]  # [B, 1, 1]
    match = (x_t[:, None, :] == xs[None]).astype(jnp.float32)  # [B, N, L]
    q = alpha * match + (1 - alpha) / V  # q(x_t^l | x0^l)
    w = jax.nn.softmax(logp[None] + jnp.sum(jnp.log(q), -1), axis=-1)  # [B, N]
    post = jnp.einsum("bn,nlv->blv", w, jax.nn.one_hot(xs, V))  # p(x0_l = v | x_t)
    g = alpha[..., None] * jnp.eye(V) + (1 - alpha[..., None]) / V  # [B, 1, v, y] = g_y(v)
    g_x = jnp.take_along_axis(g[:, 0][:, None], x_t[:, :, None, None], axis=-1)  # [B, L, v, 1]
    r = jnp.einsum("blv,blvy->bly", post, g[:, 0][:, None] / g_x)  # [B, L, V]
    f = r / jnp.sum(r, -1, keepdims=True)
    x_hat = (f - (1 - alpha) / V) / alpha
    return jnp.log(jnp.maximum(x_hat, 1e-30))

  return denoise


def _chi_square(samples: np.ndarray, p: np.ndarray) -> float:
  idx = np.sum(samples * (V ** np.arange(L - 1, -1, -1)), axis=1)
  counts = np.bincount(idx, minlength=V ** L)
  return stats.chisquare(counts, p.reshape(-1) * len(samples)).pvalue


@pytest.mark.parametrize("name", ["masked", "uniform"])
def test_ancestral_reproduces_known_distribution(name):
  p = _joint()
  vocab = V + 1 if name == "masked" else V
  process = processes.make_process({"name": name, "schedule": {"name": "linear"}},
                                   vocab_size=vocab, mask_id=MASK if name == "masked" else 0)
  denoise = masked_exact_denoiser(p) if name == "masked" else uniform_exact_denoiser(p, process)
  n = 10_000
  given = np.zeros((L,), np.int32)
  fixed = np.zeros((L,), bool)
  tokens, nfe = generate.sample_tokens(denoise, process, given, fixed, num_samples=n, seed=0,
                                       steps=1000)
  assert nfe == 1000
  assert tokens.min() >= 0 and tokens.max() < V
  assert _chi_square(tokens, p) > 1e-3


def test_fixed_tokens_never_change_and_condition():
  """Prompt tokens stay; the rest follow p(x | x_0 = prompt) exactly."""
  p = _joint(1)
  process = processes.make_process({"name": "masked", "schedule": {"name": "cosine"}},
                                   vocab_size=V + 1, mask_id=MASK)
  denoise = masked_exact_denoiser(p)
  given = np.array([2, MASK, MASK], np.int32)
  fixed = np.array([True, False, False])
  tokens, _ = generate.sample_tokens(denoise, process, given, fixed, num_samples=20_000, seed=3,
                                     steps=500)
  assert (tokens[:, 0] == 2).all()
  cond = p[2] / p[2].sum()  # [V, V]
  idx = tokens[:, 1] * V + tokens[:, 2]
  counts = np.bincount(idx, minlength=V * V)
  assert stats.chisquare(counts, cond.reshape(-1) * len(tokens)).pvalue > 1e-3


def test_wrong_denoiser_is_detected():
  """The chi-square check can fail: a denoiser of another distribution is rejected."""
  p, q = _joint(0), _joint(5)
  process = processes.make_process({"name": "masked", "schedule": {"name": "linear"}},
                                   vocab_size=V + 1, mask_id=MASK)
  tokens, _ = generate.sample_tokens(masked_exact_denoiser(q), process, np.zeros(L, np.int32),
                                     np.zeros(L, bool), num_samples=20_000, seed=0, steps=200)
  assert _chi_square(tokens, p) < 1e-6


def test_categorical_matches_probabilities_and_has_long_tail():
  logp = jnp.log(jnp.array([0.6, 0.25, 0.1, 0.05]))
  draws = cat.categorical(jax.random.key(1), jnp.broadcast_to(logp, (200_000, 4)))
  counts = np.bincount(np.asarray(draws), minlength=4)
  expected = np.array([0.6, 0.25, 0.1, 0.05]) * 200_000
  assert stats.chisquare(counts, expected).pvalue > 1e-3
  # The smallest uniform the 64-bit construction can produce gives a Gumbel beyond
  # float32's 16.6 and float64's 36.7 ceilings.
  assert float(cat.gumbel_from_uniform(jnp.float32(0.5 * 2.0 ** -64))) > 40.0


def test_top_p_keeps_smallest_nucleus():
  logits = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
  kept = np.isfinite(np.asarray(cat.top_p_filter(logits, 0.7)))
  assert kept.tolist() == [True, True, False, False]
  kept = np.isfinite(np.asarray(cat.top_p_filter(logits, 0.81)))
  assert kept.tolist() == [True, True, True, False]
  assert np.isfinite(np.asarray(cat.top_p_filter(logits, 1.0))).all()


def test_temperature_zero_is_argmax():
  p = _joint(2)
  process = processes.make_process({"name": "masked", "schedule": {"name": "linear"}},
                                   vocab_size=V + 1, mask_id=MASK)
  tokens, _ = generate.sample_tokens(masked_exact_denoiser(p), process, np.zeros(L, np.int32),
                                     np.zeros(L, bool), num_samples=4, seed=0, steps=8,
                                     temperature=0.0)
  assert (tokens == tokens[0]).all()


@pytest.mark.parametrize("name", ["masked", "uniform"])
def test_denoiser_cache_draws_the_same_tokens_with_fewer_calls(name):
  """MDLM's cache: a t-independent denoiser is not called again while no token changes."""
  p = _joint(3)
  vocab = V + 1 if name == "masked" else V
  process = processes.make_process({"name": name, "schedule": {"name": "linear"}},
                                   vocab_size=vocab, mask_id=MASK if name == "masked" else 0)
  denoise = masked_exact_denoiser(p)
  if name == "uniform":  # some t-independent denoiser over the uniform process' vocabulary
    masked = denoise
    denoise = lambda x, t: masked(jnp.where(x == 0, MASK, x), t)[..., :V]
  kw = dict(num_samples=8, seed=4, steps=200)
  given, fixed = np.zeros(L, np.int32), np.zeros(L, bool)
  plain, nfe_plain = generate.sample_tokens(denoise, process, given, fixed, **kw)
  cached, nfe_cached = generate.sample_tokens(denoise, process, given, fixed,
                                              uses_t=False, **kw)
  np.testing.assert_array_equal(cached, plain)
  assert nfe_plain == 200 and 1 <= nfe_cached < 200
