"""Training throughput knobs keep the math: scanned == unrolled layers (loss, gradients,
checkpoints), the losses' log-probabilities without [B, L, V] temporaries, and the telemetry
(MFU in metrics.jsonl, a jax.profiler trace of ``train.profile_steps``)."""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dlm import losses, processes
from dlm.errors import UserError
from dlm.models import transformer
from dlm.processes import common
from dlm.train import metrics, mfu

ROOT = pathlib.Path(__file__).resolve().parents[1]
V, L = 64, 32


def _loss_and_grads(scan_layers: bool, remat: str, time_conditioning: bool):
  cfg = transformer.ModelConfig(vocab_size=V, d_model=32, num_layers=3, num_heads=4,
                                num_kv_heads=2, mlp_dim=48, remat=remat,
                                time_conditioning=time_conditioning, scan_layers=scan_layers)
  graphdef, state = nnx.split(transformer.init_model(cfg, 0))
  params = nnx.to_pure_dict(state)
  proc = processes.make_process({"name": "masked", "schedule": {"name": "linear"}},
                                vocab_size=V, mask_id=V - 1)
  loss_fn = functools.partial(losses.get_loss("nelbo"), model=transformer.apply_fn(graphdef),
                              process=proc, config={"antithetic": True})
  rng = np.random.default_rng(0)
  seg = np.sort(rng.integers(0, 3, (4, L)), axis=1).astype(np.int32)  # packed documents
  batch = {"tokens": jnp.asarray(rng.integers(0, V - 1, (4, L)), jnp.int32),
           "segment_ids": jnp.asarray(seg)}
  (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      params, batch, jax.random.key(1))
  return float(loss), grads


@pytest.mark.parametrize("remat,time_conditioning", [("none", False), ("full", True),
                                                     ("dots", False)])
def test_scanned_and_unrolled_layers_give_the_same_loss_and_gradients(remat, time_conditioning):
  loss_s, grads_s = _loss_and_grads(True, remat, time_conditioning)
  loss_u, grads_u = _loss_and_grads(False, remat, time_conditioning)
  assert abs(loss_s - loss_u) <= 1e-6 * max(1.0, abs(loss_s))
  flat_s, flat_u = jax.tree.leaves(grads_s), jax.tree.leaves(grads_u)
  assert jax.tree.structure(grads_s) == jax.tree.structure(grads_u)  # same (stacked) params
  for a, b in zip(flat_s, flat_u):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=0)


def test_nll_at_equals_the_log_softmax_it_replaces():
  """logsumexp - target == -log_softmax[target]; with the mask column excluded it is MDLM's
  SUBS log-probability (x0_logits) at a masked position."""
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(3, 7, V)) * 4, jnp.float32)
  x0 = jnp.asarray(rng.integers(0, V - 1, (3, 7)), jnp.int32)
  ref = -common.gather_last(jax.nn.log_softmax(logits, -1), x0)
  np.testing.assert_allclose(common.nll_at(logits, x0), ref, rtol=1e-6, atol=1e-6)
  proc = processes.make_process({"name": "masked", "schedule": {"name": "linear"}},
                                vocab_size=V, mask_id=V - 1)
  x_t = jnp.full_like(x0, V - 1)
  subs = -common.gather_last(proc.x0_logits(logits, x_t), x0)
  np.testing.assert_allclose(proc.masked_nll(logits, x0), subs, rtol=1e-6, atol=1e-6)
  # the mask column's logit does not move the NLL (it is out of the softmax)
  bumped = logits.at[..., V - 1].add(50.0)
  np.testing.assert_allclose(proc.masked_nll(bumped, x0), subs, rtol=1e-6, atol=1e-6)


def test_flops_per_step_counts_matmuls_and_attention():
  cfg = transformer.ModelConfig(vocab_size=V, d_model=32, num_layers=2, num_heads=4)
  n = 10_000 + V * 32
  want = 3 * 16 * (6 * 10_000 + 12 * 2 * 16 * 4 * 8)
  assert mfu.train_flops(cfg, n, 3, 16) == want
  bd3 = dataclasses.replace(cfg, mask_kind="bd3", block_size=4)  # a pass over x_t (+) x_0
  assert mfu.train_flops(bd3, n, 3, 16) == 3 * 32 * (6 * 10_000 + 12 * 2 * 32 * 4 * 8)


def _smoke(workdir, **train):
  from configs import quickstart  # noqa: PLC0415
  from dlm.train import loop  # noqa: PLC0415
  config = quickstart.get_config("smoke")
  config.train.update(dict(eval_every=1000, checkpoint_every=1000, log_every=1), **train)
  return config, loop


