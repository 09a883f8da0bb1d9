"""Sample quality (``dlm eval --samples``): what a sampler's output costs and looks like.

For N unconditional samples (each continues the model's document separator, EOS, or BOS for
imported models) drawn with a sampler and its knobs:

* gen-ppl: exp(total -log p_eval / total tokens) of the samples under an autoregressive
  evaluator (a dlm AR workdir or an imported Llama / Qwen2), pooled over samples as MDLM and
  ReMDM report it, with each sample's own value in the per-sample rows; the exact chain rule
  (``likelihood.log_likelihood``), windows of the evaluator's context for longer samples;
* entropy: -sum_v f_v log f_v of each sample's token frequencies (nats), averaged (the
  diversity measure Zheng et al. 2024 report beside gen-ppl: float32 Gumbel noise lowers both);
* repetition: the fraction of a sample's 4-grams that already occurred earlier in it;
* nfe (denoiser calls per batch) and tokens/s (generated tokens over sampling wall time, the
  compile excluded by a first call on the same shapes);
* the sampling precision (``gumbel_bits``) and the rest of the run's provenance.

Samples are cut at their first EOS.  An evaluator with another tokenizer scores the samples'
text re-encoded with its own tokenizer only with ``retokenize=True`` (gen-ppl is then per
evaluator token, and the result says so); otherwise that is refused in one line.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from dlm.errors import UserError
from dlm.eval import likelihood, provenance


def entropy(tokens: list[int]) -> float:
  """-sum_v f_v log f_v (nats) of the tokens' frequencies; 0 for fewer than two tokens."""
  if not tokens:
    return 0.0
  _, counts = np.unique(np.asarray(tokens), return_counts=True)
  f = counts / counts.sum()
  return float(-(f * np.log(f)).sum())


def repetition(tokens: list[int], n: int = 4) -> float:
  """The fraction of the n-grams of ``tokens`` that occurred earlier in them (0 if none)."""
  grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
  if not grams:
    return 0.0
  seen: set[tuple[int, ...]] = set()
  again = 0
  for g in grams:
    again += g in seen
    seen.add(g)
  return again / len(grams)


def start_token(model: Any) -> int:
  """What an unconditional sample continues: BOS for imported models that have one, else the
  document separator (EOS) dlm's packed rows put between documents."""
  imported = hasattr(model.config, "get") and "hf" in model.config
  for key in (("bos", "eos") if imported else ("eos", "bos")):
    if model.ids.get(key) is not None:
      return int(model.ids[key])
  raise UserError("this model names neither an EOS nor a BOS id to start samples from")


def draw(model: Any, num_samples: int, *, sampler: str | None, knobs: dict[str, Any],
         seed: int, batch_size: int) -> dict[str, Any]:
  """{"tokens": each sample cut at EOS, "nfe": mean per batch, "seconds", "tokens_per_s"}."""
  from dlm.sample import engine
  name = sampler or engine.default_sampler(model)
  make = engine.resolve(name)
  if make.length is None:
    raise UserError(f"sampler {name!r} fills templates; sample quality needs a sampler that"
                    " continues a prompt (llada, dream, fast_dllm, ancestral, ar, bd3)")
  full = engine.check_knobs(name, make, knobs)
  gen = int(full[make.length])
  if num_samples < 1 or batch_size < 1:
    raise UserError(f"--samples={num_samples} and --batch_size={batch_size} must be >= 1")
  start = start_token(model)
  batches = [min(batch_size, num_samples - i) for i in range(0, num_samples, batch_size)]
  prompt = lambda b: np.full((b, 1), start, np.int32)  # noqa: E731
  model.generate(prompt(batches[0]), sampler=name, seed=seed, **knobs)  # compile, not timed
  if batches[-1] != batches[0]:
    model.generate(prompt(batches[-1]), sampler=name, seed=seed, **knobs)
  tokens, nfe, seconds = [], [], 0.0
  for b, size in enumerate(batches):
    t0 = time.perf_counter()
    out = model.generate(prompt(size), sampler=name, seed=seed * 1_000_003 + b, **knobs)
    seconds += time.perf_counter() - t0
    tokens += [list(map(int, t)) for t in out.token_ids]
    nfe.append(out.nfe)
  return {"sampler": name, "knobs": full, "tokens": tokens, "nfe": float(np.mean(nfe)),
          "seconds": seconds, "tokens_per_s": gen * num_samples / max(seconds, 1e-9)}


