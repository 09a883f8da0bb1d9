"""train_step: pure functions, jitted with explicit shardings over the mesh."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dlm import parallel
from dlm.models import lora
from dlm.train.state import TrainState

Metrics = dict[str, jax.Array]


def train_step(state: TrainState, batch: dict[str, jax.Array], frozen: Any = None, *,
               loss_fn: Callable[..., Any], tx: optax.GradientTransformation,
               lr_fn: optax.Schedule, microbatches: int = 1,
               ema_decay: float = 0.0) -> tuple[TrainState, Metrics]:
  """One AdamW update on the loss gradient, accumulated over ``microbatches``; EMA of the params.

  The step's randomness is fold_in(state.rng, step).  An update whose loss or
  gradient is not finite is skipped (params, optimizer and EMA unchanged) and
  counted in ``nonfinite_total`` / ``nonfinite_streak``.  ``frozen``: parameters the loss
  reads but the step never updates (a LoRA model's base; ``state.params`` its adapters).
  """
  if frozen is not None:
    inner = loss_fn
    loss_fn = lambda p, b, r: inner(lora.combine(frozen, p), b, r)
  rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
  batch = dict(batch, step=state.step)  # what a step-dependent model reads (annealed attention)
  loss, metrics, grads = accumulate_gradients(loss_fn, state.params, batch, rng, microbatches)
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = None
  if state.ema_params is not None:
    ema = ema_update(state.ema_params, params, ema_decay, state.step)

  def keep_if_finite(new: Any, old: Any) -> Any:
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

  streak = jnp.where(finite, 0, state.nonfinite_streak + 1).astype(jnp.int32)
  new_state = state.replace(
      step=state.step + 1, params=keep_if_finite(params, state.params),
      opt_state=keep_if_finite(opt_state, state.opt_state),
      ema_params=keep_if_finite(ema, state.ema_params),
      nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
      nonfinite_streak=streak)
  metrics = dict(metrics, loss=loss, grad_norm=grad_norm, lr=lr_fn(state.step),
                 update_skipped=(~finite).astype(jnp.float32),
                 nonfinite_total=new_state.nonfinite_total, nonfinite_streak=streak)
  return new_state, metrics


def accumulate_gradients(loss_fn: Callable[..., Any], params: Any, batch: dict[str, jax.Array],
                         rng: jax.Array, microbatches: int) -> tuple[jax.Array, Metrics, Any]:
  """(loss, metrics, grads) of the whole batch, computed ``microbatches`` rows-groups at a time.

  Microbatch j holds rows j, j + k, j + 2k, ... (k = microbatches), so each
  device keeps its own rows; each row keeps its index in the whole batch
  (``row_ids``), from which the losses draw its randomness.  Gradients are
  weighted by each microbatch's ``num_tokens``: the result equals the
  whole-batch gradient of total nats / total tokens, up to float rounding.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if microbatches == 1:
    (loss, metrics), grads = grad_fn(params, batch, rng)
    return loss, metrics, grads
  b = batch["tokens"].shape[0]
  if b % microbatches:
    raise ValueError(f"batch of {b} rows does not split into train.microbatches={microbatches}")
  mb = b // microbatches

  def split(x: jax.Array) -> jax.Array:  # [B, ...] -> [k, B/k, ...], row i*k + j -> [j, i]
    x = jnp.swapaxes(x.reshape((mb, microbatches) + x.shape[1:]), 0, 1)
    return parallel.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))

  micro = {k: split(v) for k, v in batch.items() if jnp.ndim(v)}
  micro["row_ids"] = split(jnp.arange(b, dtype=jnp.int32))
  shared = {k: v for k, v in batch.items() if not jnp.ndim(v)}  # scalars: every microbatch's
  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)

  def body(carry: Any, mbatch: dict[str, jax.Array]) -> tuple[Any, Metrics]:
    g_sum, loss_sum, w_sum = carry
    (loss, metrics), grads = grad_fn(params, dict(mbatch, num_rows=jnp.int32(b), **shared), rng)
    w = jnp.asarray(metrics.get("num_tokens", 1.0), jnp.float32)
    g_sum = jax.tree.map(lambda a, g: a + w * g.astype(jnp.float32), g_sum, grads)
    return (g_sum, loss_sum + w * loss, w_sum + w), metrics

  (g_sum, loss_sum, w_sum), per_micro = jax.lax.scan(
      body, (zeros, jnp.float32(0.0), jnp.float32(0.0)), micro)
  w_sum = jnp.maximum(w_sum, 1e-9)
  grads = jax.tree.map(lambda g, p: (g / w_sum).astype(p.dtype), g_sum, params)
  metrics = {k: jnp.sum(v) if k.endswith("_sum") or k == "num_tokens" else jnp.mean(v)
             for k, v in per_micro.items()}
  loss = loss_sum / w_sum
  return loss, dict(metrics, loss=loss), grads


def ema_update(ema: Any, params: Any, decay: float, step: jax.Array) -> Any:
  """Polyak average, decay warmed up as min(decay, (1 + s) / (10 + s)) (TF ExponentialMovingAverage)."""
  s = step.astype(jnp.float32)
  d = jnp.minimum(jnp.float32(decay), (1.0 + s) / (10.0 + s))
  return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)


def jit_train_step(mesh: Mesh, rules: parallel.Rules, shardings: TrainState, *,
                   batch_keys: tuple[str, ...] = ("tokens",), frozen_shardings: Any = None,
                   **kw: Any):
  """The train step jitted with the state's shardings, [batch, length] batches, donated state;
  with ``frozen_shardings`` it takes the frozen parameters third (``train_step``)."""
  batch_sh = {k: parallel.batch_sharding(mesh, rules) for k in batch_keys}
  fn = parallel.traced_in_mesh(functools.partial(train_step, **kw), mesh, rules)
  extra = () if frozen_shardings is None else (frozen_shardings,)
  return jax.jit(fn, in_shardings=(shardings, batch_sh) + extra,
                 out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=(0,))


def jit_all_finite(shardings: Any):
  """tree -> bool []: every float leaf finite (checked before a state is saved)."""

  def all_finite(tree: Any) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)

  return jax.jit(all_finite, in_shardings=(shardings,))


