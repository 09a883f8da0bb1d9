"""The any-order (count) form of the absorbing NELBO equals the time-integral form exactly."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm import losses, processes

V, L = 3, 3
MASK = V


def _table_denoiser(seed: int):
  table = jax.random.normal(jax.random.key(seed), (V + 1,) * L + (L, V + 1)) * 2.0
  return lambda params, x_t, t: table[tuple(x_t[:, i] for i in range(L))]  # [B, L, V+1]


def _contract(logits_fn):
  """A logits table as the denoiser contract the losses call: -> (logits, cache)."""
  return lambda params, x_t, t, **kw: (logits_fn(params, x_t, t), None)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_count_form_equals_continuous_nelbo(schedule):
  process = processes.make_process({"name": "masked", "schedule": {"name": schedule, "eps": 0.0}},
                                   vocab_size=V + 1, mask_id=MASK)
  model = _table_denoiser(0)
  x0 = np.array([2, 0, 1], np.int32)
  subsets = [s for n in range(1, L + 1) for s in itertools.combinations(range(L), n)]

  def x_t_of(s):
    x = x0.copy()
    x[list(s)] = MASK
    return x

  # Count form, exactly: n ~ U{1..L}, S uniform of size n, (L/n) sum_{l in S} -log p.
  count = 0.0
  for s in subsets:
    x_t = jnp.asarray(x_t_of(s))[None]
    logp = process.x0_logits(model(None, x_t, None), x_t)[0]
    ce = -sum(float(logp[l, x0[l]]) for l in s)
    count += (1 / L) / math.comb(L, len(s)) * (L / len(s)) * ce

  # Time form: integral over t of E_{x_t ~ q_t}[nelbo], Gauss-Legendre on (0, 1).
  nodes, weights = np.polynomial.legendre.leggauss(64)
  ts = (nodes + 1) / 2
  cont = 0.0
  for t, w in zip(ts, weights / 2):
    alpha = float(process.schedule.alpha(jnp.float32(t)))
    for s in subsets:
      p_s = (1 - alpha) ** len(s) * alpha ** (L - len(s))
      x_t = jnp.asarray(x_t_of(s))[None]
      val = process.nelbo(model(None, x_t, None), jnp.asarray(x0)[None], x_t,
                          jnp.array([t], jnp.float32))
      cont += w * p_s * float(val[0])
  np.testing.assert_allclose(count, cont, rtol=2e-4)  # nats per sequence

  # And the registered loss is an unbiased Monte Carlo estimate of it.
  tokens = jnp.broadcast_to(jnp.asarray(x0), (512, L))
  fn = jax.jit(lambda r: losses.get_loss("nelbo_count")(
      None, {"tokens": tokens}, r, model=_contract(model), process=process, config={"antithetic": True})[0])
  draws = np.array([float(fn(jax.random.key(i))) for i in range(64)])
  se = draws.std() / np.sqrt(len(draws))
  assert abs(draws.mean() - count / L) < 4 * se + 1e-4, (draws.mean(), count / L, se)  # per token


def test_count_loss_rejects_uniform_process():
  process = processes.make_process({"name": "uniform", "schedule": {"name": "linear"}},
                                   vocab_size=V, mask_id=0)
  with pytest.raises(ValueError, match="nelbo_count' cannot take process 'UniformProcess'.* absorbing"):
    losses.get_loss("nelbo_count")(None, {"tokens": jnp.zeros((2, L), jnp.int32)},
                                   jax.random.key(0), model=_contract(_table_denoiser(0)), process=process,
                                   config={})