def _windows(tokens: list[int], prefix: int, limit: int) -> list[tuple[list[int], list[int]]]:
  """(context, scored) pairs covering ``tokens`` once each, every window within ``limit``."""
  if len(tokens) + 1 <= limit:
    return [([prefix], tokens)]
  step = max(limit // 2, 1)
  out = [([prefix], tokens[:limit - 1])]
  k = limit - 1
  while k < len(tokens):
    scored = tokens[k:k + step]
    out.append((tokens[max(0, k - (limit - len(scored))):k], scored))
    k += len(scored)
  return out


def gen_ppl(evaluator: Any, samples: list[list[int]]) -> tuple[float, list[float | None]]:
  """(pooled gen-ppl, each sample's -log p per token or None if empty) under an AR model."""
  from dlm.sample import engine
  if evaluator.model_cfg.mask_kind != "causal":
    raise UserError("the evaluator must be an autoregressive model (a dlm AR workdir, e.g."
                    " configs/quickstart.py:ar, or an imported Llama / Qwen2)")
  limit = engine.model_context(evaluator) or 1 << 30
  prefix = start_token(evaluator)
  pairs, owner = [], []
  for i, toks in enumerate(samples):
    for ctx, scored in (_windows(toks, prefix, limit) if toks else []):
      pairs.append((ctx, scored))
      owner.append(i)
  nll = np.zeros(len(samples))
  if pairs:
    res = likelihood.log_likelihood(evaluator, [c for c, _ in pairs], [s for _, s in pairs],
                                    batch_size=16, bucket=16)
    np.add.at(nll, np.asarray(owner), -res.log_likelihood)
  counts = np.asarray([len(t) for t in samples])
  per = [float(nll[i] / counts[i]) if counts[i] else None for i in range(len(samples))]
  total = int(counts.sum())
  return (math.exp(nll.sum() / total) if total else float("nan")), per


def evaluate(model: Any, num_samples: int, *, evaluator: Any = None, sampler: str | None = None,
             knobs: dict[str, Any] | None = None, seed: int = 0, batch_size: int = 16,
             retokenize: bool = False, path: str | None = None,
             evaluator_path: str | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """(summary, per-sample rows) of ``num_samples`` samples; see the module docstring."""
  knobs = dict(knobs or {})
  got = draw(model, num_samples, sampler=sampler, knobs=knobs, seed=seed, batch_size=batch_size)
  samples = got["tokens"]
  tok = model.tokenizer
  texts = [tok.decode(t) for t in samples] if tok is not None else [None] * len(samples)
  summary: dict[str, Any] = {
      "samples": num_samples, "entropy": float(np.mean([entropy(t) for t in samples])),
      "repetition": float(np.mean([repetition(t) for t in samples])),
      "mean_length": float(np.mean([len(t) for t in samples])), "nfe": got["nfe"],
      "tokens_per_s": got["tokens_per_s"], "sampling_seconds": got["seconds"]}
  per: list[float | None] = [None] * len(samples)
  if evaluator is not None:
    scored, retokenized = samples, False
    ev_tok = evaluator.tokenizer
    same = (tok is not None and ev_tok is not None and tok.fingerprint() == ev_tok.fingerprint())
    if not same:
      if not retokenize:
        raise UserError("the evaluator's tokenizer differs from the model's; pass --retokenize"
                        " to score the samples' text re-encoded with the evaluator's tokenizer"
                        " (gen-ppl is then per evaluator token), or use an evaluator trained"
                        " with this tokenizer")
      if tok is None or ev_tok is None:
        raise UserError("re-tokenizing needs both the model's and the evaluator's tokenizer")
      scored, retokenized = [list(ev_tok.encode(t)) for t in texts], True
    summary["gen_ppl"], per = gen_ppl(evaluator, scored)
    summary["evaluator"] = {"path": evaluator_path, "retokenized": retokenized,
                            "tokens_scored": int(sum(len(s) for s in scored))}
  summary["dlm"] = provenance.record(model, sampler=got["sampler"], knobs=got["knobs"],
                                     seed=seed, path=path)
  rows = [{"index": i, "text": texts[i], "token_ids": samples[i],
           "entropy": entropy(samples[i]), "repetition": repetition(samples[i]),
           "nll_per_token": per[i]} for i in range(len(samples))]
  return summary, rows
