"""Training losses: Monte Carlo estimators of a process's NELBO.

A loss is

  loss_fn(params, batch, rng, *, model, process, config) -> (scalar, metrics)

with model(params, x_t, t, **kw) -> (logits float32 [B, L, V], cache) (the denoiser
contract, ``dlm/models/transformer.py``; ``denoiser_kwargs`` gives kw), batch = {"tokens":
int32 [B, L], optional "loss_mask": [B, L], optional "row_ids" [B] and
"num_rows" [] (the rows' place in the step's whole batch when gradients
accumulate over microbatches: draw each row's randomness from them, as
``common.sample_times`` / ``row_uniform`` / ``corrupt_rows`` do, and a
microbatch gets exactly the loss terms of the whole batch) and config the `config.loss`
sub-config (`antithetic: bool`, `num_steps: int`).  A position with loss_mask 0 is
conditioning: it is never corrupted (``common.keep_clean``; an SFT prompt), only counted
positions are noised and scored.  The scalar is the NELBO in
nats per counted token (total nats / counted tokens), which is what the
optimizer minimizes; metrics hold "loss" (the same scalar), "nelbo_sum" (nats
summed over the batch) and "num_tokens" (counted positions, float; the weight
of a microbatch when gradients accumulate). Configs
name a loss by registry name or "module:function".
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp

from dlm import processes
from dlm.errors import UserError
from dlm.processes import common
from dlm.processes.base import Process, check_takes
from dlm.registry import Registry

Array = jnp.ndarray
Metrics = dict[str, Array]
LossFn = Callable[..., tuple[Array, Metrics]]

LOSSES: Registry[LossFn] = Registry("loss")


def get_loss(name: str) -> LossFn:
  """Registered name ("nelbo", "discrete_nelbo") or "module:function"."""
  return LOSSES.get(name)


def takes(*kinds: str, params: tuple[str, ...] = ("x0",)) -> Callable[[LossFn], LossFn]:
  """Declares the process kinds (``dlm.processes.base.KINDS``) and parameterizations a loss
  takes; a loss without the declaration (a user's ``module:function``) is given any process."""
  def deco(fn: LossFn) -> LossFn:
    fn.kinds = tuple(kinds)  # type: ignore[attr-defined]
    fn.params = tuple(params)  # type: ignore[attr-defined]
    return fn
  return deco


def check_process(name: str, process: Process, fn: LossFn | None = None) -> None:
  """One line naming both when loss ``name`` cannot take ``process`` (checked before training)."""
  if fn is None and name in LOSSES.names():
    fn = LOSSES.get(name)
  check_takes("loss", name, getattr(fn, "kinds", None), process,
              "pick a loss that takes it (nelbo takes every discrete kind)",
              params=getattr(fn, "params", None))


def _cfg_get(config: Any, key: str, default: Any) -> Any:
  if config is None:
    return default
  if hasattr(config, "get"):
    return config.get(key, default)
  return getattr(config, key, default)


def _tokens_and_mask(batch: dict[str, Array]) -> tuple[Array, Array]:
  x0 = batch["tokens"]
  chex.assert_rank(x0, 2)
  chex.assert_type(x0, int)
  return x0, common.loss_mask_or_ones(batch.get("loss_mask"), x0)


def _rows_and_times(batch: dict[str, Array], rng: chex.PRNGKey, config: Any,
                    keys: int = 1) -> tuple[Array, Array, Array, Array, list[chex.PRNGKey]]:
  """(x0, loss_mask, row ids, u [B] ~ U(0, 1] per row, ``keys`` more keys) of a time-sampled
  loss: rng splits into u's key and the rest; u is stratified over the whole batch when
  ``config.antithetic`` (``common.sample_times``)."""
  x0, loss_mask = _tokens_and_mask(batch)
  rng_t, *rest = jax.random.split(rng, 1 + keys)
  ids, n_rows = common.batch_rows(batch)
  u = common.sample_times(rng_t, x0.shape[0], row_ids=ids, num_rows=n_rows,
                          antithetic=bool(_cfg_get(config, "antithetic", True)))
  return x0, loss_mask, ids, u, rest


def _per_token(nelbo_per_seq: Array, loss_mask: Array) -> tuple[Array, Metrics]:
  """[B] nats -> (nats per counted token, metrics)."""
  nelbo_sum = jnp.sum(nelbo_per_seq)
  num_tokens = jnp.sum(loss_mask)
  loss = nelbo_sum / jnp.maximum(num_tokens, 1.0)
  return loss, {"loss": loss, "nelbo_sum": nelbo_sum, "num_tokens": num_tokens}


def denoiser_kwargs(batch: dict[str, Array]) -> dict[str, Array]:
  """Packed-row structure the denoiser needs: segment ids and in-document positions; and the
  training step (``train_step`` adds it: an annealed attention mask follows it)."""
  return {k: batch[k] for k in ("segment_ids", "positions", "step") if k in batch}


def _logits(model: Callable[..., Array], params: Any, x_t: Array,
            t: Array, vocab_size: int, **kw: Array) -> Array:
  """The denoiser's logits f32 [B, L, V] at x_t: token ids [B, L], or continuous states
  [B, L, D] (embedding diffusion), given as ``inputs_embeds``."""
  if jnp.issubdtype(x_t.dtype, jnp.floating):
    logits, _ = model(params, None, t, inputs_embeds=x_t, **kw)
  else:
    logits, _ = model(params, x_t, t, **kw)
  common.check_logits(logits, x_t[..., 0] if x_t.ndim == 3 else x_t, vocab_size)
  return logits.astype(jnp.float32)


def predict(model: Callable[..., Any], params: Any, process: Process, x_t: Array, t: Array,
            rng: chex.PRNGKey | None = None, **kw: Array) -> Array:
  """The denoiser's logits at x_t; for a process with ``self_condition`` (CDCD, Plaid; Chen et
  al. 2023, Analog Bits, sec. 3.2) two passes, the second given the first's x0 probabilities
  (no gradient through them); in training (``rng``) half the rows get zeros instead, as at the
  first step of sampling."""
  if not getattr(process, "self_condition", False):
    return _logits(model, params, x_t, t, process.vocab_size, **kw)
  first = jax.lax.stop_gradient(_logits(model, params, x_t, t, process.vocab_size, **kw))
  probs = jax.nn.softmax(first, axis=-1)
  if rng is not None:
    use = jax.random.bernoulli(rng, 0.5, (probs.shape[0], 1, 1))
    probs = jnp.where(use, probs, 0.0)
  return _logits(model, params, x_t, t, process.vocab_size, self_cond=probs, **kw)


def self_cond_key(rng: chex.PRNGKey) -> chex.PRNGKey:
  """The self-conditioning coins' key: apart from split(rng)'s keys, so adding
  self-conditioning leaves every other draw of a loss as it was."""
  return jax.random.fold_in(rng, 0x5C)


def corrupt(process: Process, rng: chex.PRNGKey, row_ids: Array, x0: Array, t: Array,
            loss_mask: Array | None) -> Array:
  """x_t of every row (row i's noise from fold_in(rng, row_ids[i])), uncounted positions clean:
  token ids [B, L], or for an embedding process states [B, L, D] (clean: ``process.clean``)."""
  return keep_clean(process, common.corrupt_rows(process, rng, row_ids, x0, t), x0, loss_mask)


def keep_clean(process: Process, x_t: Array, x0: Array, loss_mask: Array | None) -> Array:
  """``common.keep_clean`` for token ids and for continuous states [B, L, D] (whose clean
  value is ``process.clean(x0)``)."""
  if x_t.ndim == x0.ndim + 1:  # continuous states
    if loss_mask is None:
      return x_t
    return jnp.where(loss_mask[..., None] > 0, x_t, process.clean(x0).astype(x_t.dtype))
  return common.keep_clean(x_t, x0, loss_mask)


@LOSSES.register("nelbo")
@takes("absorbing", "uniform", "general", "gaussian", "identity", params=("x0", "score"))
def nelbo_loss(params: Any, batch: dict[str, Array], rng: chex.PRNGKey, *,
               model: Callable[..., Array], process: Process,
               config: Any) -> tuple[Array, Metrics]:
  """Continuous-time NELBO, t ~ U(0,1] per sequence (MD4 eq. 4 / MDLM eq. 10; CTMC ELBO; for
  score-parameterized processes SEDD's DWDSE, Lou et al. 2024 eq. 8): ``process.nelbo``."""
  x0, loss_mask, ids, t, (rng_x,) = _rows_and_times(batch, rng, config)
  process = processes.bind(process, params)
  x_t = corrupt(process, rng_x, ids, x0, t, loss_mask)
  logits = predict(model, params, process, x_t, t, self_cond_key(rng),
                   **denoiser_kwargs(batch))
  return _per_token(process.nelbo(logits, x0, x_t, t, loss_mask), loss_mask)


@LOSSES.register("hybrid")
@takes("absorbing", "uniform", "general")
def hybrid_loss(params: Any, batch: dict[str, Array], rng: chex.PRNGKey, *,
                model: Callable[..., Array], process: Process,
                config: Any) -> tuple[Array, Metrics]:
  """D3PM's hybrid loss (Austin+ 2021, eq. 5): L_vb + lambda E[-log p(x0 | x_t)], per counted
  token; ``config.loss.hybrid_coeff`` is lambda (D3PM's name; 0.001 its default).  L_vb is the
  process's NELBO at t ~ U(0, 1] (``nelbo``); the metrics' nelbo_sum is L_vb alone."""
  coeff = float(_cfg_get(config, "hybrid_coeff", 0.001))
  x0, loss_mask, ids, t, (rng_x,) = _rows_and_times(batch, rng, config)
  process = processes.bind(process, params)
  x_t = corrupt(process, rng_x, ids, x0, t, loss_mask)
  logits = _logits(model, params, x_t, t, process.vocab_size, **denoiser_kwargs(batch))
  nelbo, metrics = _per_token(process.nelbo(logits, x0, x_t, t, loss_mask), loss_mask)
  absorbing = type(process).kind == "absorbing"
  ce = common.nll_at(logits, x0, exclude=process.mask_id if absorbing else None)
  ce = jnp.sum(ce * loss_mask) / jnp.maximum(jnp.sum(loss_mask), 1.0)
  loss = nelbo + coeff * ce
  return loss, dict(metrics, loss=loss, ce=ce)


@LOSSES.register("discrete_nelbo")
@takes("absorbing", "uniform", "general")
def discrete_nelbo_loss(params: Any, batch: dict[str, Array],
                        rng: chex.PRNGKey, *, model: Callable[..., Array],
                        process: Process,
                        config: Any) -> tuple[Array, Metrics]:
  """T-step NELBO as T * KL term at i ~ U{1..T}, t = i/T, s = (i-1)/T (D3PM eq. 1).

  i is drawn per sequence (stratified over the batch when config.antithetic).
  The prior and t = 0 reconstruction terms are omitted: they vanish for
  schedules with alpha(1) = 0 and alpha(0) = 1 (eps = 0), and are O(eps) else.
  """
  num_steps = int(_cfg_get(config, "num_steps", 0) or 0)
  if num_steps < 1:
    raise ValueError(
        f"discrete_nelbo needs config.loss.num_steps >= 1, got {num_steps}")
  x0, loss_mask, ids, u, (rng_x,) = _rows_and_times(batch, rng, config)
  i = jnp.clip(jnp.ceil(u * num_steps), 1, num_steps)  # [B] in {1..T}
  t, s = i / num_steps, (i - 1.0) / num_steps
  process = processes.bind(process, params)
  x_t = corrupt(process, rng_x, ids, x0, t, loss_mask)
  logits = _logits(model, params, x_t, t, process.vocab_size, **denoiser_kwargs(batch))
  per_seq = num_steps * process.discrete_nelbo(logits, x0, x_t, t, s, loss_mask)
  return _per_token(per_seq, loss_mask)


def rloo_surrogate(f1: Array, f2: Array, log_q1: Array, log_q2: Array) -> Array:
  """REINFORCE leave-one-out over two draws (Kool et al. 2019; GenMD4, Shi+ 2024, sec. 6) [B]:
  0.5 (f1 + f2) + 0.5 sg(f1 - f2) (d log q1 - d log q2), where d log q = log q - sg(log q) is 0
  in value, so the value is the NELBO estimate and the gradient adds each draw's score term with
  the other draw as its baseline."""
  box = lambda lq: lq - jax.lax.stop_gradient(lq)  # noqa: E731  (0, with the score's gradient)
  return 0.5 * (f1 + f2) + 0.5 * jax.lax.stop_gradient(f1 - f2) * (box(log_q1) - box(log_q2))


@LOSSES.register("genmd4")
@takes("absorbing")
def genmd4_loss(params: Any, batch: dict[str, Array], rng: chex.PRNGKey, *,
                model: Callable[..., Any], process: Process,
                config: Any) -> tuple[Array, Metrics]:
  """GenMD4's objective (Shi+ 2024, sec. 6): the NELBO at t ~ U(0, 1] for two draws of x_t,
  the learnable schedule's gradient through the draws by ``rloo_surrogate``.  The process must
  learn its schedule (``genmd4``: ``log_q`` and a bound ``power``)."""
  if not hasattr(process, "log_q"):
    raise UserError(f"loss 'genmd4' needs a process that learns its schedule (process 'genmd4'),"
                    f" not {type(process).__name__!r}")
  x0, loss_mask, ids, t, (rng_1, rng_2) = _rows_and_times(batch, rng, config, keys=2)
  process = processes.bind(process, params)
  f, log_q = [], []
  for key in (rng_1, rng_2):
    x_t = corrupt(process, key, ids, x0, t, loss_mask)
    logits = _logits(model, params, x_t, t, process.vocab_size, **denoiser_kwargs(batch))
    f.append(process.nelbo(logits, x0, x_t, t, loss_mask))
    log_q.append(process.log_q(x_t, x0, t, loss_mask))
  loss, metrics = _per_token(rloo_surrogate(f[0], f[1], log_q[0], log_q[1]), loss_mask)
  w = process.power()
  data = jnp.arange(process.vocab_size) != process.mask_id
  metrics.update(power_min=jnp.min(jnp.where(data, w, jnp.inf)),
                 power_max=jnp.max(jnp.where(data, w, -jnp.inf)),
                 power_mean=jnp.sum(jnp.where(data, w, 0.0)) / jnp.sum(data))
  return loss, metrics


@LOSSES.register("cdcd")
@takes("gaussian")
def cdcd_loss(params: Any, batch: dict[str, Array], rng: chex.PRNGKey, *,
              model: Callable[..., Any], process: Process,
              config: Any) -> tuple[Array, Metrics]:
  """CDCD's score-interpolation objective (Dieleman+ 2022, sec. 3 and 6.1): the cross-entropy
  -log p(x0 | z_t) per counted token, t drawn from the learned time warp (the process's
  ``time_warp`` bins; uniform without), plus the warp's fit to the cross-entropy curve.  Not a
  bound: ``dlm eval`` still reports the process's NELBO in bits per byte."""
  x0, loss_mask, ids, u, (rng_x,) = _rows_and_times(batch, rng, config)
  process = processes.bind(process, params)
  rng_sc = self_cond_key(rng)
  warp = bool(getattr(process, "time_warp", 0))
  t = jnp.clip(process.warp_sample(u), common.T_MIN, 1.0) if warp else u
  x_t = corrupt(process, rng_x, ids, x0, t, loss_mask)
  logits = predict(model, params, process, x_t, t, rng_sc, **denoiser_kwargs(batch))
  ce = jnp.sum(common.nll_at(logits, x0, exclude=process.mask_id) * loss_mask, -1)  # [B]
  loss, metrics = _per_token(ce, loss_mask)
  if warp:
    per_token = ce / jnp.maximum(jnp.sum(loss_mask, -1), 1.0)
    fit = jnp.mean(process.warp_fit(t, per_token))
    loss = loss + fit
    metrics.update(loss=loss, warp_fit=fit)
  return loss, metrics


@LOSSES.register("nelbo_count")
@takes("absorbing")
def count_nelbo_loss(params: Any, batch: dict[str, Array], rng: chex.PRNGKey, *,
                     model: Callable[..., Array], process: Process,
                     config: Any) -> tuple[Array, Metrics]:
  """Absorbing NELBO in any-order form: n ~ U{1..L}, mask n positions, (L/n) sum -log p (Ou et al. 2024, RADD).

  Same expectation as ``nelbo`` for a denoiser that ignores t, for every
  schedule: substituting u = alpha(t), int_0^1 Bin(n; L, 1-u) / (1-u) du = 1/n,
  so NELBO = sum_n (1/L) E[(L/n) sum_{masked} -log p(x0 | x_t) | n masked].  The
  1/t weight that makes the time-sampled estimator's variance diverge at small
  t is gone: every sequence weighs at most L/1 on one token, and n is
  stratified over the batch.  Only for absorbing (masked) processes; a
  time-conditioned denoiser is given t = n / L.
  """
  check_process("nelbo_count", process, count_nelbo_loss)
  if getattr(type(process), "per_token_schedule", False):
    raise UserError(f"loss 'nelbo_count' assumes one schedule for every token; process"
                    f" {type(process).__name__!r} masks each token on its own: use loss 'genmd4'"
                    f" or 'nelbo'")
  x0, loss_mask = _tokens_and_mask(batch)
  b = x0.shape[0]
  rng_n, rng_pos = jax.random.split(rng)
  length = jnp.sum(loss_mask, axis=-1)  # [B] counted positions per row
  ids, n_rows = common.batch_rows(batch)
  u = common.sample_times(rng_n, b, row_ids=ids, num_rows=n_rows,
                          antithetic=bool(_cfg_get(config, "antithetic", True)))
  n = jnp.clip(jnp.ceil(u * length), 1.0, jnp.maximum(length, 1.0))  # [B] in {1..L}
  uniform = common.row_uniform(rng_pos, ids, x0.shape[1:])
  scores = jnp.where(loss_mask > 0, uniform, 2.0)  # [B, L]
  ranks = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)  # a uniform random order
  masked = ranks < n[:, None]  # exactly n counted positions per row
  x_t = jnp.where(masked, process.mask_id, x0)
  t = n / jnp.maximum(length, 1.0)
  logits = _logits(model, params, x_t, t, process.vocab_size, **denoiser_kwargs(batch))
  nll = process.masked_nll(logits, x0)  # [B, L]: -log p(x0 | x_t) where x_t is masked
  per_seq = (length / n) * jnp.sum(jnp.where(masked, nll, 0.0), axis=-1)  # [B]
  return _per_token(jnp.where(length > 0, per_seq, 0.0), loss_mask)


