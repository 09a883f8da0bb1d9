"""Diffusion processes (forward noising, ELBO terms, reverse steps) and schedules.

Configs name a process by registry name ("masked", "uniform") or by import
path ("my_pkg.my_mod:MyProcess"); see `make_process`.
"""

from __future__ import annotations

from typing import Any

from dlm.processes import common
from dlm.processes.autoregressive import AutoregressiveProcess
from dlm.processes.base import PROCESSES, Process
from dlm.processes.masked import MaskedProcess
from dlm.processes.schedules import (SCHEDULES, CosineSchedule,
                                     GeometricSchedule, LinearSchedule,
                                     LogLinearSchedule, PolynomialSchedule,
                                     Schedule, SqrtSchedule, build_from_config,
                                     config_to_dict, make_schedule)
from dlm.processes.uniform import UniformProcess
from dlm.processes.score_entropy import SEDDAbsorbing, SEDDUniform  # noqa: E402  (after their bases)
from dlm.processes.genmd4 import GenMD4Process  # noqa: E402
from dlm.processes.gaussian import GaussianProcess  # noqa: E402
from dlm.processes.d3pm import D3PMProcess  # noqa: E402

__all__ = [
    "PROCESSES", "SCHEDULES", "Process", "MaskedProcess", "UniformProcess",
    "AutoregressiveProcess", "SEDDAbsorbing", "SEDDUniform", "GenMD4Process",
    "GaussianProcess", "D3PMProcess",
    "Schedule", "LinearSchedule", "CosineSchedule", "PolynomialSchedule",
    "LogLinearSchedule", "GeometricSchedule", "SqrtSchedule", "make_process", "make_schedule",
    "common", "bind", "learned_specs", "param_value",
]


def make_process(cfg: Any, *, vocab_size: int, mask_id: int) -> Process:
  """Builds cls(vocab_size, mask_id, schedule=make_schedule(cfg.schedule), **rest).

  cfg: ConfigDict / mapping with `name` (registry name or "module:Class") and
  `schedule` (a make_schedule config); any other keys must be fields of the
  process class.
  """
  params = config_to_dict(cfg)
  if "name" not in params:
    raise ValueError("process config needs a 'name', e.g. 'masked' or 'uniform'")
  name = params.pop("name")
  if "schedule" not in params:
    raise ValueError(
        f"process {name!r} config needs a 'schedule' sub-config, e.g."
        " {'name': 'linear'}")
  schedule = make_schedule(params.pop("schedule"))
  return build_from_config(
      PROCESSES.get(name), params, kind="process", name=name,
      vocab_size=vocab_size, mask_id=mask_id, schedule=schedule)


def learned_specs(process: Any) -> tuple[tuple[str, tuple[int, ...], tuple[Any, ...], float], ...]:
  """The parameters a process learns with the denoiser: ``process.learned_params()`` (optional),
  ((name, shape, logical axes, initial value), ...); they live in the denoiser's parameters
  under ``params["process"][name]`` (``ModelConfig.process_params``), trained, checkpointed and
  sharded with them."""
  fn = getattr(process, "learned_params", None)
  specs = tuple(fn()) if fn is not None else ()
  for spec in specs:
    name, shape, axes, init = spec
    if not (isinstance(name, str) and len(shape) == len(axes)):
      raise ValueError(f"process {type(process).__name__}: learned_params entry {spec!r} must be"
                       " (name, shape, logical axes of the same rank, initial value)")
  return tuple((n, tuple(int(d) for d in sh), tuple(ax), float(v)) for n, sh, ax, v in specs)


def bind(process: Any, params: Any) -> Any:
  """The process with the denoiser's parameters it reads (``process.bind(params)``: GenMD4's
  learned schedule, an embedding process's table); processes without ``bind`` as they are.
  Called wherever a process meets parameters: losses, eval, the sampling engine."""
  fn = getattr(process, "bind", None)
  return process if fn is None or params is None else fn(params)


def param_value(params: Any, *path: str) -> Any:
  """params[path[0]][path[1]]... as an array (nnx ``State`` / ``Param`` or plain dicts)."""
  x = params
  for key in path:
    x = x[key]
  return x[...] if hasattr(x, "get_value") else x  # an nnx Variable
