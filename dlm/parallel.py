"""Device mesh from the config, and logical-axis -> mesh-axis rules.

Modules name every parameter and activation dimension with a logical axis
(``batch``, ``length``, ``embed``, ``heads``, ``kv``, ``mlp``, ``vocab``,
``layers``); ``config.mesh`` gives the mesh axis sizes and the rules table that
maps logical names onto mesh axes.  Changing parallelism is a config change.
"""

from __future__ import annotations

import contextlib
import functools
import contextvars
import math
from typing import Any, Callable, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes, tried in order.  A mesh axis already used by an
# earlier dimension of the same array is skipped (so activations' ``embed``
# stays replicated while ``batch`` takes ``fsdp``), as in flax/MaxText.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
)

Rules = Sequence[tuple[str, Any]]


def mesh_shape(mesh_cfg: Any, num_devices: int) -> tuple[int, ...]:
  """Resolves the sizes of ``data, fsdp, tensor``; one may be -1 (the rest)."""
  sizes = [int(mesh_cfg.get(name, 1)) for name in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f"config.mesh: only one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"config.mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
          f"config.mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices;"
          " set the sizes so their product divides the device count")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"config.mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but"
        f" {num_devices} are available; make the product equal or use -1 for one axis")
  return tuple(sizes)


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def rules_from_config(mesh_cfg: Any) -> tuple[tuple[str, Any], ...]:
  rules = mesh_cfg.get("rules", None)
  if rules is None:
    return DEFAULT_RULES
  return tuple((str(k), tuple(v) if isinstance(v, list) else v) for k, v in rules)


def logical_to_spec(names: Sequence[str | None] | None, rules: Rules, mesh: Mesh | None = None) -> P:
  """Maps logical axis names to a PartitionSpec, never reusing a mesh axis."""
  if names is None:
    return P()
  table = dict(rules)
  used: set[str] = set()
  out: list[Any] = []
  for name in names:
    target = table.get(name) if name is not None else None
    if target is None:
      out.append(None)
      continue
    axes = (target,) if isinstance(target, str) else tuple(target)
    axes = tuple(a for a in axes if a not in used and (mesh is None or mesh.shape[a] > 1))
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


# --- the active mesh, so modules can constrain activations by logical name ---
_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar(
    "dlm_active_mesh", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules) -> Iterator[None]:
  token = _ACTIVE.set((mesh, tuple(rules)))
  try:
    yield
  finally:
    _ACTIVE.reset(token)


def active_mesh() -> tuple[Mesh, Rules] | None:
  """The (mesh, rules) of the enclosing ``use_mesh``, or None."""
  return _ACTIVE.get()


def platform() -> str:
  """The platform a traced program runs on: the enclosing mesh's devices' (an AOT compile for
  TPU from a CPU host traces under a TPU mesh), else the default backend's."""
  active = _ACTIVE.get()
  if active is not None:
    return active[0].devices.flat[0].platform
  return jax.default_backend()


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint by logical names; a no-op outside ``use_mesh``."""
  active = _ACTIVE.get()
  if active is None:
    return x
  mesh, rules = active
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules, mesh)))


def tree_shardings(logical_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """A pytree of logical PartitionSpecs -> a pytree of NamedShardings."""
  return jax.tree.map(
      lambda spec: NamedSharding(mesh, logical_to_spec(tuple(spec), rules, mesh)),
      logical_tree, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int = 2) -> NamedSharding:
  names = ("batch",) + ("length",) + (None,) * (ndim - 2) if ndim >= 2 else ("batch",)
  return NamedSharding(mesh, logical_to_spec(names[:ndim], rules, mesh))


def global_batch(local: dict[str, np.ndarray], mesh: Mesh, rules: Rules) -> dict[str, jax.Array]:
  """Process-local numpy batch (this process's rows) -> global arrays sharded over ``batch``."""
  return {k: jax.make_array_from_process_local_data(batch_sharding(mesh, rules, v.ndim), v)
          for k, v in local.items()}


def spans_processes(mesh: Mesh) -> bool:
  """The mesh has devices of other processes (multi-host): arrays on it are global."""
  me = jax.process_index()
  return any(d.process_index != me for d in mesh.devices.flat)


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a global array sharded over its first axis: the inverse of
  ``global_batch`` (all of ``x`` when every device is this process's)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.global_array_to_host_local_array(
      x, x.sharding.mesh, x.sharding.spec))


def gather_rows(local: np.ndarray) -> np.ndarray:
  """Every process's ``local`` rows, concatenated in process order (the rows of the global
  batch that ``global_batch`` builds from them); ``local`` itself on one process."""
  if jax.process_count() == 1:
    return np.asarray(local)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(np.asarray(local), tiled=True))


def replicated_batch(host: dict[str, np.ndarray], mesh: Mesh, rules: Rules) -> dict[str, jax.Array]:
  """A batch every process holds in full -> global arrays; each device reads only its rows."""
  return {k: jax.make_array_from_callback(v.shape, batch_sharding(mesh, rules, v.ndim),
                                          lambda idx, v=v: v[idx])
          for k, v in host.items()}


def bytes_per_device(abstract: Any) -> int:
  """Bytes one device holds for a pytree of sharded arrays or ShapeDtypeStructs."""
  return int(sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                 for x in jax.tree.leaves(abstract)))


def traced_in_mesh(fn: Callable[..., Any], mesh: Mesh, rules: Rules) -> Callable[..., Any]:
  """Activations' logical constraints resolve against this mesh when ``fn`` is traced."""

  @functools.wraps(fn)
  def wrapped(*args: Any) -> Any:
    with use_mesh(mesh, rules):
      return fn(*args)

  return wrapped