def bd3_block_nelbo(model: Callable[..., Any], params: Any, process: Process, x0: Array,
                    x_t: Array, t: Array, block_size: int, loss_mask: Array | None = None,
                    **kw: Array) -> Array:
  """BD3-LM's NELBO per sequence, nats [B] (Arriola et al. 2025, eq. 8), one time per block:

    sum_b w(t_b) sum_{l in block b, masked} -log p(x0_l | x_t^b, x_0^{<b}),

  one vectorized pass over x_t (+) x_0 under the ``bd3`` mask (the model's
  ``mask_kind="bd3"``: positions 0..L-1 twice).  ``t`` [B, L / block_size].
  """
  b, length = x0.shape
  nb = length // block_size
  chex.assert_shape(t, (b, nb))
  chex.assert_equal_shape([x0, x_t])
  twice = lambda a: jnp.concatenate([a, a], axis=1)
  pos = kw.get("positions")
  call = {"positions": twice(pos) if pos is not None else jnp.broadcast_to(
      jnp.tile(jnp.arange(length, dtype=jnp.int32), 2), (b, 2 * length))}
  if kw.get("segment_ids") is not None:
    call["segment_ids"] = twice(kw["segment_ids"])
  logits, _ = model(params, jnp.concatenate([x_t, x0], axis=1), None, **call)
  logits = logits[:, :length].astype(jnp.float32)
  common.check_logits(logits, x0, process.vocab_size)
  rows = lambda a: a.reshape((b * nb, block_size) + a.shape[2:])
  mask = None if loss_mask is None else rows(loss_mask)
  per_block = process.nelbo(rows(logits), rows(x0), rows(x_t), t.reshape(-1), mask)
  return per_block.reshape(b, nb).sum(axis=1)


