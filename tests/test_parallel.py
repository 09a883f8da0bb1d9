"""Mesh from config, logical rules, and sharded == unsharded training steps."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dlm import losses, parallel, processes
from dlm.models import transformer
from dlm.train import optim, state as state_lib, step as step_lib

MODEL = transformer.ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=8, mlp_dim=64)


def test_mesh_shape_resolves_and_rejects():
  assert parallel.mesh_shape({"data": -1, "fsdp": 2, "tensor": 1}, 8) == (4, 2, 1)
  assert parallel.mesh_shape({"data": 2, "fsdp": 2, "tensor": 2}, 8) == (2, 2, 2)
  with pytest.raises(ValueError, match="-1"):
    parallel.mesh_shape({"data": -1, "fsdp": -1, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="does not divide"):
    parallel.mesh_shape({"data": -1, "fsdp": 3, "tensor": 1}, 8)
  with pytest.raises(ValueError, match="available"):
    parallel.mesh_shape({"data": 4, "fsdp": 4, "tensor": 1}, 8)


def test_logical_to_spec_never_reuses_a_mesh_axis():
  rules = parallel.DEFAULT_RULES
  spec = parallel.logical_to_spec(("batch", "length", "embed"), rules)
  assert tuple(spec) == (("data", "fsdp"), None, None)
  assert tuple(parallel.logical_to_spec(("embed", "mlp"), rules)) == ("fsdp", "tensor")


def _config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict({
      "optim": {"name": "adamw", "lr": 1e-2, "warmup_steps": 1, "final_lr_frac": 0.1, "b1": 0.9,
                "b2": 0.98, "eps": 1e-8, "weight_decay": 0.01, "clip_norm": 1.0},
      "loss": {"name": "nelbo", "antithetic": True, "num_steps": 100},
  })


def _run_steps(mesh_sizes: dict[str, int], devices, batches, steps: int = 3):
  cfg = _config()
  mesh = parallel.make_mesh(mesh_sizes, devices)
  rules = parallel.DEFAULT_RULES
  process = processes.make_process({"name": "masked", "schedule": {"name": "linear"}},
                                   vocab_size=MODEL.vocab_size, mask_id=MODEL.vocab_size - 1)
  tx = optim.make_optimizer(cfg.optim, 10)
  graphdef, _, shardings = state_lib.state_shardings(MODEL, tx, mesh, rules)
  loss_fn = functools.partial(losses.get_loss("nelbo"), model=transformer.apply_fn(graphdef),
                              process=process, config=cfg.loss)
  state = state_lib.init_state(MODEL, tx, 0, shardings)
  step = step_lib.jit_train_step(mesh, rules, shardings, loss_fn=loss_fn, tx=tx,
                                 lr_fn=optim.learning_rate(cfg.optim, 10))
  batch0 = parallel.global_batch({"tokens": batches[0]}, mesh, rules)
  grad_fn = jax.jit(parallel.traced_in_mesh(
      lambda p, b: jax.grad(lambda q: loss_fn(q, b, jax.random.key(7))[0])(p), mesh, rules))
  grads = jax.device_get(grad_fn(state.params, batch0))
  out = []
  for b in batches[:steps]:
    state, m = step(state, parallel.global_batch({"tokens": b}, mesh, rules))
    out.append((float(m["loss"]), float(m["grad_norm"])))
  return out, jax.device_get(state.params), state, grads


@pytest.fixture(scope="module")
def batches():
  rng = np.random.default_rng(0)
  return [rng.integers(0, MODEL.vocab_size - 1, (8, 16)).astype(np.int32) for _ in range(3)]


@pytest.fixture(scope="module")
def single_device(batches):
  return _run_steps({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1], batches)


@pytest.mark.parametrize("sizes", [{"data": 8, "fsdp": 1, "tensor": 1},
                                   {"data": 1, "fsdp": 8, "tensor": 1},
                                   {"data": 1, "fsdp": 1, "tensor": 8},
                                   {"data": 2, "fsdp": 2, "tensor": 2}],
                         ids=["8x1x1", "1x8x1", "1x1x8", "2x2x2"])
def test_sharded_training_matches_one_device(sizes, batches, single_device):
  assert len(jax.devices()) == 8
  ref_metrics, ref_params, _, ref_grads = single_device
  metrics, params, state, grads = _run_steps(sizes, jax.devices(), batches)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(metrics, ref_metrics, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  # each parameter is laid out as the rules say
  mesh = state.params["head"].sharding.mesh
  _, _, specs = transformer.param_logical_specs(MODEL)
  for (path, p), (_, names) in zip(jax.tree_util.tree_leaves_with_path(state.params),
                                   jax.tree_util.tree_leaves_with_path(
                                       specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))):
    assert p.sharding.spec == parallel.logical_to_spec(tuple(names), parallel.DEFAULT_RULES, mesh), path
  # and the rules really shard: e.g. the MLP's hidden axis over `tensor`, `embed` over `fsdp`
  w = state.params["blocks"]["mlp"]["w_gate"]  # (layers, embed, mlp)
  assert w.sharding.spec == jax.sharding.PartitionSpec(
      None, "fsdp" if sizes["fsdp"] > 1 else None, "tensor" if sizes["tensor"] > 1 else None)


def test_fsdp_divides_parameter_and_optimizer_memory():
  tx = optim.make_optimizer(_config().optim, 10)
  per_device = []
  for f in (1, 2, 4, 8):
    mesh = parallel.make_mesh({"data": 8 // f, "fsdp": f, "tensor": 1})
    _, abstract, _ = state_lib.state_shardings(MODEL, tx, mesh, parallel.DEFAULT_RULES)
    per_device.append(parallel.bytes_per_device((abstract.params, abstract.opt_state)))
  ratios = [b / per_device[0] for b in per_device]
  # every matrix has an `embed` axis sharded over fsdp; only the tiny step counters stay whole
  np.testing.assert_allclose(ratios, [1, 1 / 2, 1 / 4, 1 / 8], rtol=1e-3)
