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
                                     Schedule, build_from_config,
                                     config_to_dict, make_schedule)
from dlm.processes.uniform import UniformProcess
from dlm.processes.score_entropy import SEDDAbsorbing, SEDDUniform  # noqa: E402  (after their bases)

__all__ = [
    "PROCESSES", "SCHEDULES", "Process", "MaskedProcess", "UniformProcess",
    "AutoregressiveProcess", "SEDDAbsorbing", "SEDDUniform",
    "Schedule", "LinearSchedule", "CosineSchedule", "PolynomialSchedule",
    "LogLinearSchedule", "GeometricSchedule", "make_process", "make_schedule",
    "common",
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