@LOSSES.register("bd3_nelbo")
@takes("absorbing")
def bd3_nelbo_loss(params: Any, batch: dict[str, Array], rng: chex.PRNGKey, *,
                   model: Callable[..., Any], process: Process,
                   config: Any) -> tuple[Array, Metrics]:
  """BD3-LM block diffusion (Arriola et al. 2025, eq. 8), t ~ U[beta, omega] per block (Sec. 4's
  clipped schedule; beta=0, omega=1 is the NELBO).  config.loss: block_size (= the model's),
  beta, omega, antithetic (stratified over every block of the batch)."""
  block_size = int(_cfg_get(config, "block_size", 0) or 0)
  beta, omega = float(_cfg_get(config, "beta", 0.0)), float(_cfg_get(config, "omega", 1.0))
  x0, loss_mask = _tokens_and_mask(batch)
  b, length = x0.shape
  if block_size < 1 or length % block_size:
    raise ValueError(f"bd3_nelbo: config.loss.block_size={block_size} must divide the sequence"
                     f" length {length}; pick a divisor of data.seq_len")
  if not 0.0 <= beta < omega <= 1.0:
    raise ValueError(f"bd3_nelbo: need 0 <= beta < omega <= 1, got beta={beta}, omega={omega}")
  nb = length // block_size
  rng_t, rng_x = jax.random.split(rng)
  ids, n_rows = common.batch_rows(batch)
  block_ids = (ids[:, None] * nb + jnp.arange(nb, dtype=ids.dtype)).reshape(-1)
  u = common.sample_times(rng_t, b * nb, row_ids=block_ids, num_rows=n_rows * nb,
                          antithetic=bool(_cfg_get(config, "antithetic", True)))
  t = (beta + (omega - beta) * u).reshape(b, nb)
  x_t = common.corrupt_rows(process, rng_x, block_ids, x0.reshape(b * nb, block_size),
                            t.reshape(-1)).reshape(b, length)
  x_t = common.keep_clean(x_t, x0, loss_mask)
  per_seq = bd3_block_nelbo(model, params, process, x0, x_t, t, block_size, loss_mask,
                            **denoiser_kwargs(batch))
  return _per_token(per_seq, loss_mask)


