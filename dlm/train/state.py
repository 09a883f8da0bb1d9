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
from dlm.models import transformer


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 []
  params: Any  # pure dict of float32 arrays
  opt_state: Any


def param_logical_specs(model_cfg: transformer.ModelConfig) -> tuple[nnx.GraphDef, Any, Any]:
  """(graphdef, abstract params, logical PartitionSpecs) without allocating anything."""
  graphdef, abstract = transformer.abstract_model(model_cfg)
  specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract))
  return graphdef, nnx.to_pure_dict(abstract), specs


def state_shardings(model_cfg: transformer.ModelConfig, tx: optax.GradientTransformation,
                    mesh: Mesh, rules: parallel.Rules) -> tuple[nnx.GraphDef, TrainState, TrainState]:
  """(graphdef, abstract TrainState, TrainState of NamedShardings)."""
  graphdef, abstract_params, specs = param_logical_specs(model_cfg)
  param_sh = parallel.tree_shardings(specs, mesh, rules)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_sh = optax.tree_map_params(
      tx, lambda _, sh: sh, abstract_opt, param_sh,
      transform_non_params=lambda _: NamedSharding(mesh, P()))
  shardings = TrainState(step=NamedSharding(mesh, P()), params=param_sh, opt_state=opt_sh)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                        opt_state=abstract_opt)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  return graphdef, abstract, shardings


def init_state(model_cfg: transformer.ModelConfig, tx: optax.GradientTransformation, seed: int,
               shardings: TrainState) -> TrainState:
  """Initializes directly into the sharded layout: no full copy on one host."""

  def init() -> TrainState:
    params = nnx.to_pure_dict(nnx.state(transformer.init_model(model_cfg, seed)))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  return jax.jit(init, out_shardings=shardings)()
