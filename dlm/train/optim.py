"""Optax chains from the config: AdamW, warmup-cosine learning rate, global-norm clipping."""

from __future__ import annotations

from typing import Any

import jax
import optax


def learning_rate(optim_cfg: Any, total_steps: int) -> optax.Schedule:
  """Linear warmup to ``lr`` then cosine decay to ``lr * final_lr_frac`` at ``total_steps``."""
  warmup = int(optim_cfg.warmup_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=float(optim_cfg.lr), warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=float(optim_cfg.lr) * float(optim_cfg.final_lr_frac))


def _decay_mask(params: Any) -> Any:
  # Weight decay on matrices only: not on norm gains or biases.
  return jax.tree.map(lambda p: p.ndim >= 2 and p.size > p.shape[0], params)


def make_optimizer(optim_cfg: Any, total_steps: int) -> optax.GradientTransformation:
  if optim_cfg.name != "adamw":
    raise ValueError(f"config.optim.name {optim_cfg.name!r} unknown; use 'adamw'")
  return optax.chain(
      optax.clip_by_global_norm(float(optim_cfg.clip_norm)),
      optax.adamw(learning_rate(optim_cfg, total_steps), b1=float(optim_cfg.b1),
                  b2=float(optim_cfg.b2), eps=float(optim_cfg.eps),
                  weight_decay=float(optim_cfg.weight_decay), mask=_decay_mask),
  )
