"""Decoding speed: the same ~100M weights as AR (KV cache), BD3 (blocks 4, 16; clean-block
cache) and masked diffusion (llada uncached, fast_dllm dual cache), and our AR decoding
against Hugging Face ``transformers`` ``generate`` on the same Qwen2-shaped weights.

  python benchmarks/decode_speed.py [--d_model=768 --layers=12] [--gen=256] [--batch=1,8]
                                    [--decoders=ar_cache,bd3_4,bd3_16,llada,fast_dllm_dual]

Random weights (output head scaled to logit std ~5), a 16-token prompt, greedy, no early
stop (tokens/s counts every generated position).  ``transformers`` (and torch) are optional:
``pip install -e '.[hf]'``; without them that column is null.  Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dlm import api
from dlm.models import transformer

MASK, EOS, PROMPT = 250, 251, 16


def build(d_model: int, layers: int, vocab: int):
  cfg = transformer.ModelConfig(vocab_size=vocab, d_model=d_model, num_layers=layers,
                                num_heads=d_model // 64, num_kv_heads=d_model // 128,
                                mlp_dim=4 * d_model, qkv_bias=True, rope_theta=10000.0,
                                norm_eps=1e-6, mask_kind="causal", shift_logits=True)
  graphdef, state = nnx.split(transformer.init_model(cfg, 0))
  params = nnx.to_pure_dict(state)
  x = jnp.asarray(np.random.default_rng(0).integers(3, 240, (1, 64)), jnp.int32)
  std = float(jnp.std(transformer.apply_fn(graphdef)(params, x, None)[0]))
  params["head"] = params["head"] * (5.0 / std)
  return cfg, params


def model_as(cfg, params, **kind) -> api.DiffusionLM:
  cfg = dataclasses.replace(cfg, **kind)
  graphdef = transformer.param_logical_specs(cfg)[0]
  config = ml_collections.ConfigDict({"process": {"name": "masked",
                                                  "schedule": {"name": "linear"}}})
  return api.DiffusionLM(config=config, model_cfg=cfg, params=params,
                         ids={"mask": MASK, "eos": EOS, "pad": EOS, "bos": None},
                         tokenizer=None, apply=transformer.apply_fn(graphdef))


def timed(fn) -> tuple[float, object]:
  fn()  # compile and warm
  t0 = time.perf_counter()
  out = fn()
  return time.perf_counter() - t0, out


def hf_generate(cfg, params, prompt: np.ndarray, gen: int) -> float | None:
  """Seconds of transformers' greedy generate on the same weights (exported as Qwen2)."""
  try:
    import torch
    from transformers import AutoModelForCausalLM
  except ImportError:
    return None
  from dlm.convert import hf
  model = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
  model.update(head_dim=cfg.hd, num_kv_heads=cfg.num_kv_heads, mlp_dim=cfg.mlp)
  with tempfile.TemporaryDirectory() as d:
    hf_cfg = hf.hf_config_for(model, "qwen2", {"eos": EOS, "pad": EOS, "bos": None})
    hf_cfg.update(max_position_embeddings=4096, torch_dtype="float32", use_sliding_window=False,
                  sliding_window=None)
    hf.export_params(jax.tree.map(np.asarray, params), model, "qwen2", hf_cfg, f"{d}/m")
    m = AutoModelForCausalLM.from_pretrained(f"{d}/m", torch_dtype=torch.float32).eval()
    ids = torch.tensor(prompt)
    run = lambda: m.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=gen, min_new_tokens=gen, pad_token_id=EOS)
    with torch.no_grad():
      secs, _ = timed(run)
  return secs


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--d_model", type=int, default=768)
  ap.add_argument("--layers", type=int, default=12)
  ap.add_argument("--vocab", type=int, default=256)
  ap.add_argument("--gen", type=int, default=256)
  ap.add_argument("--batch", default="1,8")
  ap.add_argument("--decoders", default="ar_cache,bd3_4,bd3_16,llada,fast_dllm_dual",
                  help="which of ours to time (ar_cache is always timed: transformers'"
                       " ratio is against it)")
  args = ap.parse_args()
  cfg, params = build(args.d_model, args.layers, args.vocab)
  n = transformer.count_params(params)
  print(f"{n / 1e6:.1f}M parameters, gen {args.gen}, prompt {PROMPT}")
  ar = model_as(cfg, params)
  runs = {
      "ar_cache": (ar, dict(sampler="ar", max_new_tokens=args.gen, eos_token_id=[])),
      "bd3_4": (model_as(cfg, params, mask_kind="bd3", block_size=4, shift_logits=False),
                dict(sampler="bd3", gen_length=args.gen, stop_at_eos=False)),
      "bd3_16": (model_as(cfg, params, mask_kind="bd3", block_size=16, shift_logits=False),
                 dict(sampler="bd3", gen_length=args.gen, stop_at_eos=False)),
      "llada": (model_as(cfg, params, mask_kind="bidirectional", shift_logits=False),
                dict(sampler="llada", steps=args.gen, gen_length=args.gen, block_length=32)),
      "fast_dllm_dual": (model_as(cfg, params, mask_kind="bidirectional", shift_logits=False),
                         dict(sampler="fast_dllm", steps=args.gen, gen_length=args.gen,
                              block_length=32, threshold=0.9, use_cache="dual")),
  }
  keep = set(args.decoders.split(",")) | {"ar_cache"}
  if keep - set(runs):
    raise SystemExit(f"--decoders: unknown {sorted(keep - set(runs))}; known: {sorted(runs)}")
  runs = {k: v for k, v in runs.items() if k in keep}
  result = {"params": n, "gen": args.gen, "rows": {}}
  for b in map(int, args.batch.split(",")):
    prompt = np.random.default_rng(1).integers(3, 240, (b, PROMPT)).astype(np.int32)
    for name, (m, kw) in runs.items():
      secs, out = timed(lambda: m.generate(prompt, **kw))
      row = {"tok_s": round(b * args.gen / secs, 2), "nfe": out.nfe, "seconds": round(secs, 3)}
      result["rows"][f"{name}@b{b}"] = row
      print(f"batch {b} {name:15s} {row['tok_s']:8.2f} tok/s  nfe {row['nfe']:4d}"
            f"  {secs:7.2f} s")
    hf_secs = hf_generate(cfg, params, prompt, args.gen)
    ours = result["rows"][f"ar_cache@b{b}"]["seconds"]
    result["rows"][f"transformers@b{b}"] = None if hf_secs is None else {
        "tok_s": round(b * args.gen / hf_secs, 2), "seconds": round(hf_secs, 3),
        "ours_faster_x": round(hf_secs / ours, 2)}
    print(f"batch {b} transformers    " + ("not installed (pip install -e '.[hf]')"
                                           if hf_secs is None else
                                           f"{b * args.gen / hf_secs:8.2f} tok/s"))
  print(json.dumps(result))


if __name__ == "__main__":
  main()
