"""train_step / eval_step: pure functions, jitted with explicit shardings over the mesh."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dlm import losses, parallel
from dlm.train.state import TrainState

Metrics = dict[str, jax.Array]


def train_step(state: TrainState, batch: dict[str, jax.Array], *, loss_fn: Callable[..., Any],
               tx: optax.GradientTransformation, lr_fn: optax.Schedule,
               base_rng: jax.Array) -> tuple[TrainState, Metrics]:
  """One AdamW update on the loss; the step's randomness is fold_in(base_rng, step)."""
  rng = jax.random.fold_in(base_rng, state.step)
  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch, rng)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(metrics, loss=loss, grad_norm=optax.global_norm(grads), lr=lr_fn(state.step))
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: dict[str, jax.Array], t: jax.Array, rng: jax.Array, *,
              model: Callable[..., jax.Array], process: Any) -> Metrics:
  """Negative ELBO (nats) summed over the batch at given times t [B], and the token count."""
  x0 = batch["tokens"]
  loss_mask = batch["loss_mask"]
  x_t = process.corrupt(rng, x0, t)
  logits = model(params, x_t, t, **losses.denoiser_kwargs(batch))
  nelbo = process.nelbo(logits, x0, x_t, t, loss_mask=loss_mask)  # [B]
  return {"nelbo_sum": jnp.sum(nelbo), "num_tokens": jnp.sum(loss_mask)}


def traced_in_mesh(fn: Callable[..., Any], mesh: Mesh, rules: parallel.Rules) -> Callable[..., Any]:
  """Activations' logical constraints resolve against this mesh when ``fn`` is traced."""

  @functools.wraps(fn)
  def wrapped(*args: Any) -> Any:
    with parallel.use_mesh(mesh, rules):
      return fn(*args)

  return wrapped


def jit_train_step(mesh: Mesh, rules: parallel.Rules, shardings: TrainState, *,
                   batch_keys: tuple[str, ...] = ("tokens",), **kw: Any):
  """The train step jitted with the state's shardings, [batch, length] batches, donated state."""
  batch_sh = {k: parallel.batch_sharding(mesh, rules) for k in batch_keys}
  fn = traced_in_mesh(functools.partial(train_step, **kw), mesh, rules)
  return jax.jit(fn, in_shardings=(shardings, batch_sh),
                 out_shardings=(shardings, NamedSharding(mesh, P())), donate_argnums=(0,))


def jit_eval_step(mesh: Mesh, rules: parallel.Rules, param_shardings: Any, *,
                  batch_keys: tuple[str, ...] = ("tokens", "loss_mask"), **kw: Any):
  row = parallel.batch_sharding(mesh, rules)
  batch_sh = {k: row for k in batch_keys}
  t_sh = NamedSharding(mesh, parallel.logical_to_spec(("batch",), rules, mesh))
  fn = traced_in_mesh(functools.partial(eval_step, **kw), mesh, rules)
  return jax.jit(fn, in_shardings=(param_shardings, batch_sh, t_sh, NamedSharding(mesh, P())),
                 out_shardings=NamedSharding(mesh, P()))
