"""LoRA (Hu et al. 2022, eq. 3): h = x W + (alpha / r) (x A) B, W frozen, A [in, r], B [r, out].

``config.lora`` = {rank, alpha, targets}: each target kernel (``TARGETS``) of every layer gets
``{name}_lora_a`` (fan-in normal) and ``{name}_lora_b`` (zeros: the adapted model starts as the
base), stored next to it in the one parameter tree.  Training optimizes and checkpoints only
the adapters (``split``), the base stays frozen outside the optimizer; samplers run the
adapters unmerged (``layers``: the low-rank path beside each kernel) or merged in the decode
layout's kernels (``decode.layout``); ``merge`` folds them into the kernels for export.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dlm.errors import UserError

TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_out")
SUFFIXES = ("_lora_a", "_lora_b")


def settings(config: Any) -> dict[str, Any]:
  """ModelConfig fields of ``config.lora`` (none when absent or rank 0), checked."""
  lc = config.get("lora") if hasattr(config, "get") else None
  rank = int((lc or {}).get("rank", 0) or 0)
  if not rank:
    return {}
  if rank < 0:
    raise UserError(f"lora.rank={rank} must be >= 1 (0 turns LoRA off)")
  targets = lc.get("targets", TARGETS)
  targets = tuple(targets.split(",") if isinstance(targets, str) else targets)
  unknown = [t for t in targets if t not in TARGETS]
  if unknown or not targets:
    raise UserError(f"lora.targets names {unknown or 'nothing'}: no such parameter; the"
                    f" projections are {', '.join(TARGETS)}")
  alpha = float(lc.get("alpha", 0) or 0) or float(rank)
  return {"lora_rank": rank, "lora_alpha": alpha, "lora_targets": targets}


def is_adapter(key: str) -> bool:
  return key.endswith(SUFFIXES)


def split(params: dict) -> tuple[dict, dict]:
  """(base, adapters): the same nesting, each leaf in exactly one of them."""
  base, adapters = {}, {}
  for k, v in params.items():
    if isinstance(v, dict):
      b, a = split(v)
      if b:
        base[k] = b
      if a:
        adapters[k] = a
    elif is_adapter(str(k)):
      adapters[k] = v
    else:
      base[k] = v
  return base, adapters


def combine(base: dict, adapters: dict) -> dict:
  """The whole tree of ``split``'s two parts."""
  out = dict(base)
  for k, v in adapters.items():
    out[k] = combine(out.get(k, {}), v) if isinstance(v, dict) else v
  return out


def delta(a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
  """scale * A B with A [*in, r], B [r, *out]: the kernel's low-rank update [*in, *out]."""
  return scale * jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)


def merge_group(group: dict, scale: float) -> dict:
  """One module's parameters with each adapter pair folded into its kernel (W + s A B)."""
  out = {k: v for k, v in group.items() if not is_adapter(str(k))}
  for name in list(out):
    a, b = group.get(f"{name}_lora_a"), group.get(f"{name}_lora_b")
    if a is not None and b is not None:
      w = out[name]
      if w.ndim == a.ndim + b.ndim - 3:  # a leading layers axis on all three (stacked blocks)
        d = jax.vmap(lambda a_, b_: delta(a_, b_, scale))(a, b)
      else:
        d = delta(a, b, scale)
      out[name] = (w.astype(jnp.float32) + d).astype(w.dtype)
  return out


def merge(params: dict, scale: float) -> dict:
  """The tree with every adapter folded into its kernel and removed (for export)."""
  out = {}
  for k, v in params.items():
    if isinstance(v, dict):
      has = any(is_adapter(str(x)) for x in v)
      out[k] = merge_group(v, scale) if has else merge(v, scale)
    elif not is_adapter(str(k)):
      out[k] = v
  return out
