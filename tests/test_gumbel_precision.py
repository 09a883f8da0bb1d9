"""32- vs 64-bit Gumbel noise on a small trained model: float32 noise lowers gen-ppl and entropy
together (Zheng et al. 2024, "Masked diffusion models are secretly time-agnostic masked models
and exploit inaccurate categorical sampling", sec. 4).

Why this data: float32 Gumbel-max cannot pick a candidate whose per-draw probability is below
~1e-7 (the noise stops at ~15.9).  MDLM's ancestral step draws each masked token against
"stay masked" (probability 1 - 1/k), so a token of probability p at step k of T is drawn with
p / (k T).  The two-mode data below makes one such rare draw decide a whole row: rows are
either 4 tokens of a 4-word vocabulary (mode A, 75%) or of a 58-word one (mode B, 25%), and
the row's first unmasked token fixes its mode.  Sampled at temperature 0.45 with 1,024 steps,
mode B's tokens start near 1e-7 a draw, where the float32 tail truncates them: the 64-bit
sampler draws mode-B rows at the model's rate and the 32-bit one fewer.  Both precisions share
one draw per seed (``categorical.uniform_32bit``), so rows without such a draw are identical
and the comparison measures the truncation alone, in seconds rather than the hours of
thousands of samples per precision.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dlm import losses, parallel, processes
from dlm.eval import samples
from dlm.models import loader, transformer
from dlm.train import optim, state as state_lib, step as step_lib

V, EOS, MASK = 64, 0, 63
MODE_A, MODE_B = np.arange(1, 5), np.arange(5, 63)
P_B, L = 0.25, 4
PROCESS = {"name": "masked", "schedule": {"name": "linear", "eps": 1e-4}}
KNOBS = dict(steps=1024, gen_length=L, temperature=0.45, top_p=1.0)
NUM_SAMPLES = 800


def _rows(rng: np.random.Generator, n: int) -> np.ndarray:
  """[n, 1 + L]: EOS (the document separator samples continue), then one mode's tokens."""
  b = rng.random(n) < P_B
  x = np.where(b[:, None], rng.choice(MODE_B, (n, L)), rng.choice(MODE_A, (n, L)))
  return np.concatenate([np.full((n, 1), EOS), x], 1).astype(np.int32)


def _trained_model(steps: int = 400, batch: int = 128) -> loader.DiffusionLM:
  """A 2-layer masked diffusion Transformer trained on the two-mode rows by the train step."""
  cfg = transformer.ModelConfig(vocab_size=V, d_model=32, num_layers=2, num_heads=2, mlp_dim=64)
  opt = ml_collections.ConfigDict(dict(name="adamw", lr=1e-2, warmup_steps=0, final_lr_frac=1.0,
                                       b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.0,
                                       clip_norm=1.0))
  process_cfg = ml_collections.ConfigDict(PROCESS)
  mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  tx = optim.make_optimizer(opt, steps)
  graphdef, _, shardings = state_lib.state_shardings(cfg, tx, mesh, parallel.DEFAULT_RULES)
  process = processes.make_process(process_cfg, vocab_size=V, mask_id=MASK)
  loss_fn = functools.partial(losses.get_loss("nelbo"), model=transformer.apply_fn(graphdef),
                              process=process, config={})
  step = step_lib.jit_train_step(mesh, parallel.DEFAULT_RULES, shardings,
                                 batch_keys=("tokens", "loss_mask"), loss_fn=loss_fn, tx=tx,
                                 lr_fn=optim.learning_rate(opt, steps))
  state = state_lib.init_state(cfg, tx, 0, shardings)
  rng = np.random.default_rng(0)
  loss_mask = np.ones((batch, 1 + L), np.float32)
  loss_mask[:, 0] = 0.0  # the separator is given, never generated
  for _ in range(steps):
    state, _ = step(state, {"tokens": _rows(rng, batch), "loss_mask": loss_mask})
  config = ml_collections.ConfigDict({"process": PROCESS, "data": {"seq_len": 1 + L}})
  return loader.DiffusionLM(config=config, model_cfg=cfg, params=state.params,
                            ids={"mask": MASK, "eos": EOS, "pad": None, "bos": None},
                            tokenizer=None, apply=transformer.apply_fn(graphdef),
                            decode_layout=False)


