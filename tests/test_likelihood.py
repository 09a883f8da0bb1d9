"""Conditional log-likelihoods (dlm/eval/likelihood.py): LLaDA's Monte-Carlo estimator against
exact enumeration, its standard error's coverage, the AR and BD3 reductions, one-line errors."""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from dlm import api, processes
from dlm.errors import UserError
from dlm.eval import likelihood
from dlm.models import transformer

V, MASK = 4, 3  # data tokens 0..2, then the mask
PROMPT, ANSWER = [2, 0], [1, 2, 0, 1]
L = len(PROMPT) + len(ANSWER)
SEQS = np.array(list(itertools.product(range(MASK), repeat=L)), np.int32)  # every sequence


def _joint(seed: int, independent: bool = False) -> np.ndarray:
  rng = np.random.default_rng(seed)
  if independent:  # p(prompt) p(answer): the answer ignores the prompt
    pp = rng.dirichlet(np.ones(MASK ** len(PROMPT)))
    pa = rng.dirichlet(np.ones(MASK ** len(ANSWER)) * 0.5)
    return np.outer(pp, pa).reshape(-1)
  return rng.dirichlet(np.ones(len(SEQS)) * 0.3)


def exact_denoiser(joint: np.ndarray):
  """The exact conditionals of a joint over SEQS: logits = log p(x0_l | the unmasked tokens)."""
  seqs, p = jnp.asarray(SEQS), jnp.asarray(joint, jnp.float32)
  onehot = jax.nn.one_hot(seqs, V)  # [S, L, V]

  def apply(params, x, t=None, attention_mask=None, **kw):
    del params, t, attention_mask, kw
    seen = (x[:, None, :] == MASK) | (x[:, None, :] == seqs[None])  # [R, S, L]
    w = p[None] * jnp.all(seen, -1)  # [R, S]
    marg = jnp.einsum("rs,slv->rlv", w, onehot) / jnp.sum(w, -1)[:, None, None]
    return jnp.where(jnp.arange(V) == MASK, -1e9, jnp.log(marg + 1e-30)), None
  return apply


def _lm(apply, params=None, *, kind="bidirectional", block=0, seq_len=64, cfg=None):
  cfg = cfg or transformer.ModelConfig(vocab_size=V, d_model=16, num_layers=1, num_heads=2,
                                       mlp_dim=32, mask_kind=kind, block_size=block,
                                       shift_logits=kind == "causal")
  config = ml_collections.ConfigDict({"process": {"name": "masked",
                                                  "schedule": {"name": "linear"}},
                                      "data": {"seq_len": seq_len}})
  return api.DiffusionLM(config=config, model_cfg=cfg, params=params or {},
                         ids={"mask": MASK, "eos": None, "pad": None, "bos": None},
                         tokenizer=None, apply=apply)


def _exact_nll(joint: np.ndarray) -> float:
  """-log p(ANSWER | PROMPT) of the joint."""
  is_prompt = np.all(SEQS[:, :len(PROMPT)] == PROMPT, 1)
  is_pair = is_prompt & np.all(SEQS[:, len(PROMPT):] == ANSWER, 1)
  return float(-np.log(joint[is_pair].sum() / joint[is_prompt].sum()))


def _enumerated(apply) -> float:
  """E[estimator]: sum_l 1/A sum_{|S|=l} 1/C(A,l) (A/l) sum_{i in S} -log p(x0_i | x with S masked)."""
  p, a = len(PROMPT), len(ANSWER)
  x0 = np.asarray(PROMPT + ANSWER, np.int32)
  total = 0.0
  for size in range(1, a + 1):
    for s in itertools.combinations(range(a), size):
      x = x0.copy()
      x[[p + i for i in s]] = MASK
      logits, _ = apply(None, jnp.asarray(x[None]))
      logp = jax.nn.log_softmax(jnp.where(jnp.arange(V) == MASK, -1e9, logits[0]), -1)  # SUBS
      nll = -sum(float(logp[p + i, x0[p + i]]) for i in s)
      total += (1 / a) / math.comb(a, size) * (a / size) * nll
  return total


def test_stratified_counts_cover_one_to_n():
  rng = np.random.default_rng(0)
  for n in (1, 5, 8):
    np.testing.assert_array_equal(np.sort(likelihood.stratified_counts(rng, n, n)),
                                  np.arange(1, n + 1))  # b = n: each count once
  draws = np.concatenate([likelihood.stratified_counts(rng, 5, 3) for _ in range(3000)])
  assert draws.min() == 1 and draws.max() == 5
  np.testing.assert_allclose(np.bincount(draws)[1:] / len(draws), 0.2, atol=0.02)
  # n = 4, rows = 8 hits halves (k + i/2): rounding them to even (torch.round, LLaDA) would
  # draw counts 2 and 4 three times as often as 1 and 3
  draws = np.concatenate([likelihood.stratified_counts(rng, 4, 8) for _ in range(2000)])
  np.testing.assert_allclose(np.bincount(draws)[1:] / len(draws), 0.25, atol=0.01)


