"""The train step's numerics: gradient accumulation, the non-finite guard, EMA, best-checkpoint keeping."""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dlm import losses, parallel, processes
from dlm.models import transformer
from dlm import checkpoint
from dlm.train import optim, state as state_lib, step as step_lib

MODEL = transformer.ModelConfig(vocab_size=40, d_model=32, num_layers=2, num_heads=2, mlp_dim=64)
# Adam's eps well above float rounding of near-zero gradient entries: g / (|g| + eps) would
# otherwise turn a 1e-12 rounding difference in a 1e-9 gradient into a 1e-3 parameter one.
OPTIM = ml_collections.ConfigDict(dict(name="adamw", lr=1e-2, warmup_steps=0, final_lr_frac=1.0,
                                       b1=0.9, b2=0.98, eps=1e-4, weight_decay=0.01, clip_norm=1.0))
PROCESS_CFG = ml_collections.ConfigDict(
    {"name": "masked", "schedule": {"name": "linear", "eps": 1e-4}})
B, L = 16, 12


def _batch(seed: int = 0, ragged: bool = True) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(5, MODEL.vocab_size - 1, (B, L)).astype(np.int32)
  mask = np.ones((B, L), np.float32)
  if ragged:  # rows of different lengths: microbatches weigh differently
    for i in range(B):
      mask[i, rng.integers(2, L + 1):] = 0.0
  return {"tokens": tokens, "loss_mask": mask}


@functools.lru_cache(maxsize=None)
def _setup(loss_name: str, microbatches: int, ema_decay: float = 0.0, devices: int = 1):
  mesh = parallel.make_mesh({"data": devices, "fsdp": 1, "tensor": 1}, jax.devices()[:devices])
  rules = parallel.DEFAULT_RULES
  tx = optim.make_optimizer(OPTIM, 100)
  graphdef, _, shardings = state_lib.state_shardings(MODEL, tx, mesh, rules, ema=ema_decay > 0)
  process = processes.make_process(PROCESS_CFG, vocab_size=MODEL.vocab_size,
                                   mask_id=MODEL.vocab_size - 1)
  loss_fn = functools.partial(losses.get_loss(loss_name), model=transformer.apply_fn(graphdef),
                              process=process, config={"antithetic": True, "num_steps": 10})
  step = step_lib.jit_train_step(mesh, rules, shardings, batch_keys=("tokens", "loss_mask"),
                                 loss_fn=loss_fn, tx=tx, lr_fn=optim.learning_rate(OPTIM, 100),
                                 microbatches=microbatches, ema_decay=ema_decay)
  return tx, shardings, step, loss_fn


def _init(loss_name: str, microbatches: int, ema_decay: float = 0.0, devices: int = 1):
  tx, shardings, step, loss_fn = _setup(loss_name, microbatches, ema_decay, devices)
  return state_lib.init_state(MODEL, tx, 0, shardings), step, loss_fn


def _host(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


@pytest.mark.parametrize("loss_name", ["nelbo_count", "nelbo"])
def test_four_microbatches_match_one_4x_batch(loss_name):
  """Accumulated gradient == whole-batch gradient (f32, 1e-5), so the updated params match too."""
  batch = _batch()
  state, _, loss_fn = _init(loss_name, 1)
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0)
  accumulate = jax.jit(step_lib.accumulate_gradients, static_argnums=(0, 4))
  loss1, m1, g1 = accumulate(loss_fn, state.params, batch, rng, 1)
  loss4, m4, g4 = accumulate(loss_fn, state.params, batch, rng, 4)
  np.testing.assert_allclose(loss4, loss1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m4["nelbo_sum"], m1["nelbo_sum"], rtol=1e-5)
  np.testing.assert_allclose(m4["num_tokens"], m1["num_tokens"])
  scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(_host(g1)))
  for a, b in zip(jax.tree.leaves(_host(g4)), jax.tree.leaves(_host(g1))):
    np.testing.assert_allclose(a, b, atol=1e-5 * scale, rtol=0)
  # through the jitted step, two updates each
  s1, step1, _ = _init(loss_name, 1)
  s4, step4, _ = _init(loss_name, 4)
  for seed in (0, 1):
    s1, _ = step1(s1, _batch(seed))
    s4, _ = step4(s4, _batch(seed))
  for a, b in zip(jax.tree.leaves(_host(s4.params)), jax.tree.leaves(_host(s1.params))):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_microbatches_sharded_match_one_device():
  """2 microbatches over 8 data-parallel devices == the same on one device."""
  s8, step8, _ = _init("nelbo_count", 2, devices=8)
  s1, step1, _ = _init("nelbo_count", 2)
  s8, m8 = step8(s8, _batch())
  s1, m1 = step1(s1, _batch())
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(_host(s8.params)), jax.tree.leaves(_host(s1.params))):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_nonfinite_update_is_skipped_and_counted():
  state, step, _ = _init("nelbo_count", 1, ema_decay=0.9)
  before = _host(state)
  bad = _batch()
  bad["loss_mask"][3, 0] = np.nan  # a NaN in the batch makes the loss NaN
  state, m = step(state, bad)
  assert float(m["update_skipped"]) == 1.0 and not np.isfinite(float(m["loss"]))
  assert int(state.nonfinite_total) == 1 and int(state.nonfinite_streak) == 1
  assert int(state.step) == 1  # the batch is consumed: the data order does not shift
  after = _host(state)
  for a, b in zip(jax.tree.leaves((after.params, after.opt_state, after.ema_params)),
                  jax.tree.leaves((before.params, before.opt_state, before.ema_params))):
    np.testing.assert_array_equal(a, b)
  state, m = step(state, bad)
  assert int(state.nonfinite_streak) == 2
  state, m = step(state, _batch(1))
  assert float(m["update_skipped"]) == 0.0 and np.isfinite(float(m["loss"]))
  assert int(state.nonfinite_total) == 2 and int(state.nonfinite_streak) == 0
  assert bool(step_lib.jit_all_finite(None)(state))
  assert not np.array_equal(jax.tree.leaves(_host(state.params))[0], jax.tree.leaves(before.params)[0])


def test_ema_is_the_warmed_up_polyak_average():
  """ema_s+1 = d ema_s + (1 - d) params_s+1 with d = min(decay, (1 + s) / (10 + s))."""
  decay = 0.95
  state, step, _ = _init("nelbo_count", 1, ema_decay=decay)
  ema = _host(state.params)
  for s in range(3):
    state, _ = step(state, _batch(s))
    d = min(decay, (1 + s) / (10 + s))
    ema = jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, _host(state.params))
  for a, b in zip(jax.tree.leaves(_host(state.ema_params)), jax.tree.leaves(ema)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_manager_keeps_latest_and_best(tmp_path: pathlib.Path):
  (tmp_path / "tok").write_bytes(b"tokenizer bytes")
  meta = checkpoint.run_meta({"a": 1}, tmp_path / "tok")
  assert checkpoint.tokenizer_bytes(meta) == b"tokenizer bytes"
  mngr = checkpoint.manager(tmp_path, max_to_keep=2)
  state = {"w": jnp.arange(3.0)}
  for step, val in [(1, 3.0), (2, 1.0), (3, 2.0), (4, None), (5, 2.5)]:
    assert checkpoint.save(mngr, step, state, {"pos": step}, meta, val)
  assert checkpoint.wait(mngr)
  mngr.close()
  assert checkpoint.manager(tmp_path, max_to_keep=2).all_steps() == [2, 4, 5]  # best 2, newest 4, 5