def _data_evaluator() -> loader.DiffusionLM:
  """The data's own autoregressive conditionals, log p(x_i | x_<i), as an AR model: the ideal
  gen-ppl evaluator (what a trained AR evaluator approximates)."""
  floor = 1e-9  # tokens the data never has (EOS, mask) keep a finite score

  def apply(params, x, t=None, attention_mask=None, **kw):
    del params, t, attention_mask, kw
    marginal = np.full(V, floor)
    marginal[MODE_A], marginal[MODE_B] = (1 - P_B) / len(MODE_A), P_B / len(MODE_B)
    in_a, in_b = np.full(V, floor), np.full(V, floor)
    in_a[MODE_A], in_b[MODE_B] = 1 / len(MODE_A), 1 / len(MODE_B)
    first = x[:, 1:2]
    later = jnp.where(jnp.isin(first, MODE_A)[..., None], jnp.asarray(in_a),
                      jnp.where(jnp.isin(first, MODE_B)[..., None], jnp.asarray(in_b),
                                jnp.asarray(marginal)))  # [B, 1, V]
    probs = jnp.where((jnp.arange(x.shape[1]) >= 2)[None, :, None], later,
                      jnp.asarray(marginal)[None, None])
    return jnp.log(jnp.broadcast_to(probs, x.shape + (V,))).astype(jnp.float32), None

  cfg = transformer.ModelConfig(vocab_size=V, d_model=16, num_layers=1, num_heads=2,
                                mlp_dim=32, mask_kind="causal", shift_logits=True)
  config = ml_collections.ConfigDict({"process": dict(PROCESS, name="autoregressive"),
                                      "data": {"seq_len": 1 + L}})
  return loader.DiffusionLM(config=config, model_cfg=cfg, params={},
                            ids={"mask": MASK, "eos": EOS, "pad": None, "bos": None},
                            tokenizer=None, apply=apply)


def test_float32_gumbel_noise_lowers_gen_ppl_and_entropy():
  model = _trained_model()
  # the regime where the float32 tail bites: mode B's tokens near 1e-7 per draw at the start,
  # and a row's first token fixes its mode (the model learned the data's two modes)
  logits = np.array(model.logits(np.array([[EOS] + [MASK] * L]))[0, 1])
  logits[MASK] = -np.inf
  p0 = np.asarray(jax.nn.softmax(logits / KNOBS["temperature"]))
  per_draw = p0[MODE_B] / KNOBS["steps"]
  assert 1e-8 < np.median(per_draw) < 3e-7 and 2e-3 < p0[MODE_B].sum() < 3e-2
  after = np.array(model.logits(np.array([[EOS, MODE_A[0]] + [MASK] * (L - 1),
                                          [EOS, MODE_B[0]] + [MASK] * (L - 1)])))[:, 2]
  after[:, MASK] = -np.inf
  p_b = np.asarray(jax.nn.softmax(after, -1))[:, MODE_B].sum(-1)
  assert p_b[0] < 0.02 and p_b[1] > 0.95

  evaluator = _data_evaluator()
  start = np.full((NUM_SAMPLES, 1), EOS, np.int32)
  got = {}
  for bits in (64, 32):
    out = model.generate(start, sampler="ancestral", seed=0, gumbel_bits=bits, **KNOBS)
    tokens = [list(map(int, t)) for t in out.token_ids]
    assert all(len(t) == L for t in tokens)  # no EOS drawn: every sample scores L tokens
    ppl, per = samples.gen_ppl(evaluator, tokens)
    got[bits] = dict(tokens=np.asarray(tokens), ppl=ppl, nll=np.asarray(per) * L,
                     entropy=np.mean([samples.entropy(t) for t in tokens]))
  x64, x32 = got[64]["tokens"], got[32]["tokens"]
  differ = np.flatnonzero(np.any(x64 != x32, 1))
  b64, b32 = np.isin(x64, MODE_B).any(1), np.isin(x32, MODE_B).any(1)
  # one draw per seed: the precisions part only in rows where a truncated draw mattered...
  assert 3 <= len(differ) <= 30, len(differ)
  # ... and there the 64-bit row is the rare mode, the 32-bit row never is (its noise is the
  # 64-bit noise rounded down onto float32's grid)
  assert b64[differ].sum() >= 3 and not b32[differ].any()
  assert got[64]["nll"][differ].sum() > got[32]["nll"][differ].sum()
  # Zheng et al.'s direction: gen-ppl and entropy both lower with float32 noise
  assert got[32]["ppl"] < got[64]["ppl"]
  assert got[32]["entropy"] < got[64]["entropy"]
  # the 64-bit sampler draws mode B at the model's own rate (its first-token probability)
  rate = b64.mean()
  assert abs(rate - p0[MODE_B].sum()) < 4 * np.sqrt(p0[MODE_B].sum() / NUM_SAMPLES) + 1e-3