def test_exact_denoiser_converges_to_the_exact_log_likelihood():
  """With the exact conditionals of a joint, the estimator's expectation is log p(r | p)
  (enumerated over every mask), and 2,048 stratified samples land within 4 SE of it."""
  joint = _joint(1)
  apply = exact_denoiser(joint)
  exact = _exact_nll(joint)
  assert abs(_enumerated(apply) - exact) < 1e-4
  m = _lm(apply)
  got = m.log_likelihood(PROMPT, ANSWER, num_samples=2048, batch_size=32, seed=0,
                         bucket=1)
  assert got.method == "monte_carlo" and got.num_tokens[0] == len(ANSWER)
  err = abs(-got.log_likelihood[0] - exact)
  assert 0 < got.std_error[0] < 0.05 and err < 4 * got.std_error[0], (got, exact)


def test_the_standard_error_covers_the_error_at_its_stated_rate():
  """A denoiser that is not exact: the estimate converges to the enumerated expectation (the
  NELBO), and over 100 seeds of 8 batches the error is within 2 SE about as often as a t(7)
  says (91%)."""
  rng = np.random.default_rng(3)
  table = jnp.asarray(rng.normal(size=(MASK ** L, L, V)) * 1.5, jnp.float32)
  place = jnp.asarray(MASK ** np.arange(L - 1, -1, -1))

  def apply(params, x, t=None, attention_mask=None, **kw):  # logits = table[x with masks as 0]
    return table[jnp.sum(jnp.where(x == MASK, 0, x) * place, -1)] + 0.5 * (x == MASK)[..., None], None
  want = _enumerated(apply)
  m = _lm(apply)
  pairs = 100
  got = m.log_likelihood([PROMPT], [ANSWER], num_samples=64, batch_size=8, seed=0, bucket=1)
  assert got.log_likelihood.shape == (1,)
  errs, ses = [], []
  for seed in range(pairs):
    r = m.log_likelihood(PROMPT, ANSWER, num_samples=64, batch_size=8, seed=seed, bucket=1)
    errs.append(-r.log_likelihood[0] - want)
    ses.append(r.std_error[0])
  errs, ses = np.asarray(errs), np.asarray(ses)
  coverage = np.mean(np.abs(errs) <= 2 * ses)
  assert 0.85 <= coverage <= 0.98, coverage
  assert abs(errs.mean()) < 3 * errs.std() / math.sqrt(pairs)  # unbiased
  np.testing.assert_allclose(ses.mean(), errs.std(), rtol=0.3)  # the SE is the error's scale


def test_estimates_do_not_depend_on_batching_padding_or_order():
  joint = _joint(2)
  m = _lm(exact_denoiser(joint))
  other = ([0, 1, 2], [2, 2, 1])
  one = m.log_likelihood(PROMPT, ANSWER, num_samples=32, batch_size=8, seed=5, bucket=1)
  both = m.log_likelihood([other[0], PROMPT], [other[1], ANSWER], num_samples=32,
                          batch_size=8, seed=5, bucket=1)
  np.testing.assert_allclose(both.log_likelihood[1], one.log_likelihood[0], rtol=1e-6)
  assert both.log_likelihood[0] != both.log_likelihood[1]


def test_guidance_is_llada_s_formula():
  """cfg_scale: logits = u + (cfg + 1)(c - u), u with the prompt masked; a joint where the
  answer ignores the prompt has u == c, so guidance changes nothing; a dependent one changes."""
  apply = exact_denoiser(_joint(4, independent=True))
  m = _lm(apply)
  kw = dict(num_samples=32, batch_size=8, seed=1, bucket=1)
  np.testing.assert_allclose(m.log_likelihood(PROMPT, ANSWER, cfg_scale=2.0, **kw).log_likelihood,
                             m.log_likelihood(PROMPT, ANSWER, **kw).log_likelihood, rtol=1e-5)
  dep = _lm(exact_denoiser(_joint(4)))
  assert abs(dep.log_likelihood(PROMPT, ANSWER, cfg_scale=2.0, **kw).log_likelihood[0]
             - dep.log_likelihood(PROMPT, ANSWER, **kw).log_likelihood[0]) > 1e-3


def _network(kind: str, block: int = 0):
  cfg = transformer.ModelConfig(vocab_size=V, d_model=16, num_layers=1, num_heads=2, mlp_dim=32,
                                mask_kind=kind, block_size=block, shift_logits=kind == "causal",
                                scan_layers=False)
  graphdef, state = nnx.split(transformer.init_model(cfg, 0))
  return _lm(transformer.apply_fn(graphdef), nnx.to_pure_dict(state), cfg=cfg)