def completion_logp(model: Callable[..., Any], params: Any, batch: dict[str, Array], *,
                    mask_id: int, p_mask_prompt: float) -> Array:
  """diffu-GRPO's one-step log-likelihood estimate (Zhao et al. 2025, sec. 3.1): log p(o_k | q')
  [B, L] for every completion token, from one pass over the completion fully masked and the
  prompt q' with each real token masked with probability ``p_mask_prompt``.

  batch: "tokens" [B, L] (prompt | completion), "loss_mask" (completion positions),
  "prompt_mask" (real prompt tokens), "attention_mask" (1 = real token), "mask_seed" [B, L]
  (one seed per step: the prompt mask of row i is fold_in(key(seed), row_ids[i])).
  """
  x0 = batch["tokens"]
  chex.assert_rank(x0, 2)
  ids, _ = common.batch_rows(batch)
  key = jax.random.key(batch["mask_seed"][0, 0])
  u = common.row_uniform(key, ids, x0.shape[1:])
  masked = (batch["loss_mask"] > 0) | ((batch["prompt_mask"] > 0) & (u < p_mask_prompt))
  x_in = jnp.where(masked, mask_id, x0)
  t = jnp.ones((x0.shape[0],), jnp.float32)  # every completion token masked
  logits, _ = model(params, x_in, t, attention_mask=batch["attention_mask"])
  return -common.nll_at(logits, x0)


