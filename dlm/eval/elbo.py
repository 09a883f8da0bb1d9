"""Validation negative ELBO as bits per byte and as a perplexity bound.

bits/byte = sum of per-sequence NELBO (nats) / (ln 2 * UTF-8 bytes of the same
tokens), comparable across tokenizers; ppl_bound = exp(NELBO nats per token) is
an upper bound on the model's perplexity (the NELBO bounds -log p).  Times come
from a fixed, seeded stratified grid, so numbers are comparable across runs.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dlm import losses, parallel, processes
from dlm.data import pipeline


def stratified_eval_times(num_rows: int, num_passes: int, seed: int) -> np.ndarray:
  """t[k, i] = (perm_k(i) + 0.5) / N: every pass covers [0, 1] with one row per stratum."""
  rng = np.random.default_rng(seed)
  return np.stack([(rng.permutation(num_rows) + 0.5) / num_rows for _ in range(num_passes)]
                  ).astype(np.float32)  # [K, N]


def nelbo_bits_per_byte(nelbo_nats: float, num_tokens: float, num_bytes: float) -> dict[str, float]:
  return {
      "nelbo_per_token": nelbo_nats / num_tokens,
      "bits_per_byte": nelbo_nats / (math.log(2.0) * num_bytes),
      "ppl_bound": math.exp(nelbo_nats / num_tokens),
  }


def evaluate(eval_fn: Callable[..., dict[str, jax.Array]], params: Any, rows: np.ndarray, *,
             batch_size: int, piece_bytes: np.ndarray, num_passes: int = 1, seed: int = 0,
             put: Callable[[dict[str, np.ndarray]], Any] | None = None,
             progress: Callable[[int], None] | None = None) -> dict[str, float]:
  """Runs ``eval_fn(params, batch, t, rng)`` over all rows ``num_passes`` times.

  ``rows``: int32 [N, L], or a dict of [N, L] arrays with "tokens" (and "loss_mask": only
  counted tokens are scored and their bytes counted).
  """
  tokens_all = rows["tokens"] if isinstance(rows, dict) else rows
  n = tokens_all.shape[0]
  times = stratified_eval_times(n, num_passes, seed)  # [K, N]
  times = np.pad(times, ((0, 0), (0, -n % batch_size)), constant_values=0.5)  # padding rows
  base = jax.random.key(seed)
  nelbo, tokens = 0.0, 0.0
  num_batches = pipeline.num_eval_batches(n, batch_size=batch_size)
  for k in range(num_passes):
    for b, batch in enumerate(pipeline.eval_batches(rows, batch_size=batch_size)):
      t = times[k, b * batch_size:(b + 1) * batch_size]
      if put is not None:
        batch, t = put(batch), put({"t": t})["t"]
      out = eval_fn(params, batch, t, jax.random.fold_in(base, k * num_batches + b))
      nelbo += float(out["nelbo_sum"])
      tokens += float(out["num_tokens"])
      if progress is not None:
        progress(1)
  counted = rows.get("loss_mask") if isinstance(rows, dict) else None
  row_bytes = piece_bytes[tokens_all]
  num_bytes = float((row_bytes if counted is None else row_bytes * (counted > 0)).sum()) * num_passes
  result = nelbo_bits_per_byte(nelbo, tokens, num_bytes)
  result.update(num_tokens=tokens / num_passes, num_bytes=num_bytes / num_passes,
                num_passes=num_passes)
  return result


def eval_step(params: Any, batch: dict[str, jax.Array], t: jax.Array, rng: jax.Array, *,
              model: Callable[..., jax.Array], process: Any,
              bd3_block_size: int = 0) -> dict[str, jax.Array]:
  """Negative ELBO (nats) summed over the batch at given times t [B], and the token count.

  ``bd3_block_size`` > 0 (a ``mask_kind="bd3"`` model): BD3-LM's block NELBO with every
  block of a row at its time t (each term's t is still U(0, 1): the same expectation).
  """
  x0 = batch["tokens"]
  loss_mask = batch["loss_mask"]
  process = processes.bind(process, params)
  x_t = losses.keep_clean(process, process.corrupt(rng, x0, t), x0, loss_mask)
  if bd3_block_size:
    t_blocks = jnp.broadcast_to(t[:, None], (x0.shape[0], x0.shape[1] // bd3_block_size))
    nelbo = losses.bd3_block_nelbo(model, params, process, x0, x_t, t_blocks, bd3_block_size,
                                   loss_mask, **losses.denoiser_kwargs(batch))
    return {"nelbo_sum": jnp.sum(nelbo), "num_tokens": jnp.sum(loss_mask)}
  logits = losses.predict(model, params, process, x_t, t, **losses.denoiser_kwargs(batch))
  nelbo = process.nelbo(logits, x0, x_t, t, loss_mask=loss_mask)  # [B]
  return {"nelbo_sum": jnp.sum(nelbo), "num_tokens": jnp.sum(loss_mask)}


def jit_eval_step(mesh: Mesh, rules: parallel.Rules, param_shardings: Any, *,
                  batch_keys: tuple[str, ...] = ("tokens", "loss_mask"), **kw: Any):
  row = parallel.batch_sharding(mesh, rules)
  batch_sh = {k: row for k in batch_keys}
  t_sh = NamedSharding(mesh, parallel.logical_to_spec(("batch",), rules, mesh))
  fn = parallel.traced_in_mesh(functools.partial(eval_step, **kw), mesh, rules)
  return jax.jit(fn, in_shardings=(param_shardings, batch_sh, t_sh, NamedSharding(mesh, P())),
                 out_shardings=NamedSharding(mesh, P()))
