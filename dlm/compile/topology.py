"""TPU slices by name, without a TPU: ``v5p-128`` -> the 64 devices of a v5p 4x4x4 slice.

Accepted names: ``v4-N`` and ``v5p-N`` (N TensorCores, two per chip), ``v5e-N`` /
``v5litepod-N`` and ``v6e-N`` (N chips), and raw topology strings ``v5p:4x4x4``,
``v5e:16x16``, ``v6e:4x4``, ``v4:2x4x4``.  The devices come from
``jax.experimental.topologies.get_topology_desc`` (libtpu, no chip attached),
so programs compile for them on a CPU host.  Per-chip figures are the
published ones (Cloud TPU system architecture pages): HBM and peak bf16 FLOP/s.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

from dlm.errors import UserError

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str  # the generation as topology strings spell it
  hbm_bytes: int  # per chip
  peak_bf16_flops: float  # per chip, FLOP/s
  cores_in_name: int  # the "-N" of a slice name counts chips x this
  dims: int  # 2D (v5e, v6e) or 3D (v4, v5p) torus


CHIPS = {
    "v4": Chip("v4", 32 * GIB, 275e12, 2, 3),
    "v5e": Chip("v5e", 16 * GIB, 197e12, 1, 2),
    "v5p": Chip("v5p", 95 * GIB, 459e12, 2, 3),
    "v6e": Chip("v6e", 32 * GIB, 918e12, 1, 2),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6lite": "v6e", "v6litepod": "v6e"}

# Slice shapes by chip count (the ones Cloud TPU provisions).
_SHAPES_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
              128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
              2048: (8, 16, 16), 4096: (16, 16, 16), 8192: (16, 16, 32)}
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
              128: (8, 16), 256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str  # as given
  chip: Chip
  shape: tuple[int, ...]  # chips per torus dimension

  @property
  def num_chips(self) -> int:
    return math.prod(self.shape)

  @property
  def topology(self) -> str:
    return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"

  @property
  def accelerator_type(self) -> str:
    return f"{self.chip.name}-{self.num_chips * self.chip.cores_in_name}"


def _known() -> str:
  return ("v5p-128, v5e-256, v6e-16, v4-64, or a topology such as v5p:4x4x4, v5e:16x16;"
          f" chips: {sorted(CHIPS)}")


def parse(name: str) -> Slice:
  """A slice name or raw topology string -> Slice; a one-line UserError otherwise."""
  text = name.strip().lower()
  m = re.fullmatch(r"(v\d+[a-z]*)[:](\d+(?:x\d+)+)", text)
  if m:
    gen, dims = ALIASES.get(m.group(1), m.group(1)), tuple(int(d) for d in m.group(2).split("x"))
    chip = CHIPS.get(gen)
    if chip is None or len(dims) != chip.dims or min(dims) < 1:
      raise UserError(f"unknown TPU topology {name!r}; use {_known()}")
    return Slice(name, chip, dims)
  m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", text)
  if not m or ALIASES.get(m.group(1), m.group(1)) not in CHIPS:
    raise UserError(f"unknown TPU topology {name!r}; use {_known()}")
  chip = CHIPS[ALIASES.get(m.group(1), m.group(1))]
  n = int(m.group(2))
  chips, rem = divmod(n, chip.cores_in_name)
  shapes = _SHAPES_3D if chip.dims == 3 else _SHAPES_2D
  if rem or chips not in shapes:
    sizes = sorted(c * chip.cores_in_name for c in shapes)
    raise UserError(f"unknown TPU topology {name!r}: {chip.name} slices come in sizes {sizes}")
  return Slice(name, chip, shapes[chips])


def require_libtpu() -> None:
  try:
    import libtpu  # noqa: F401
  except ImportError:
    raise UserError("compiling for a TPU topology needs libtpu: pip install -e '.[tpu]'") from None


def devices(s: Slice) -> list[Any]:
  """The slice's TPU devices (compile-only: no chip attached)."""
  require_libtpu()
  # libtpu reads these to describe the host; on a machine that is not a TPU VM say so quietly
  # (set for this call only, so a child process never inherits another slice's type).
  quiet = {"TPU_ACCELERATOR_TYPE": s.accelerator_type, "TPU_SKIP_MDS_QUERY": "1",
           "TPU_WORKER_ID": "0", "TPU_WORKER_HOSTNAMES": "localhost",
           "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}  # compile-only: no chip to guard
  added = [k for k in quiet if k not in os.environ]
  os.environ.update({k: quiet[k] for k in added})
  from jax.experimental import topologies
  try:
    return list(topologies.get_topology_desc(s.topology, "tpu").devices)
  except Exception as e:  # noqa: BLE001  (libtpu's own message, one line)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"libtpu cannot describe topology {s.topology!r} ({first}); use {_known()}")
  finally:
    for k in added:
      os.environ.pop(k, None)
