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


# ------------------------------------------------------------------ samplers --

import itertools  # noqa: E402

from scipy import stats  # noqa: E402

from dlm.sample import generate  # noqa: E402

TOK = 4  # data tokens 0..3; the absorbing graph's mask is 4


def _graph(name):
  vocab = TOK + 1 if name == "sedd_absorbing" else TOK
  return processes.make_process({"name": name, "schedule": {"name": "loglinear"}},
                                vocab_size=vocab, mask_id=TOK if vocab > TOK else 0)


def _q(process, t):
  """q_t(x | x0) [V(x0), V(x)] of one position."""
  v = process.vocab_size
  a = float(process.schedule.alpha(jnp.asarray([t], jnp.float32))[0])
  if process.kind == "absorbing":
    q = a * np.eye(v)
    q[:, process.mask_id] += 1 - a
    return q
  return a * np.eye(v) + (1 - a) / v


def exact_score(process, joint):
  """The concrete score of p_t = joint (over TOK^L) pushed through q_t: log p_t(x^(l<-y)) - log
  p_t(x), by enumeration (the exact denoiser of the score parameterization)."""
  length = joint.ndim
  x0s = np.asarray(list(itertools.product(range(TOK), repeat=length)))  # [N, L]
  pi = joint.reshape(-1)

  def fn(x_t, t):
    v = process.vocab_size
    alpha = process.schedule.alpha(t)[:, None, None]  # [B, 1, 1]
    eye = jnp.eye(v)[:TOK]  # rows: x0 in 0..TOK-1
    if process.kind == "absorbing":
      q = alpha * eye + (1 - alpha) * jax.nn.one_hot(process.mask_id, v)
    else:
      q = alpha * eye + (1 - alpha) / v  # [B, TOK, V]
    f = q[:, jnp.asarray(x0s), :]  # [B, N, L, V]: q(. | x0_l)
    at = jnp.take_along_axis(f, x_t[:, None, :, None], -1)[..., 0]  # [B, N, L]
    full = jnp.prod(at, -1)  # [B, N]
    p_x = jnp.einsum("n,bn->b", jnp.asarray(pi), full)
    rest = full[:, :, None] / jnp.maximum(at, 1e-30)  # [B, N, L] without position l
    p_y = jnp.einsum("n,bnl,bnlv->blv", jnp.asarray(pi), rest, f)
    return jnp.log(jnp.maximum(p_y, 1e-30)) - jnp.log(p_x)[:, None, None]
  return fn


@pytest.mark.parametrize("name", ["sedd_absorbing", "sedd_uniform"])
def test_tweedie_step_is_the_exact_reverse_step(name):
  """One position, the exact score: Tweedie tau-leaping gives q(x_s | x_t) exactly."""
  process = _graph(name)
  pi = np.random.default_rng(5).dirichlet(np.ones(TOK))
  score = exact_score(process, pi)
  for t, s in ((0.9, 0.6), (0.5, 0.45), (0.2, 0.0)):
    tt = jnp.asarray([t], jnp.float32)
    d = -np.log(float(process.schedule.alpha(tt)[0])) + np.log(
        float(process.schedule.alpha(jnp.asarray([s], jnp.float32))[0]))
    pad = np.zeros(process.vocab_size - TOK)
    p_t, p_s = np.append(pi, pad) @ _q(process, t), np.append(pi, pad) @ _q(process, s)
    for x in range(process.vocab_size):
      if p_t[x] <= 0:
        continue
      x_t = jnp.asarray([[x]], jnp.int32)
      probs = np.asarray(process.tweedie(score(x_t, tt), x_t, jnp.asarray([d], jnp.float32)))[0, 0]
      # exact: p_s(y) q_{t|s}(x | y) / p_t(x), with q_{t|s} = alpha_t/alpha_s mixing
      a_t = float(process.schedule.alpha(tt)[0])
      a_s = float(process.schedule.alpha(jnp.asarray([s], jnp.float32))[0])
      r = a_t / a_s
      if process.kind == "absorbing":
        q_step = r * np.eye(process.vocab_size)
        q_step[:, process.mask_id] += 1 - r
        q_step[process.mask_id] = np.eye(process.vocab_size)[process.mask_id]
      else:
        q_step = r * np.eye(process.vocab_size) + (1 - r) / process.vocab_size
      want = p_s * q_step[:, x] / p_t[x]
      np.testing.assert_allclose(probs / probs.sum(), want, atol=2e-5, err_msg=f"{t} {s} {x}")
      np.testing.assert_allclose(probs.sum(), 1.0, atol=2e-5)


def _chi(tokens, joint):
  idx = tokens[:, 0] * TOK + tokens[:, 1]
  counts = np.bincount(idx, minlength=TOK * TOK)
  return stats.chisquare(counts, joint.reshape(-1) * len(tokens)).pvalue


@pytest.mark.parametrize("name, predictor, steps", [("sedd_absorbing", "analytic", 512),
                                                    ("sedd_uniform", "analytic", 512),
                                                    ("sedd_absorbing", "euler", 1024),
                                                    ("sedd_uniform", "tau_leaping", 1024)])
def test_samplers_reproduce_a_known_distribution(name, predictor, steps):
  """With the exact score of a joint over 2 positions, the samples pass a chi-square test; the
  score of another joint fails it.  (Positions move independently within a step, so a
  coarse grid mixes in the product of marginals: 64 analytic steps fail here, 512 pass.)"""
  process = _graph(name)
  rng = np.random.default_rng(6)
  joint, other = (rng.dirichlet(np.ones(TOK * TOK) * 0.5).reshape(TOK, TOK) for _ in range(2))
  knobs = dict(steps=steps, predictor=predictor, num_samples=3000, batch_size=3000,
               sampler="sedd", given=np.full(2, process.mask_id if process.kind == "absorbing"
                                              else 0, np.int32), fixed=np.zeros(2, bool))
  def run(j, seed):
    g, f = knobs["given"], knobs["fixed"]
    rest = {k: v for k, v in knobs.items() if k not in ("given", "fixed")}
    tokens, nfe = generate.sample_tokens(exact_score(process, j), process, g, f, seed=seed, **rest)
    assert nfe == steps + 1 and tokens.max() < TOK
    return tokens
  assert _chi(run(joint, 0), joint) > 1e-3
  assert _chi(run(other, 1), joint) < 1e-6
