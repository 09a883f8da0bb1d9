"""What an evaluation ran: model, sampler, knobs, seed, precision, code version.

Every eval result (``dlm eval``, ``dlm harness``, ``dlm eval --samples`` / ``--frontier``)
carries ``record(...)`` beside its figures, so a number can be traced to what produced it.
"""

from __future__ import annotations

import datetime
import functools
import importlib.metadata
import pathlib
import subprocess
from typing import Any

import jax
import numpy as np

# how samplers draw categorical noise (dlm/sample/categorical.py), unless a knob says otherwise
GUMBEL_NOISE = "gumbel from a 64-bit uniform (tail ~44), float32 arithmetic"


@functools.cache
def code_version() -> dict[str, Any]:
  """dlm's version and, from a source checkout, its git commit (``+dirty`` with local edits);
  jax and flax versions."""
  out: dict[str, Any] = {}
  for name in ("dlm", "jax", "flax"):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  root = pathlib.Path(__file__).resolve().parents[2]
  if (root / ".git").exists():
    try:
      sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                           text=True, timeout=10).stdout.strip()
      dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "dlm"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
      out["git"] = (sha + ("+dirty" if dirty else "")) if sha else None
    except (OSError, subprocess.SubprocessError):
      out["git"] = None
  return out


def model_record(model: Any, path: str | None = None) -> dict[str, Any]:
  leaves = jax.tree.leaves(model.params)
  dtypes = sorted({str(np.dtype(x.dtype)) for x in leaves})
  cfg = model.model_cfg
  hf = model.config.get("hf", {}) if hasattr(model.config, "get") else {}
  return {"path": path, "step": int(model.step), "weights": model.weights,
          "family": (hf.get("family") if hasattr(hf, "get") else None) or "dlm",
          "mask_kind": cfg.mask_kind, "parameters": int(sum(x.size for x in leaves)),
          "vocab_size": int(cfg.vocab_size)}, {"params": dtypes, "compute": cfg.dtype}


def record(model: Any, *, sampler: str | None = None, knobs: dict[str, Any] | None = None,
           seed: int | None = None, path: str | None = None,
           extra: dict[str, Any] | None = None) -> dict[str, Any]:
  """The provenance of one evaluation, JSON-ready."""
  info, precision = model_record(model, path)
  if sampler is not None:
    precision["sampling_noise"] = GUMBEL_NOISE if not (knobs or {}).get("gumbel_bits") or int(
        knobs["gumbel_bits"]) == 64 else "gumbel from a float32 uniform (tail ~15.9)"
  out = {"model": info, "sampler": sampler, "knobs": knobs, "seed": seed, "precision": precision,
         "code": code_version(), "backend": jax.default_backend(),
         "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  out.update(extra or {})
  return out