def test_autoregressive_is_the_exact_chain_rule():
  m = _network("causal")
  got = m.log_likelihood([PROMPT, [1]], [ANSWER, [0, 0, 2]], batch_size=4)
  assert got.method == "exact" and np.all(got.std_error == 0) and got.num_samples == 1
  for j, (p, a) in enumerate([(PROMPT, ANSWER), ([1], [0, 0, 2])]):  # the second is padded
    x = jnp.asarray([p + a])
    logits, _ = m.apply(m.params, x, None)
    logp = jax.nn.log_softmax(logits[0], -1)
    want = sum(float(logp[i, x[0, i]]) for i in range(len(p), len(p) + len(a)))
    np.testing.assert_allclose(got.log_likelihood[j], want, rtol=1e-5)


def test_block_size_1_is_exact_and_matches_the_block_nelbo():
  """BD3 with blocks of 1: each answer token is its own block, always masked (count 1): no
  variance, and the value is the bd3 NELBO at t = 1 (weight 1) with the answer masked."""
  from dlm import losses
  m = _network("bd3", 1)
  a = m.log_likelihood(PROMPT, ANSWER, num_samples=16, batch_size=8, seed=0, bucket=1)
  b = m.log_likelihood(PROMPT, ANSWER, num_samples=8, batch_size=8, seed=9, bucket=8)
  assert a.method == "block" and a.std_error[0] < 1e-6
  np.testing.assert_allclose(a.log_likelihood, b.log_likelihood, rtol=1e-5)
  proc = processes.make_process({"name": "masked", "schedule": {"name": "linear", "eps": 0.0}},
                                vocab_size=V, mask_id=MASK)
  x0 = jnp.asarray([PROMPT + ANSWER])
  x_t = x0.at[:, len(PROMPT):].set(MASK)
  answer = jnp.asarray([[0] * len(PROMPT) + [1] * len(ANSWER)], jnp.float32)
  want = losses.bd3_block_nelbo(m.apply, m.params, proc, x0, x_t, jnp.ones((1, L)), 1, answer)
  np.testing.assert_allclose(-a.log_likelihood[0], float(want[0]), rtol=1e-5)


def test_a_real_network_with_padding_gives_the_unpadded_value():
  m = _network("bidirectional")
  kw = dict(num_samples=16, batch_size=8, seed=2)
  np.testing.assert_allclose(m.log_likelihood(PROMPT, ANSWER, bucket=1, **kw).log_likelihood,
                             m.log_likelihood(PROMPT, ANSWER, bucket=16, **kw).log_likelihood,
                             rtol=1e-5)


def test_bad_input_is_one_line():
  m = _lm(exact_denoiser(_joint(0)), seq_len=8)
  cases = [
      (dict(prompt_ids=[0] * 6, answer_ids=[1, 2, 1]), "exceed the model's context of 8"),
      (dict(prompt_ids=PROMPT, answer_ids=[]), "the answer is empty"),
      (dict(prompt_ids=PROMPT, answer_ids=[1, MASK]), "token 3 is not a data token"),
      (dict(prompt_ids=PROMPT, answer_ids=ANSWER, num_samples=20, batch_size=8),
       "num_samples=20 must be a multiple of batch_size=8"),
      (dict(prompt_ids=[PROMPT, PROMPT], answer_ids=[ANSWER]), "2 prompts but 1 answers"),
  ]
  for kw, match in cases:
    with pytest.raises(UserError, match=match) as e:
      m.log_likelihood(bucket=1, **kw)
    assert "\n" not in str(e.value)
  with pytest.raises(UserError, match="cfg_scale=1.0 must be >= 0, and 0 for exact"):
    _network("causal").log_likelihood(PROMPT, ANSWER, cfg_scale=1.0)


def test_blocks_of_2_converge_to_the_enumerated_block_expectation():
  """BD3 with blocks of 2 (the answer starts mid-block): each block's term enumerated over
  every mask of its answer positions, the earlier blocks clean; the estimate lands within
  4 SE of their sum."""
  m = _network("bd3", 2)
  p, a = len(PROMPT) + 1, len(ANSWER) - 1  # prompt of 3: block 1 holds prompt and answer
  x0 = np.asarray(PROMPT + ANSWER, np.int32)
  answer = np.arange(p, p + a)
  pos = jnp.broadcast_to(jnp.tile(jnp.arange(L, dtype=jnp.int32), 2), (1, 2 * L))
  want = 0.0
  for b in range(L // 2):
    unit = [i for i in answer if i // 2 == b]
    for size in range(1, len(unit) + 1):
      for s in itertools.combinations(unit, size):
        x = x0.copy()
        x[list(s)] = MASK
        logits, _ = m.apply(m.params, jnp.asarray(np.concatenate([x, x0])[None]), None,
                            positions=pos)
        logp = jax.nn.log_softmax(jnp.where(jnp.arange(V) == MASK, -1e9, logits[0, :L]), -1)
        nll = -sum(float(logp[i, x0[i]]) for i in s)
        want += (1 / len(unit)) / math.comb(len(unit), size) * (len(unit) / size) * nll
  got = m.log_likelihood(list(x0[:p]), list(x0[p:]), num_samples=512, batch_size=8, seed=0,
                         bucket=1)
  assert got.method == "block" and got.std_error[0] > 0
  assert abs(-got.log_likelihood[0] - want) < 4 * got.std_error[0], (got, want)