def test_profile_mfu_and_resume_across_scanned_and_unrolled(tmp_path, monkeypatch):
  monkeypatch.syspath_prepend(str(ROOT))
  config, loop = _smoke(tmp_path, steps=3, profile_steps="2:3")
  config.model.scan_layers = True
  loop.train(config, tmp_path)
  records = [r for r in metrics.read_metrics(tmp_path) if "mfu" in r]
  assert [r["step"] for r in records] == [1, 2, 3]
  for r in records:
    assert 0 < r["mfu"] < 1 and r["step_s"] > 0 and 0 <= r["data_s"] <= r["step_s"]
  traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
  assert traces and all(p.stat().st_size > 0 for p in traces)  # TensorBoard's profile plugin
  # the same run goes on with unrolled layers: the checkpoint is the same stacked parameters
  # (profiling from step 4 to 9 of a run that ends at 5: the trace is closed at the end)
  config, loop = _smoke(tmp_path, steps=5, profile_steps="4:9")
  config.model.scan_layers = False
  result = loop.train(config, tmp_path)
  assert result["step"] == 5
  assert len(list((tmp_path / "profile").rglob("*.xplane.pb"))) > len(traces)
  # resumed at 3, not started afresh: steps 4 and 5 only were added
  assert [r["step"] for r in metrics.read_metrics(tmp_path) if "mfu" in r] == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("spec", ["3", "0:2", "5:4", "a:b"])
def test_bad_profile_steps_is_one_line(tmp_path, monkeypatch, spec):
  monkeypatch.syspath_prepend(str(ROOT))
  config, loop = _smoke(tmp_path, steps=3, profile_steps=spec)
  with pytest.raises(UserError, match="train.profile_steps"):
    loop.train(config, tmp_path)
  assert not any(tmp_path.iterdir())  # refused before anything was written


def _curve(dtype: str, steps: int = 30) -> tuple[list[float], set]:
  """Losses of ``steps`` AdamW steps from the same init on the same batches (a learnable
  pattern: each row counts up from a random start), and the parameters' dtypes."""
  from dlm.train import optim, state as state_lib, step as step_lib  # noqa: PLC0415
  import ml_collections  # noqa: PLC0415
  cfg = transformer.ModelConfig(vocab_size=V, d_model=64, num_layers=2, num_heads=4, mlp_dim=128,
                                dtype=dtype, scan_layers=False)
  graphdef, _ = nnx.split(transformer.init_model(cfg, 0))
  proc = processes.make_process({"name": "masked", "schedule": {"name": "linear"}},
                                vocab_size=V, mask_id=V - 1)
  loss_fn = functools.partial(losses.get_loss("nelbo_count"),
                              model=transformer.apply_fn(graphdef), process=proc,
                              config={"antithetic": True})
  ocfg = ml_collections.ConfigDict(dict(name="adamw", lr=3e-3, warmup_steps=5, final_lr_frac=0.1,
                                        b1=0.9, b2=0.98, eps=1e-8, weight_decay=0.01,
                                        clip_norm=1.0))
  tx = optim.make_optimizer(ocfg, steps)
  state = state_lib.from_params(nnx.to_pure_dict(nnx.state(transformer.init_model(cfg, 0))), tx,
                                0, ema=False)
  step = jax.jit(functools.partial(step_lib.train_step, loss_fn=loss_fn, tx=tx,
                                   lr_fn=optim.learning_rate(ocfg, steps)))
  rng = np.random.default_rng(0)
  out = []
  for _ in range(steps):
    start = rng.integers(0, V - 1, (16, 1))
    tokens = (start + np.arange(L)) % (V - 1)
    state, m = step(state, {"tokens": jnp.asarray(tokens, jnp.int32)})
    out.append(float(m["loss"]))
  return out, {a.dtype for a in jax.tree.leaves(state.params)}


def test_bfloat16_compute_keeps_float32_master_weights_and_the_float32_curve():
  f32, dtypes32 = _curve("float32")
  bf16, dtypes16 = _curve("bfloat16")
  assert dtypes32 == dtypes16 == {jnp.dtype(jnp.float32)}  # master weights stay float32
  assert bf16[-1] < 0.8 * bf16[0]  # it learns the pattern
  np.testing.assert_allclose(bf16, f32, rtol=0.03)  # and follows the float32 curve


def test_tpu_chips_are_known_by_their_device_kind():
  assert mfu.tpu_chip_peak("TPU v5p") == mfu.tpu_chip_peak("TPU v5") == 459e12
  assert mfu.tpu_chip_peak("TPU v5 lite") == 197e12
  assert mfu.tpu_chip_peak("TPU v6 lite") == 918e12
  assert mfu.tpu_chip_peak("TPU v4") == 275e12
  assert mfu.tpu_chip_peak("cpu") is None
  assert mfu.peak_flops(123.0) == 123.0
