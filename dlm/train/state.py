"""TrainState and its sharded initialization (eval_shape -> shardings -> jit(init))."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dlm import parallel
from dlm.models import lora, transformer


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes: saved whole in each checkpoint."""
  step: jax.Array  # int32 []: updates done (skipped non-finite ones included)
  params: Any  # pure dict of float32 arrays (the master weights)
  opt_state: Any
  ema_params: Any  # the params' exponential moving average, or None (train.ema_decay = 0)
  rng: jax.Array  # uint32 key data of the run's base key; step s uses fold_in(rng, s)
  nonfinite_total: jax.Array  # int32 []: updates skipped because loss or gradients were non-finite
  nonfinite_streak: jax.Array  # int32 []: how many of them in a row, up to this step


def state_shardings(model_cfg: transformer.ModelConfig, tx: optax.GradientTransformation,
                    mesh: Mesh, rules: parallel.Rules, *,
                    ema: bool = False) -> tuple[nnx.GraphDef, TrainState, TrainState]:
  """(graphdef, abstract TrainState, TrainState of NamedShardings).

  A LoRA model (``model_cfg.lora_rank``) trains its adapters only: the state's params (and
  optimizer and EMA) are ``lora.split``'s adapters; the frozen base is ``frozen_shardings``'.
  """
  graphdef, abstract_params, specs = transformer.param_logical_specs(model_cfg)
  if model_cfg.lora_rank:
    abstract_params, specs = lora.split(abstract_params)[1], lora.split(specs)[1]
  param_sh = parallel.tree_shardings(specs, mesh, rules)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_sh = optax.tree_map_params(
      tx, lambda _, sh: sh, abstract_opt, param_sh,
      transform_non_params=lambda _: NamedSharding(mesh, P()))
  scalar = NamedSharding(mesh, P())
  shardings = TrainState(step=scalar, params=param_sh, opt_state=opt_sh,
                         ema_params=param_sh if ema else None, rng=scalar,
                         nonfinite_total=scalar, nonfinite_streak=scalar)
  count = jax.ShapeDtypeStruct((), jnp.int32)
  abstract = TrainState(step=count, params=abstract_params, opt_state=abstract_opt,
                        ema_params=abstract_params if ema else None,
                        rng=jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))),
                        nonfinite_total=count, nonfinite_streak=count)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return graphdef, abstract, shardings


def frozen_shardings(model_cfg: transformer.ModelConfig, mesh: Mesh,
                     rules: parallel.Rules) -> tuple[Any, Any]:
  """(abstract base params with their shardings, the shardings) of a LoRA model's frozen part."""
  _, abstract_params, specs = transformer.param_logical_specs(model_cfg)
  base, base_specs = lora.split(abstract_params)[0], lora.split(specs)[0]
  sh = parallel.tree_shardings(base_specs, mesh, rules)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), base, sh), sh


def init_adapters(model_cfg: transformer.ModelConfig, seed: int, shardings: Any) -> Any:
  """Fresh LoRA adapters (A fan-in normal, B zero), made directly in their shardings."""
  return jax.jit(lambda: lora.split(nnx.to_pure_dict(nnx.state(
      transformer.init_model(model_cfg, seed))))[1], out_shardings=shardings)()


def init_state(model_cfg: transformer.ModelConfig, tx: optax.GradientTransformation, seed: int,
               shardings: TrainState) -> TrainState:
  """Initializes directly into the sharded layout: no full copy on one host."""

  def init() -> TrainState:
    params = nnx.to_pure_dict(nnx.state(transformer.init_model(model_cfg, seed)))
    return from_params(params, tx, seed, ema=shardings.ema_params is not None)

  return jax.jit(init, out_shardings=shardings)()


def from_params(params: Any, tx: optax.GradientTransformation, seed: int, *,
                ema: bool) -> TrainState:
  """Step 0 around given parameters: fresh optimizer, EMA starting at the parameters."""
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, opt_state=tx.init(params),
                    ema_params=jax.tree.map(jnp.copy, params) if ema else None,
                    rng=jax.random.key_data(jax.random.key(seed)),
                    nonfinite_total=zero, nonfinite_streak=zero)


def warm_start(params: Any, tx: optax.GradientTransformation, seed: int,
               shardings: TrainState) -> TrainState:
  """``--init_from``: given parameters (already in their shardings), everything else fresh."""
  fn = lambda p: from_params(p, tx, seed, ema=shardings.ema_params is not None)
  return jax.jit(fn, out_shardings=shardings)(params)
