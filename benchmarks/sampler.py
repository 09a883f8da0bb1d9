"""Sampler speed: each strategy jitted whole vs an eager Python loop of one jitted call per step.

  python benchmarks/sampler.py [--d_model=768 --layers=12] [--gen=128,256] [--batch=1,8]
                               [--layout=auto|decode|stacked] [--first_call]

A LLaDA-shaped model with random weights (~100M parameters at the defaults;
output head scaled so logits have std ~5), a 16-token prompt, blocks of 32.
For each strategy and generation length: tokens/s, NFE, seconds per model
call, and the speed-up over the eager loop (the references' structure: a
Python loop calling the model once per step).  Also: a dual-cache block pass
against a full pass, and dual-cache threshold decoding against the uncached
LLaDA sampler.  ``--layout``: the samplers' parameter layout (dlm/models/decode.py;
auto = decode on CPU); the eager loop and the single-pass timings use the same
layout and weights.  ``--first_call``: instead, the time to the first generated
sequence of a fresh process (a ``fast_dllm`` dual-cache generation, model built and compiled
included) with an empty persistent compilation cache, then with the cache the first run
filled (dlm/compile_cache.py), beside the warm per-call time.  Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dlm import api
from dlm.models import transformer

MASK, EOS = 250, 251


def make_model(d_model: int, layers: int, vocab: int) -> api.DiffusionLM:
  cfg = transformer.ModelConfig(vocab_size=vocab, d_model=d_model, num_layers=layers,
                                num_heads=d_model // 64, mlp_dim=4 * d_model,
                                rope_theta=500000.0, norm_eps=1e-5)
  model = transformer.init_model(cfg, 0)
  from flax import nnx
  graphdef, state = nnx.split(model)
  params = nnx.to_pure_dict(state)
  apply = transformer.apply_fn(graphdef)
  x = jnp.asarray(np.random.default_rng(0).integers(3, 240, (1, 64)), jnp.int32)
  std = float(jnp.std(apply(params, x, None)[0]))
  params["head"] = params["head"] * (5.0 / std)
  config = ml_collections.ConfigDict({"process": {"name": "masked",
                                                  "schedule": {"name": "linear", "eps": 1e-4}}})
  return api.DiffusionLM(config=config, model_cfg=cfg, params=params,
                         ids={"mask": MASK, "eos": EOS, "pad": EOS, "bos": None},
                         tokenizer=None, apply=apply)


def timed(fn, *args, reps: int = 1) -> tuple[float, object]:
  """Seconds of one call after a warm-up call (the median of ``reps``), and its output."""
  out = fn(*args)
  jax.block_until_ready(out)  # compile + warm
  secs = []
  for _ in range(reps):
    t0 = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    secs.append(time.perf_counter() - t0)
  return float(np.median(secs)), out


def pass_seconds(apply, params, x: jax.Array, window: int | None, start: int = 16) -> float:
  """Seconds per model call inside a jitted loop, as the samplers make them: a full pass over x,
  or (``window``) a dual-cache pass over x[:, start:start + window].  (t(8) - t(2)) / 6."""
  def make(n: int):
    def f(params, x):
      _, cache = apply(params, x, None, fill_cache=True)

      def body(i, acc):
        xi = x.at[:, start].set(3 + i % 200)  # a changing input: nothing is hoisted out of the loop
        if window:
          out, _ = apply(params, xi[:, start:start + window], None, cache=cache,
                         cache_start=jnp.int32(start))
        else:
          out, _ = apply(params, xi, None)
        return acc + out[0, -1, 0]

      return jax.lax.fori_loop(0, n, body, 0.0)
    return jax.jit(f)

  t2, _ = timed(make(2), params, x, reps=3)
  t8, _ = timed(make(8), params, x, reps=3)
  return (t8 - t2) / 6


def eager_llada(m: api.DiffusionLM, prompt: np.ndarray, steps: int, gen: int, block: int) -> float:
  """The reference structure: Python loops, one jitted forward per step, decisions in numpy."""
  prepare, apply = m.sampling
  params = jax.jit(prepare)(m.params)
  fwd = jax.jit(lambda x: apply(params, x, None)[0])
  b, p = prompt.shape
  x = np.concatenate([prompt, np.full((b, gen), MASK, np.int32)], 1)
  jax.block_until_ready(fwd(jnp.asarray(x)))
  t0 = time.perf_counter()
  per_block = steps // (gen // block)
  for blk in range(gen // block):
    s, e = p + blk * block, p + (blk + 1) * block
    n = (x[:, s:e] == MASK).sum(1)
    for i in range(per_block):
      k = n // per_block + (i < n % per_block)
      logits = np.asarray(fwd(jnp.asarray(x)))
      x0 = logits.argmax(-1)
      z = logits - logits.max(-1, keepdims=True)
      prob = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
      conf = np.take_along_axis(prob, x0[..., None], -1)[..., 0]
      conf[:, e:] = -np.inf
      conf = np.where(x == MASK, conf, -np.inf)
      for r in range(b):
        idx = np.argsort(-conf[r])[:k[r]]
        x[r, idx] = x0[r, idx]
  return time.perf_counter() - t0


def _first_call_child(args: argparse.Namespace) -> None:
  """In a fresh process: build the model, time the first and a second generation."""
  from dlm import compile_cache
  compile_cache.enable(args.cache_dir)
  m = make_model(args.d_model, args.layers, args.vocab)
  gen = int(args.gen.split(",")[0])
  prompt = np.random.default_rng(1).integers(3, 240, (1, 16)).astype(np.int32)
  kw = dict(sampler="fast_dllm", steps=gen, gen_length=gen, block_length=args.block,
            threshold=0.9, use_cache="dual")
  t0 = time.perf_counter()
  m.generate(prompt, **kw)
  first = time.perf_counter() - t0
  warm = []
  for _ in range(2):
    t0 = time.perf_counter()
    m.generate(prompt, **kw)
    warm.append(time.perf_counter() - t0)
  # startup: what the first call spends before it generates (trace, compile or cache load,
  # the decode-layout copy of the weights)
  print(json.dumps({"first_s": round(first, 2), "warm_s": round(min(warm), 2),
                    "startup_s": round(first - min(warm), 2)}))


def first_call(args: argparse.Namespace) -> None:
  import os
  import subprocess
  import sys
  import tempfile
  with tempfile.TemporaryDirectory(prefix="dlm-compile-cache-") as cache:
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    cmd = [sys.executable, __file__, "--_child", f"--cache_dir={cache}",
           f"--d_model={args.d_model}", f"--layers={args.layers}", f"--gen={args.gen}",
           f"--block={args.block}"]
    rows = {}
    for name in ("cold", "warm_cache"):
      out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
      rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
      print(f"{name}: first generation {rows[name]['first_s']} s (startup"
            f" {rows[name]['startup_s']} s), warm {rows[name]['warm_s']} s")
    ratio = rows["cold"]["first_s"] / rows["warm_cache"]["first_s"]
    start = rows["cold"]["startup_s"] / max(rows["warm_cache"]["startup_s"], 1e-3)
    print(f"with the persistent cache: generation starts {start:.2f}x sooner, the first"
          f" sequence is done {ratio:.2f}x sooner")
    print(json.dumps({"gen": int(args.gen.split(",")[0]), **rows,
                      "cold_over_cached_startup": round(start, 2),
                      "cold_over_cached_first": round(ratio, 2)}))


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--first_call", action="store_true")
  ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
  ap.add_argument("--cache_dir", default="", help=argparse.SUPPRESS)
  ap.add_argument("--d_model", type=int, default=768)
  ap.add_argument("--layers", type=int, default=12)
  ap.add_argument("--vocab", type=int, default=256)
  ap.add_argument("--gen", default="128,256")
  ap.add_argument("--batch", default="1,8",
                  help="batch sizes for llada tokens/s, at the first --gen")
  ap.add_argument("--block", type=int, default=32)
  ap.add_argument("--layout", default="auto", choices=["auto", "decode", "stacked"])
  args = ap.parse_args()
  if args._child:
    return _first_call_child(args)
  if args.first_call:
    return first_call(args)
  m = make_model(args.d_model, args.layers, args.vocab)
  m.decode_layout = {"auto": None, "decode": True, "stacked": False}[args.layout]
  layout = "decode" if m.sampling[1] is not m.apply else "stacked"
  prepare, apply = m.sampling
  params = jax.jit(prepare)(m.params)
  n_params = transformer.count_params(m.params)
  print(f"model: {n_params / 1e6:.1f}M parameters, {jax.devices()[0].platform}, {layout} layout")
  rng = np.random.default_rng(1)
  results: dict = {"params_m": round(n_params / 1e6, 1), "device": jax.devices()[0].platform,
                   "layout": layout}
  gens = [int(g) for g in args.gen.split(",")]
  for gen in gens:
    prompt = rng.integers(3, 240, (1, 16)).astype(np.int32)
    steps = gen  # one token per step, as the references are usually run
    runs = {
        "llada": lambda pr: m.generate(pr, sampler="llada", steps=steps, gen_length=gen,
                                       block_length=args.block),
        "dream": lambda pr: m.generate(pr, sampler="dream", steps=steps, max_new_tokens=gen,
                                       alg="entropy"),
        "fast_dllm_threshold": lambda pr: m.generate(
            pr, sampler="fast_dllm", steps=steps, gen_length=gen, block_length=args.block,
            threshold=0.9, use_cache="none"),
        "fast_dllm_dual": lambda pr: m.generate(
            pr, sampler="fast_dllm", steps=steps, gen_length=gen, block_length=args.block,
            threshold=0.9, use_cache="dual"),
    }
    row = {}
    for name, fn in runs.items():
      secs, st = timed(fn, prompt)
      nfe = int(st.nfe)
      row[name] = {"seconds": round(secs, 3), "nfe": nfe, "tokens_per_s": round(gen / secs, 1),
                   "s_per_call": round(secs / max(nfe, 1), 4)}
      print(f"gen {gen} {name}: {secs:.2f} s, nfe {nfe}, {gen / secs:.1f} tok/s")
    eager = eager_llada(m, prompt.copy(), steps, gen, args.block)
    row["llada_eager_seconds"] = round(eager, 3)
    row["llada_speedup_over_eager"] = round(eager / row["llada"]["seconds"], 2)
    row["dual_threshold_over_llada"] = round(row["llada"]["seconds"]
                                             / row["fast_dllm_dual"]["seconds"], 2)
    # one full pass vs one dual-cache block pass, each inside a jitted loop as the samplers run it
    x = jnp.asarray(np.concatenate([prompt, np.full((1, gen), MASK, np.int32)], 1))
    t_full = pass_seconds(apply, params, x, None)
    t_blk = pass_seconds(apply, params, x, args.block)
    row["full_pass_s"], row["dual_block_pass_s"] = round(t_full, 4), round(t_blk, 4)
    row["full_over_cached_pass"] = round(t_full / t_blk, 2)
    for b in [int(v) for v in args.batch.split(",")] if gen == gens[0] else []:
      pr = rng.integers(3, 240, (b, 16)).astype(np.int32)
      secs, _ = timed(runs["llada"], pr)
      row[f"llada_batch{b}_tokens_per_s"] = round(b * gen / secs, 1)
      print(f"gen {gen} llada batch {b}: {b * gen / secs:.1f} tok/s")
    print(f"gen {gen}: llada {row['llada_speedup_over_eager']}x the eager loop; cached pass"
          f" {row['full_over_cached_pass']}x cheaper; dual threshold"
          f" {row['dual_threshold_over_llada']}x llada")
    results[f"gen{gen}"] = row
  print(json.dumps(results))


if __name__ == "__main__":
  main()