@LOSSES.register("grpo")
@takes("absorbing")
def grpo_loss(params: Any, batch: dict[str, Array], rng: chex.PRNGKey, *,
              model: Callable[..., Any], process: Process,
              config: Any) -> tuple[Array, Metrics]:
  """diffu-GRPO (Zhao et al. 2025, eq. 3 with sec. 3.1's estimate): per completion token
  -min(r A, clip(r, 1 - eps, 1 + eps) A) + beta KL_k3, r = exp(log pi - log pi_old),
  KL_k3 = exp(ref - log pi) - (ref - log pi) - 1, summed over completion tokens / their count.

  batch (from ``dlm.train.grpo``): ``completion_logp``'s keys, "advantages" [B, L] (the row's
  group-relative advantage, broadcast), "old_logp" and "ref_logp" [B, L] (absent: pi_old is
  pi, detached, as with one inner iteration; no KL).  config.loss: epsilon, beta,
  p_mask_prompt, mask_id.
  """
  del rng  # the prompt mask is the rollout's (mask_seed): pi_old saw the same one
  eps, beta = float(_cfg_get(config, "epsilon", 0.2)), float(_cfg_get(config, "beta", 0.04))
  logp = completion_logp(model, params, batch, mask_id=int(_cfg_get(config, "mask_id", 0)),
                         p_mask_prompt=float(_cfg_get(config, "p_mask_prompt", 0.15)))
  comp = batch["loss_mask"].astype(jnp.float32)
  old = batch.get("old_logp")
  old = jax.lax.stop_gradient(logp) if old is None else old
  ratio = jnp.exp(logp - old)
  adv = batch["advantages"].astype(jnp.float32)
  per_token = -jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - eps, 1.0 + eps) * adv)
  n = jnp.maximum(jnp.sum(comp), 1.0)
  kl = jnp.zeros_like(logp)
  if "ref_logp" in batch and beta:
    d = batch["ref_logp"] - logp
    kl = jnp.exp(d) - d - 1.0
    per_token = per_token + beta * kl
  loss = jnp.sum(per_token * comp) / n
  clipped = (jnp.abs(ratio - 1.0) > eps).astype(jnp.float32)
  return loss, {"loss": loss, "nelbo_sum": jnp.sum(per_token * comp), "num_tokens": jnp.sum(comp),
                "kl": jnp.sum(kl * comp) / n, "clip_ratio": jnp.sum(clipped * comp) / n}
