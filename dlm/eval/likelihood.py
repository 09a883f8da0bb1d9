"""Conditional log-likelihoods log p(answer | prompt) of a loaded model, with standard errors.

* Masked diffusion: LLaDA's Monte-Carlo estimator (Nie et al. 2025, eq. 6; App. B.6):

    -log p(r0 | p0) <= E_{l ~ U{1..A}} E_{r_l} [ (A / l) sum_{i: r_l^i = M} -log p(r0^i | p0, r_l) ]

  over the A answer tokens, the prompt kept clean.  As in LLaDA's evaluation code the counts l
  of each batch of ``batch_size`` rows are stratified (a systematic sample with one random
  start k: l_i = round(k + i A / b), wrapped into 1..A) and each row masks l_i answer positions
  at random.  The estimate is the mean of ``num_samples`` rows; each batch is an independent
  unbiased estimate, so ``std_error`` is the standard deviation of the batch means / sqrt(batches)
  (with one batch, the rows' standard deviation / sqrt(rows), which over-states it).
  ``cfg_scale`` > 0 is LLaDA's unsupervised guidance: logits = u + (cfg + 1)(c - u), u with the
  prompt masked.  With the exact denoiser of a distribution, the expectation is log p(r0 | p0).
* Block diffusion (BD3-LM, Arriola et al. 2025, eq. 8): the same estimator inside each block,
  conditioned on the clean earlier blocks, one stratified count per block and batch.
* Autoregressive models: the exact chain rule sum_i log p(r0^i | p0, r0^{<i}); std_error 0.

Masks are drawn on the host from ``(seed, crc32 of the pair's tokens)``: a pair's estimate does
not depend on which other pairs share the call or their order (an lm-eval run and a direct call
with the same seed give the same numbers).  The x0 distribution is the model's SUBS one (the
mask column excluded), as in training and ``dlm eval``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import zlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dlm.errors import UserError
from dlm.processes import common

METHODS = ("monte_carlo", "block", "exact")


@dataclasses.dataclass(frozen=True)
class Likelihood:
  """log p(answer | prompt) per pair, nats (an estimate of a lower bound for diffusion models)."""
  log_likelihood: np.ndarray  # float64 [N]
  std_error: np.ndarray  # float64 [N]; 0 where exact
  num_tokens: np.ndarray  # int [N]: answer tokens
  method: str  # monte_carlo (LLaDA eq. 6), block (BD3-LM), exact (autoregressive)
  num_samples: int  # rows per pair (1 for exact)
  seed: int
  cfg_scale: float = 0.0


def _pairs(prompt_ids: Any, answer_ids: Any) -> tuple[list[list[int]], list[list[int]], bool]:
  """Lists of token lists; single: one pair given as two flat sequences."""
  def flat(x: Any) -> bool:
    return len(x) == 0 or all(isinstance(v, (int, np.integer)) for v in x)
  if isinstance(prompt_ids, np.ndarray):
    prompt_ids = prompt_ids.tolist()
  if isinstance(answer_ids, np.ndarray):
    answer_ids = answer_ids.tolist()
  if flat(prompt_ids) and flat(answer_ids):
    return [list(map(int, prompt_ids))], [list(map(int, answer_ids))], True
  if flat(prompt_ids) != flat(answer_ids):
    raise UserError("prompt_ids and answer_ids must both be token lists (one pair) or both"
                    " lists of token lists (one per pair)")
  if len(prompt_ids) != len(answer_ids):
    raise UserError(f"{len(prompt_ids)} prompts but {len(answer_ids)} answers: give one answer"
                    " per prompt")
  return ([list(map(int, p)) for p in prompt_ids], [list(map(int, a)) for a in answer_ids],
          False)


def method_of(model: Any) -> str:
  kind = model.model_cfg.mask_kind
  if kind == "causal":
    return "exact"
  if kind == "bd3":
    return "block"
  from dlm.processes import base
  from dlm.sample import engine
  process = engine._process(model)
  if base.describe(process)[0] != "absorbing":
    raise UserError(f"log_likelihood estimates masked (absorbing) diffusion, block diffusion and"
                    f" autoregressive models; this model's process is"
                    f" {type(process).__name__!r}: use `dlm eval` (its NELBO)")
  return "monte_carlo"


def _check(model: Any, prompts: list[list[int]], answers: list[list[int]], num_samples: int,
           batch_size: int, cfg_scale: float, method: str) -> None:
  vocab, mask = model.model_cfg.vocab_size, model.ids.get("mask")
  for n, name in ((num_samples, "num_samples"), (batch_size, "batch_size")):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
      raise UserError(f"{name}={n!r} must be an integer >= 1")
  if method != "exact" and num_samples % batch_size:
    raise UserError(f"num_samples={num_samples} must be a multiple of batch_size={batch_size}"
                    " (each batch is one stratified sample, as in LLaDA's mc_num)")
  if cfg_scale < 0 or (cfg_scale and method != "monte_carlo"):
    raise UserError(f"cfg_scale={cfg_scale} must be >= 0, and 0 for {method} likelihoods"
                    " (guidance is LLaDA's, for masked diffusion models)")
  from dlm.sample import engine
  context = engine.model_context(model)
  for i, (p, a) in enumerate(zip(prompts, answers)):
    if not a:
      raise UserError(f"pair {i}: the answer is empty; give at least one answer token")
    if method == "exact" and not p:
      raise UserError(f"pair {i}: an autoregressive model needs at least one prompt token"
                      " (e.g. BOS) before the answer")
    bad = [t for t in p + a if not 0 <= t < vocab or (method != "exact" and t == mask)]
    if bad:
      raise UserError(f"pair {i}: token {bad[0]} is not a data token of this model (ids in"
                      f" [0, {vocab}), not the mask id {mask})")
    if context and len(p) + len(a) > context:
      raise UserError(f"pair {i}: prompt {len(p)} + answer {len(a)} tokens exceed the model's"
                      f" context of {context}; shorten the prompt (keep its last tokens) or the"
                      " answer")


def stratified_counts(rng: np.random.Generator, n: int, rows: int) -> np.ndarray:
  """LLaDA's counts for one batch of ``rows``: l_i = round(k + i n / rows) wrapped into 1..n,
  one random start k ~ U{1..n}, so the batch spreads its counts over 1..n.

  Halves round up: the counts of start k are then those of start 1 shifted by k - 1, so over
  k every count in 1..n is drawn equally often and the batch mean is unbiased.  LLaDA's
  ``torch.round`` rounds halves to even, which over-draws even counts whenever i n / rows hits
  a half (n = 4, rows = 8: counts 2 and 4 three times as often as 1 and 3), a bias of the
  reference estimator for answers shorter than the batch."""
  k = rng.integers(1, n + 1)
  x = np.floor(k + np.arange(rows) * (n / rows) + 0.5).astype(np.int64)
  return (x - 1) % n + 1


def _pair_rng(seed: int, prompt: list[int], answer: list[int]) -> np.random.Generator:
  data = np.asarray([len(prompt)] + prompt + answer, np.int64).tobytes()
  return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(data)])


def _unit_masks(rng: np.random.Generator, positions: np.ndarray, num_samples: int,
                batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(masked [M, n] bool, count [M]) for one unit's n answer positions."""
  n = len(positions)
  counts = np.concatenate([stratified_counts(rng, n, batch_size)
                           for _ in range(num_samples // batch_size)])
  ranks = np.argsort(np.argsort(rng.random((num_samples, n)), axis=1), axis=1)
  return ranks < counts[:, None], counts


def _rows(method: str, prompt: list[int], answer: list[int], length: int, num_samples: int,
          batch_size: int, seed: int, mask_id: int, block: int
          ) -> dict[str, np.ndarray]:
  """One pair's rows: x0, x_in (answer positions masked), weight (A_u / l on masked positions of
  each unit u), real (1 = a token, 0 = right padding), prompt (1 = prompt position), rate [M]."""
  p, a = len(prompt), len(answer)
  m = 1 if method == "exact" else num_samples
  x0 = np.zeros((m, length), np.int32)
  x0[:, :p + a] = prompt + answer
  real = np.zeros((m, length), np.int32)
  real[:, :p + a] = 1
  is_prompt = np.zeros((m, length), np.int32)
  is_prompt[:, :p] = 1
  weight = np.zeros((m, length), np.float32)
  rate = np.ones((m,), np.float32)
  if method == "exact":
    weight[:, p:p + a] = 1.0
    return dict(x0=x0, x_in=x0.copy(), weight=weight, real=real, prompt=is_prompt, rate=rate)
  rng = _pair_rng(seed, prompt, answer)
  answer_pos = np.arange(p, p + a)
  units = ([answer_pos] if method == "monte_carlo" else
           [u for u in (answer_pos[answer_pos // block == b] for b in range(length // block))
            if len(u)])
  x_in = x0.copy()
  for u in units:
    masked, counts = _unit_masks(rng, u, num_samples, batch_size)
    cols = x_in[:, u]
    x_in[:, u] = np.where(masked, mask_id, cols)
    weight[:, u] = np.where(masked, (len(u) / counts)[:, None], 0.0)
    if method == "monte_carlo":
      rate = (counts / len(u)).astype(np.float32)
  return dict(x0=x0, x_in=x_in, weight=weight, real=real, prompt=is_prompt, rate=rate)


def time_of_rate(schedule: Any, rate: np.ndarray) -> np.ndarray:
  """t with 1 - alpha(t) = rate (a mask rate), by bisection: what a time-conditioned denoiser
  is told when a fraction ``rate`` of the answer is masked."""
  lo, hi = np.zeros_like(rate, np.float64), np.ones_like(rate, np.float64)
  for _ in range(40):
    mid = (lo + hi) / 2
    above = 1.0 - np.asarray(schedule.alpha(jnp.asarray(mid, jnp.float32)), np.float64) >= rate
    hi, lo = np.where(above, mid, hi), np.where(above, lo, mid)
  return np.clip(hi, common.T_MIN, 1.0).astype(np.float32)


def row_nll(apply: Any, process: Any, method: str, cfg_scale: float, mask_id: int,
            params: Any, x_in: jax.Array, x0: jax.Array, weight: jax.Array, real: jax.Array,
            is_prompt: jax.Array, t: jax.Array) -> jax.Array:
  """sum_i weight_i * -log p(x0_i | x_in) per row [R] (one denoiser pass; two with guidance)."""
  if method == "block":  # BD3-LM: x_t (+) x_0 under the bd3 mask, padding its own segment
    b, length = x0.shape
    twice = lambda v: jnp.concatenate([v, v], axis=1)  # noqa: E731
    logits, _ = apply(params, jnp.concatenate([x_in, x0], axis=1), None,
                      positions=jnp.broadcast_to(jnp.tile(jnp.arange(length, dtype=jnp.int32), 2),
                                                 (b, 2 * length)),
                      segment_ids=twice(2 - real))
    logits = logits[:, :length]
  else:
    logits, _ = apply(params, x_in, t, attention_mask=real)
    if cfg_scale:
      un, _ = apply(params, jnp.where(is_prompt > 0, mask_id, x_in), t, attention_mask=real)
      logits = un + (cfg_scale + 1.0) * (logits - un)
  logits = logits.astype(jnp.float32)
  nll = (common.nll_at(logits, x0) if method == "exact"
         else process.masked_nll(logits, x0))
  return jnp.sum(jnp.where(weight > 0, weight * nll, 0.0), axis=-1)


def _program(model: Any, method: str, cfg_scale: float) -> Any:
  """The jitted ``row_nll`` of this model, kept on it (``DiffusionLM.jitted``)."""
  from dlm.sample import engine  # the model's process, made once (engine._process)
  mask_id = int(model.ids.get("mask") or 0)
  build = lambda: functools.partial(row_nll, model.apply, engine._process(model), method,  # noqa: E731
                                    float(cfg_scale), mask_id)
  return model.jitted("log_likelihood", {"method": method, "cfg_scale": float(cfg_scale),
                                         "mask_id": mask_id}, build)


def log_likelihood(model: Any, prompt_ids: Any, answer_ids: Any, *, num_samples: int = 128,
                   batch_size: int = 32, seed: int = 0, cfg_scale: float = 0.0,
                   bucket: int = 16, progress: bool = False) -> Likelihood:
  """log p(answer | prompt) of a loaded model (``DiffusionLM``) for one pair (two flat token
  lists) or many (two lists of lists); see the module docstring for the estimators.

  ``num_samples`` (LLaDA's mc_num) rows per pair in batches of ``batch_size`` (each one
  stratified sample; num_samples must be a multiple); ``seed`` fixes every mask; ``bucket``:
  sequences are right-padded to a multiple of it, so lengths share compiled programs.
  """
  from jax.sharding import NamedSharding, PartitionSpec as P
  method = method_of(model)
  prompts, answers, _ = _pairs(prompt_ids, answer_ids)
  _check(model, prompts, answers, num_samples, batch_size, cfg_scale, method)
  if model.mesh is not None:
    from dlm import parallel
    if parallel.spans_processes(model.mesh):
      raise UserError("log_likelihood runs in one process (its mesh may span this host's"
                      " devices); load the model with a local mesh")
  block = int(model.model_cfg.block_size) if method == "block" else 1
  step = math.lcm(max(int(bucket), 1), block)
  fn = _program(model, method, cfg_scale)
  process = None
  if bool(model.model_cfg.time_conditioning) and method == "monte_carlo":
    from dlm.sample import engine
    process = engine._process(model)
  m = 1 if method == "exact" else num_samples  # rows per pair
  per_pair: list[np.ndarray] = [np.zeros(0)] * len(prompts)
  lengths = [-(-(len(p) + len(a)) // step) * step for p, a in zip(prompts, answers)]
  put = lambda a: jnp.asarray(a)  # noqa: E731
  if model.mesh is not None:  # rows over the model's batch axes where they divide
    from dlm.sample import engine
    rows_sh = engine.row_sharding(model)
    if batch_size % engine.row_axes(rows_sh)[1]:
      rows_sh = NamedSharding(model.mesh, P())
    t_sh = NamedSharding(model.mesh, P(rows_sh.spec[0]))
    put = lambda a: jax.device_put(a, rows_sh if a.ndim == 2 else t_sh)  # noqa: E731
  from tqdm import tqdm
  bar = tqdm(total=m * len(prompts), desc="log-likelihood", unit="row", disable=not progress,
             dynamic_ncols=True)
  for length in sorted(set(lengths)):
    idx = [i for i, n in enumerate(lengths) if n == length]
    rows = [_rows(method, prompts[i], answers[i], length, num_samples, batch_size, seed,
                  int(model.ids.get("mask") or 0), block) for i in idx]
    cat = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    n_rows = cat["x0"].shape[0]
    pad = -n_rows % batch_size  # only exact rows (one per pair) need it
    if pad:  # whole batches: zero-weight copies of the last row
      cat = {k: np.concatenate([v, np.repeat(v[-1:], pad, 0) * (0 if k == "weight" else 1)])
             for k, v in cat.items()}
    t_all = cat["rate"] if process is None else time_of_rate(process.schedule, cat["rate"])
    out = []
    for s in range(0, cat["x0"].shape[0], batch_size):
      sl = slice(s, s + batch_size)
      args = [put(cat[k][sl]) for k in ("x_in", "x0", "weight", "real", "prompt")]
      out.append(np.asarray(fn(model.params, *args, put(t_all[sl]) if process else None),
                            np.float64))
      bar.update(max(0, min(batch_size, n_rows - s)))
    values = np.concatenate(out)[:n_rows]
    for j, i in enumerate(idx):
      per_pair[i] = values[j * m:(j + 1) * m]
  bar.close()
  ll, se = [], []
  for v in per_pair:
    ll.append(-float(v.mean()))
    if method == "exact":
      se.append(0.0)
    elif num_samples // batch_size > 1:
      means = v.reshape(-1, batch_size).mean(1)
      se.append(float(means.std(ddof=1) / math.sqrt(len(means))))
    else:
      se.append(float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan"))
  return Likelihood(log_likelihood=np.asarray(ll), std_error=np.asarray(se),
                    num_tokens=np.asarray([len(a) for a in answers]), method=method,
                    num_samples=1 if method == "exact" else int(num_samples), seed=int(seed),
                    cfg_scale=float(cfg_scale))

