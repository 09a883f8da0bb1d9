"""BD3-LM block diffusion: the x_t (+) x_0 mask and the block NELBO, checked on the math.

- the mask equals the paper's definition (M_BD | M_OBC | M_BC), entry by entry;
- block size L: the block NELBO is MDLM's NELBO on the same draws;
- block size 1, every token masked: it is the autoregressive NLL of the same weights,
  computed token by token against a KV cache of the clean prefix.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dlm import losses, processes
from dlm.models import attention, transformer

V, MASK, L = 64, 63, 16


def _paper_mask(n: int, block: int) -> np.ndarray:
  """Arriola et al. 2025, Sec. 3.2, written out for every (query, key) pair."""
  out = np.zeros((2 * n, 2 * n), bool)
  for q in range(2 * n):
    for k in range(2 * n):
      q_clean, k_clean = q >= n, k >= n
      bq, bk = (q % n) // block, (k % n) // block
      m_bd = bq == bk and q_clean == k_clean  # block-diagonal, inside x_t and inside x_0
      m_obc = (not q_clean) and k_clean and bk < bq  # noisy block -> earlier clean blocks
      m_bc = q_clean and k_clean and bk <= bq  # x_0 block-causal
      out[q, k] = m_bd or m_obc or m_bc
  return out


@pytest.mark.parametrize("n,block", [(8, 1), (8, 2), (8, 4), (8, 8), (12, 3)])
def test_mask_is_the_papers_definition(n, block):
  np.testing.assert_array_equal(attention.kind_mask("bd3", block, 2 * n, 2 * n),
                                _paper_mask(n, block))


def test_a_block_size_that_does_not_divide_is_one_line():
  with pytest.raises(ValueError, match="block_size 3 dividing n"):
    attention.bd3_mask(16, 3)
  batch = {"tokens": jnp.zeros((2, L), jnp.int32)}
  proc = processes.make_process(
      {"name": "masked", "schedule": {"name": "linear", "eps": 0.0}}, vocab_size=V, mask_id=MASK)
  with pytest.raises(ValueError, match="block_size=5 must divide the sequence length 16"):
    losses.bd3_nelbo_loss({}, batch, jax.random.key(0), model=None, process=proc,
                          config={"block_size": 5})


def _model(kind: str, block: int):
  cfg = transformer.ModelConfig(vocab_size=V, d_model=32, num_layers=2, num_heads=4,
                                mlp_dim=64, mask_kind=kind, block_size=block)
  graphdef, state = nnx.split(transformer.init_model(cfg, 0))
  return cfg, transformer.apply_fn(graphdef), nnx.to_pure_dict(state)


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.integers(0, MASK, (3, L)), jnp.int32)
  proc = processes.make_process(
      {"name": "masked", "schedule": {"name": "linear", "eps": 0.0}}, vocab_size=V, mask_id=MASK)
  return x0, proc


def test_block_size_L_is_mdlm(data):
  x0, proc = data
  _, apply, params = _model("bd3", L)
  t = jnp.asarray([[0.3], [0.6], [0.9]])
  x_t = proc.corrupt(jax.random.key(1), x0, t[:, 0])
  got = losses.bd3_block_nelbo(apply, params, proc, x0, x_t, t, L)
  plain = dataclasses.replace(_model("bidirectional", 0)[0])
  logits, _ = transformer.apply_fn(nnx.split(transformer.init_model(plain, 0))[0])(
      params, x_t, None)
  want = proc.nelbo(logits, x0, x_t, t[:, 0])
  assert float(jnp.min(want)) > 0
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5)


def test_block_size_1_is_the_autoregressive_nll_of_the_same_weights(data):
  x0, proc = data
  _, apply, params = _model("bd3", 1)
  _, causal, _ = _model("causal", 0)
  t = jnp.ones((3, L))  # every token masked; the weight -alpha'/(1 - alpha) is 1 at t = 1 (eps 0)
  x_t = jnp.full_like(x0, MASK)
  got = losses.bd3_block_nelbo(apply, params, proc, x0, x_t, t, 1)
  # the clean prefix's keys, causally, in the bd3 model's own (pre-RoPE) cache format: a
  # window pass over x_0 at 0 under block_causal with blocks of 1 is causal attention
  shape = jax.eval_shape(lambda: causal(params, x0, None, fill_cache=True)[1])
  zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shape)
  _, cache = apply(params, x0, None, cache=zeros, cache_start=jnp.int32(0), fill_cache=True)
  nll = 0.0
  for l in range(L):  # [MASK] at l against the cached x_0[<l]: p(x_l | x_<l)
    logits, _ = apply(params, jnp.full((3, 1), MASK, jnp.int32), None, cache=cache,
                      cache_start=jnp.int32(l))
    logp = jax.nn.log_softmax(jnp.where(jnp.arange(V) == MASK, -1e9, logits[:, 0]), -1)
    nll = nll - jnp.take_along_axis(logp, x0[:, l:l + 1], -1)[:, 0]
  np.testing.assert_allclose(np.asarray(got), np.asarray(nll), rtol=2e-5)


def test_the_loss_trains_through_the_registry(data):
  x0, proc = data
  _, apply, params = _model("bd3", 4)
  loss_fn = losses.get_loss("bd3_nelbo")
  cfg = {"block_size": 4, "beta": 0.3, "omega": 0.8, "antithetic": True}
  (loss, metrics), grads = jax.value_and_grad(
      lambda p: loss_fn(p, {"tokens": x0}, jax.random.key(2), model=apply, process=proc,
                        config=cfg), has_aux=True)(params)
  assert np.isfinite(float(loss)) and float(loss) > 0 and metrics["num_tokens"] == x0.size
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def _lm(block: int):
  import ml_collections
  from dlm import api
  cfg, apply, params = _model("bd3", block)
  config = ml_collections.ConfigDict({"process": {"name": "masked",
                                                  "schedule": {"name": "linear"}}})
  return api.DiffusionLM(config=config, model_cfg=cfg, params=params,
                         ids={"mask": MASK, "eos": 7, "pad": 7, "bos": None}, tokenizer=None,
                         apply=apply)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_bd3_decoding_with_cache_equals_it_without(temperature):
  m = _lm(4)
  prompt = np.array([[3, 4, 5, 6, 8, 9, 10, 11], [7, 7, 7, 7, 12, 13, 14, 15]])
  am = np.array([[1] * 8, [0] * 4 + [1] * 4])
  kw = dict(sampler="bd3", gen_length=12, temperature=temperature, stop_at_eos=False, seed=5)
  a = m.generate(prompt, am, use_cache=True, **kw)
  b = m.generate(prompt, am, use_cache=False, **kw)
  np.testing.assert_array_equal(a.sequences, b.sequences)
  np.testing.assert_array_equal(a.committed_at[:, 8:] >= 0, True)
  assert not np.any(a.sequences == MASK)
  assert b.nfe == 12 and a.nfe == 1 + 12 + 2  # prompt pass, 4 per block, a clean pass between
  alone = m.generate(prompt[1:, 4:], sampler="bd3", gen_length=12, temperature=temperature,
                     stop_at_eos=False, seed=5)
  if temperature == 0:  # the padded row decodes as its prompt alone
    np.testing.assert_array_equal(a.sequences[1, 4:], alone.sequences[0])
  short = m.generate(prompt[:, 2:], am[:, 2:], **kw)  # left-padded to whole blocks, cut back
  assert short.sequences.shape == (2, 18)
  from dlm.errors import UserError
  with pytest.raises(UserError, match="gen_length=10 must be a multiple of the block 4"):
    m.generate(prompt, sampler="bd3", gen_length=10)


def test_quickstart_bd3_trains_samples_and_evaluates(tmp_path):
  """configs/quickstart.py:smoke,bd3,block=4 through dlm train / sample / eval (the block
  NELBO, the bd3 sampler with its cache), no extra flags; a block that does not divide
  data.seq_len is one line."""
  import json
  import os
  import pathlib
  import subprocess
  import sys
  root = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  run = lambda *a: subprocess.run([sys.executable, "-m", "dlm.main", *a], capture_output=True,
                                  text=True, env=env, cwd=root, timeout=600)
  bad = run("train", "--config=configs/quickstart.py:smoke,bd3,block=5",
            f"--workdir={tmp_path / 'bad'}")
  assert bad.returncode != 0 and "does not divide data.seq_len=64" in bad.stderr.strip(
      ).splitlines()[-1], bad.stderr[-1000:]
  w = tmp_path / "bd3"
  r = run("train", "--config=configs/quickstart.py:smoke,bd3,block=4", f"--workdir={w}")
  assert r.returncode == 0, r.stderr[-2000:]
  r = run("sample", f"--workdir={w}", "--prompt=def ", "--num_samples=2")
  assert r.returncode == 0, r.stderr[-2000:]
  bodies = [b.split("=====\n", 1)[1] for b in r.stdout.split("===== sample ")[1:]]
  assert len(bodies) == 2 and all(b.startswith("def ") for b in bodies)
  assert "(bd3, nfe " in r.stdout
  r = run("eval", f"--workdir={w}")
  assert r.returncode == 0, r.stderr[-2000:]
  assert 0 < json.loads(r.stdout.strip().splitlines()[-1])["bits_per_byte"] < 8


def test_bd3_stops_after_the_block_where_every_row_has_eos():
  m = _lm(4)
  prompt = np.array([[3, 4, 5, 6, 8, 9, 10, 11]])
  kw = dict(sampler="bd3", gen_length=32, temperature=0.0, seed=5)
  full = m.generate(prompt, **kw, stop_at_eos=False)
  first = full.sequences[0, 8:].tolist()
  eos = next(t for t in first[4:] if first.index(t) >= 4)  # a token first made after block 1
  m.ids["eos"] = int(eos)
  cut = m.generate(prompt, **kw, stop_at_eos=True)
  end = 8 + (first.index(eos) // 4 + 1) * 4  # the end of the block holding the first EOS
  assert cut.sequences.shape[1] == end < full.sequences.shape[1]
  np.testing.assert_array_equal(cut.sequences, full.sequences[:, :end])
  assert cut.token_ids[0] == first[:first.index(eos)]


def test_ancestral_reveal_probabilities_telescope_to_the_schedule():
  """MDLM eq. 7 on the grid t_i = 1 - i/T: a token still masked after step i has survived
  prod (1 - (a_s - a_t) / (1 - a_t)) = (1 - alpha(s_i)) / (1 - alpha(1)); the last step
  reveals everything."""
  from dlm.processes import schedules
  from dlm.sample import bd3
  sched = schedules.make_schedule({"name": "cosine"})
  T = 7
  survive = 1.0
  for i in range(T):
    p = float(bd3.reveal_probability(sched.alpha, jnp.int32(i), T))
    survive *= 1.0 - p
    s = 1.0 - (i + 1) / T
    want = (1.0 - float(sched.alpha(jnp.float32(s)))) / (1.0 - float(sched.alpha(jnp.float32(1.0))))
    assert abs(survive - (want if i + 1 < T else 0.0)) < 1e-5, (i, survive, want)
  lin = lambda t: 1.0 - t  # linear: 1 / (T - i)
  for i in range(T):
    assert abs(float(bd3.reveal_probability(lin, jnp.int32(i), T)) - 1 / (T - i)) < 1e-6


def test_nucleus_is_the_references_inclusive_cut():
  from dlm.sample import bd3
  logits = jnp.log(jnp.asarray([[0.2, 0.5, 0.3, 1e-9]]))
  kept = lambda p: np.isfinite(np.asarray(bd3.nucleus(logits, p)))[0].tolist()
  assert kept(0.85) == [False, True, True, False]  # 0.5, 0.8 <= 0.85; 1.0 is not
  assert kept(0.4) == [False, True, False, False]  # the most likely always stays
  assert kept(1.0) == [True] * 4


@pytest.mark.parametrize("first_hitting", [True, False])
def test_ancestral_steps_with_cache_equal_them_without(first_hitting):
  m = _lm(4)
  prompt = np.array([[3, 4, 5, 6, 8, 9, 10, 11], [7, 7, 7, 7, 12, 13, 14, 15]])
  am = np.array([[1] * 8, [0] * 4 + [1] * 4])
  kw = dict(sampler="bd3", gen_length=12, algorithm="ancestral", first_hitting=first_hitting,
            steps=10, nucleus_p=0.9, temperature=1.0, stop_at_eos=False, seed=3,
            context_size=None)
  a = m.generate(prompt, am, use_cache=True, **kw)
  b = m.generate(prompt, am, use_cache=False, **kw)
  np.testing.assert_array_equal(a.sequences, b.sequences)
  # the same reveal order (the cached run's call numbers also count its cache passes)
  np.testing.assert_array_equal(np.argsort(a.committed_at, 1, "stable"),
                                np.argsort(b.committed_at, 1, "stable"))
  assert not np.any(a.sequences == MASK)
  at = a.committed_at[:, 8:].reshape(2, 3, 4)
  if first_hitting:  # one token per pass, 4 passes per block whatever `steps`
    assert b.nfe == 12 and a.nfe == 1 + 12 + 2
    for blk in at:
      assert all(len(set(r.tolist())) == 4 for r in blk)
  else:  # 10 steps a block; a step that reveals nothing reuses the last call
    assert b.nfe < 30 and a.nfe == b.nfe + 3
  different = m.generate(prompt, am, use_cache=True, **dict(kw, seed=4))
  assert not np.array_equal(different.sequences, a.sequences)


def test_a_2x_context_generation_slides_a_bounded_cache():
  """context_size=16 (the window a pass sees), prompt 8 + 24 generated = 2x: the cache holds
  16 positions; until the window is full the tokens are the unwindowed ones; uncached,
  each block is exactly the continuation of the last 12 tokens alone (the context slid)."""
  from dlm.sample import bd3, engine
  m = _lm(4)
  prompt = np.array([[3, 4, 5, 6, 8, 9, 10, 11]])
  kw = dict(sampler="bd3", gen_length=24, temperature=0.0, stop_at_eos=False, seed=0)
  whole = m.generate(prompt, **kw, context_size=None)
  slid = m.generate(prompt, **kw, context_size=16)
  slid_uncached = m.generate(prompt, **kw, context_size=16, use_cache=False)
  assert slid.sequences.shape == whole.sequences.shape == (1, 32)
  np.testing.assert_array_equal(slid.sequences[:, :16], whole.sequences[:, :16])
  np.testing.assert_array_equal(slid_uncached.sequences[:, :16], whole.sequences[:, :16])
  seq = slid_uncached.sequences
  for start in (16, 20, 24, 28):
    alone = m.generate(seq[:, start - 12:start], **dict(kw, gen_length=4), use_cache=False)
    np.testing.assert_array_equal(alone.sequences[:, 12:], seq[:, start:start + 4])
  assert slid.nfe == 1 + 6 * 4 + 5
  den = engine.denoiser_of_apply(m.sampling[1], m.sampling_params(), **engine._ids(m))
  sampler = bd3.make(den, None, **dict(engine.check_knobs("bd3", bd3.make, dict(
      gen_length=24, context_size=16))))
  given, fixed, _ = engine.prompt_template(prompt.astype(np.int32), None, 24, MASK)
  state = sampler.init(jax.random.key(0), jnp.asarray(given), jnp.asarray(fixed), None)
  assert state.aux["cache"].length == 16  # bounded: not the 32 positions generated
  from dlm.errors import UserError
  with pytest.raises(UserError, match="context_size=6 must be a multiple of the block 4"):
    m.generate(prompt, **kw, context_size=6)
  with pytest.raises(UserError, match="algorithm='ddpm' unknown"):
    m.generate(prompt, **kw, algorithm="ddpm")
