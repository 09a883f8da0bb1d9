"""SEDD (Lou et al. 2024) score entropy on the absorbing and uniform graphs (issue 22, part 2:
the processes and the DWDSE; its samplers and recipe follow)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm import losses, processes
from dlm.errors import UserError
from dlm.processes import base
from dlm.processes.schedules import CosineSchedule, LogLinearSchedule

V, MASK = 9, 8


def _case(seed: int, per_position: bool):
  rng = np.random.default_rng(seed)
  x0 = jnp.asarray(rng.integers(0, V - 1, (3, 6)), jnp.int32)
  t = rng.uniform(0.05, 0.95, (3, 6) if per_position else (3,)).astype(np.float32)
  logits = jnp.asarray(rng.normal(size=(3, 6, V)) * 2, jnp.float32)
  return x0, jnp.asarray(t), logits


@pytest.mark.parametrize("per_position", [False, True])
def test_absorbing_dwdse_of_an_exact_score_is_the_masked_nelbo(per_position):
  """With s = r p(x0 | x_t) (the score of an x0 predictor) the DWDSE is sum sigma r (-log p):
  MDLM's weight -alpha'/(1 - alpha), the masked NELBO."""
  for schedule in (CosineSchedule(), LogLinearSchedule()):
    masked = processes.MaskedProcess(V, MASK, schedule)
    sedd = processes.SEDDAbsorbing(V, MASK, schedule)
    x0, t, logits = _case(0, per_position)
    x_t = masked.corrupt(jax.random.key(1), x0, t)
    assert bool(jnp.any(x_t == MASK)) and bool(jnp.any(x_t != MASK))
    score = sedd.score_of_x0_logits(logits, t)
    np.testing.assert_allclose(sedd.nelbo(score, x0, x_t, t), masked.nelbo(logits, x0, x_t, t),
                               rtol=2e-5)
    # SUBS of the log score is the predictor's x0 distribution: the analytic reverse step
    np.testing.assert_allclose(sedd.posterior(score, x_t, t, t * 0.5),
                               masked.posterior(logits, x_t, t, t * 0.5), atol=1e-6)


@pytest.mark.parametrize("per_position", [False, True])
def test_uniform_dwdse_of_an_exact_score_is_the_uniform_nelbo(per_position):
  """With s_y = f_y / f_{x_t} the DWDSE is the CTMC path KL that UniformProcess.nelbo is."""
  uniform = processes.UniformProcess(V, MASK, CosineSchedule())
  sedd = processes.SEDDUniform(V, MASK, CosineSchedule())
  x0, t, logits = _case(2, per_position)
  x_t = uniform.corrupt(jax.random.key(3), x0, t)
  score = sedd.score_of_x0_logits(logits, x_t, t)
  np.testing.assert_allclose(sedd.nelbo(score, x0, x_t, t), uniform.nelbo(logits, x0, x_t, t),
                             rtol=2e-5)


@pytest.mark.parametrize("name", ["sedd_absorbing", "sedd_uniform"])
def test_the_true_score_minimizes_the_expected_score_entropy(name):
  """For one position: E_{x0 ~ p(x0 | x_t)} DWDSE(s) is least at the true score (any
  perturbation costs more), and every term is >= 0."""
  process = processes.make_process({"name": name, "schedule": {"name": "cosine"}},
                                   vocab_size=V, mask_id=MASK)
  rng = np.random.default_rng(4)
  p = rng.dirichlet(np.ones(V - 1))  # p(x0 | x_t) over the data tokens
  t = jnp.asarray([0.6], jnp.float32)
  x_t = jnp.asarray([[MASK if name == "sedd_absorbing" else 2]], jnp.int32)
  x0_logits = jnp.asarray(np.append(np.log(p), -1e9)[None, None], jnp.float32)
  if name == "sedd_absorbing":
    true = process.score_of_x0_logits(x0_logits, t)
  else:
    true = process.score_of_x0_logits(x0_logits, x_t, t)

  def expected(log_s):
    per_x0 = [float(process.nelbo(log_s, jnp.asarray([[v]], jnp.int32), x_t, t)[0])
              for v in range(V - 1)]
    assert min(per_x0) >= 0.0
    return float(np.dot(p, per_x0))

  best = expected(true)
  for k in range(5):
    noise = jnp.asarray(rng.normal(size=(1, 1, V)) * 0.3, jnp.float32)
    assert expected(true + noise) > best


def test_sedd_declares_score_and_is_refused_where_x0_is_read():
  sedd = processes.SEDDAbsorbing(V, MASK, CosineSchedule())
  assert base.describe(sedd) == ("absorbing", "score")
  assert base.describe(processes.SEDDUniform(V, MASK, CosineSchedule())) == ("uniform", "score")
  losses.check_process("nelbo", sedd)  # the DWDSE is its nelbo
  with pytest.raises(UserError, match="loss 'nelbo_count' cannot take process 'SEDDAbsorbing'"
                                      " \\(kind absorbing, score-parameterized\\): it takes"
                                      " x0-parameterized") as e:
    losses.check_process("nelbo_count", sedd)
  assert "\n" not in str(e.value)
  from dlm.sample import engine
  make = engine.resolve("llada")
  assert make.params == ("x0",)
  with pytest.raises(UserError, match="sampler 'llada' cannot take process 'SEDDAbsorbing'"):
    base.check_takes("sampler", "llada", make.kinds, sedd, params=make.params)
