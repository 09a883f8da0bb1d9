"""Helpers shared by the diffusion processes and losses: time sampling etc.

Times are float32 in [T_MIN, 1]. t = 0 is excluded because continuous-time
ELBO weights divide by 1 - alpha(t) (masked) and schedules with eps = 0 have
alpha(0) = 1; clipping (rather than resampling) keeps the estimator's bias
below T_MIN * (integrand near 0), i.e. negligible.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

Array = jnp.ndarray

T_MIN = 1e-6  # smallest time handed to a process (see module docstring)
TINY = 1e-30  # floor for denominators / probabilities that may be exactly 0
NEG_INF = -1e9  # finite "minus infinity" for logits (no NaN in softmax / grads)


def sample_times(rng: chex.PRNGKey, batch_size: int, *, antithetic: bool = True,
                 row_ids: Array | None = None, num_rows: int | Array | None = None) -> Array:
  """Per-sequence times [B] in [T_MIN, 1].

  antithetic=True is MD4's sampler (Shi et al. 2024; the low-discrepancy
  sampler of VDM, Kingma et al. 2021): t_i = (u + i/N) mod 1 with one
  u ~ U(0, 1), so a batch of N rows has exactly one time in each bin
  [k/N, (k+1)/N).  Otherwise t_i are iid U(0, 1), drawn per row from
  fold_in(rng, i).  ``row_ids`` (default 0..B-1) are the rows' indices in the
  step's whole batch of ``num_rows`` (default B): a microbatch given its rows'
  ids draws exactly the times the whole batch would give them.
  """
  ids, n = row_index(batch_size, row_ids, num_rows)
  if antithetic:
    u = jax.random.uniform(rng, (), jnp.float32)
    t = jnp.mod(u + ids.astype(jnp.float32) / n, 1.0)
  else:
    t = row_uniform(rng, ids, ())
  return jnp.clip(t, T_MIN, 1.0)


def row_index(batch_size: int, row_ids: Array | None = None,
              num_rows: int | Array | None = None) -> tuple[Array, Array]:
  """(row ids int32 [B], rows in the whole batch float32 []) with defaults 0..B-1 and B."""
  ids = jnp.arange(batch_size, dtype=jnp.int32) if row_ids is None else jnp.asarray(row_ids)
  chex.assert_shape(ids, (batch_size,))
  n = jnp.asarray(batch_size if num_rows is None else num_rows, jnp.float32)
  return ids, n


def batch_rows(batch: dict[str, Array]) -> tuple[Array, Array]:
  """The batch's row ids and whole-batch row count (set by gradient accumulation)."""
  return row_index(batch["tokens"].shape[0], batch.get("row_ids"), batch.get("num_rows"))


def row_uniform(rng: chex.PRNGKey, row_ids: Array, shape: tuple[int, ...]) -> Array:
  """U(0, 1) draws [B, *shape], row i's from fold_in(rng, row_ids[i]): independent of batching."""
  return jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(rng, i), shape,
                                               jnp.float32))(row_ids)


def corrupt_rows(process, rng: chex.PRNGKey, row_ids: Array, x0: Array, t: Array) -> Array:
  """process.corrupt with row i's noise from fold_in(rng, row_ids[i]): x_t [B, L]."""
  keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(row_ids)
  return jax.vmap(lambda k, x, ti: process.corrupt(k, x[None], ti[None])[0])(keys, x0, t)


def keep_clean(x_t: Array, x0: Array, loss_mask: Array | None) -> Array:
  """x_t where a position counts, x0 where it does not: an uncounted position is conditioning
  (an SFT prompt, LLaDA sec. 2.3: "the prompt stays unmasked"), never corrupted."""
  if loss_mask is None:
    return x_t
  chex.assert_equal_shape([x_t, x0, loss_mask])
  return jnp.where(loss_mask > 0, x_t, x0)


def bcast_time(x: Array, ndim: int) -> Array:
  """[B] -> [B, 1, ..., 1] (or [B, L] -> [B, L, 1, ...]) with `ndim` dims total, for
  broadcasting per-row or per-position times over positions and the vocabulary."""
  return jnp.reshape(x, x.shape + (1,) * (ndim - x.ndim))


def safe_div(num: Array, den: Array) -> Array:
  """num / den with den floored at TINY (den >= 0 by construction)."""
  return num / jnp.maximum(den, TINY)


def loss_mask_or_ones(loss_mask: Array | None, x0: Array) -> Array:
  """float32 [B, L] mask of positions that count (all ones if None)."""
  if loss_mask is None:
    return jnp.ones(x0.shape, jnp.float32)
  chex.assert_equal_shape([loss_mask, x0])
  return jnp.asarray(loss_mask, jnp.float32)


def check_tokens_and_times(x: Array, t: Array) -> None:
  """Asserts x int [B, L] and t float [B] (one time per row) or [B, L] (one per position)."""
  chex.assert_rank(x, 2)
  chex.assert_rank(t, {1, 2})
  chex.assert_type([x, t], [int, float])
  chex.assert_equal_shape_prefix([x, t], t.ndim)


def check_logits(logits: Array, x: Array, vocab_size: int) -> None:
  """Asserts logits [B, L, V] aligned with tokens x [B, L]."""
  chex.assert_rank(logits, 3)
  chex.assert_equal_shape_prefix([logits, x], 2)
  chex.assert_axis_dimension(logits, 2, vocab_size)


def nll_at(logits: Array, x0: Array, exclude: int | None = None) -> Array:
  """-log softmax(logits)[x0] per position, [B, L, V], [B, L] -> [B, L] float32, as
  logsumexp(logits) - logits[x0]: one reduction over V, no [B, L, V] log-probabilities kept
  for the backward (its gradient is softmax - onehot).  ``exclude``: a column left out of the
  softmax (the mask token's, MDLM's zero-masking); x0 is never that column."""
  logits = logits.astype(jnp.float32)
  target = gather_last(logits, x0)
  if exclude is not None:
    logits = jnp.where(jnp.arange(logits.shape[-1]) == exclude, -jnp.inf, logits)
  return jax.nn.logsumexp(logits, axis=-1) - target


def gather_last(x: Array, idx: Array) -> Array:
  """x[..., idx] per position: [B, L, V], [B, L] -> [B, L]."""
  return jnp.take_along_axis(x, idx[..., None], axis=-1)[..., 0]
