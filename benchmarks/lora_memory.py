"""Peak training memory of LoRA against full fine-tuning at the same shapes.

  python benchmarks/lora_memory.py [--d_model=768 --num_layers=12 --batch=8 --seq_len=256]
                                   [--rank=8]

Compiles configs/sft.py's train step (the one ``dlm train`` runs, ``compile.report.lower_train``)
twice on one device, full fine-tuning and ``lora.rank=R`` on every projection, and reads
XLA's memory analysis of each: arguments (parameters, optimizer state, batch; the LoRA
step's frozen base included), temporaries (activations, gradients), and their sum, the
step's peak.  Nothing is trained or allocated.  Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import time

import jax

from dlm import parallel
from dlm.compile import report

ROOT = pathlib.Path(__file__).resolve().parents[1]


def recipe(args: argparse.Namespace, rank: int):
  spec = importlib.util.spec_from_file_location("sft_recipe", ROOT / "configs" / "sft.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(None)
  c.model.update(d_model=args.d_model, num_layers=args.num_layers, num_heads=args.d_model // 64,
                 mlp_dim=4 * args.d_model, remat="none", scan_layers=True)
  c.data.vocab_size, c.data.seq_len = args.vocab, args.seq_len
  c.train.batch_size = args.batch
  c.lora.rank = rank
  c.mesh.update(data=1, fsdp=1, tensor=1)
  return c


def measure(config) -> dict:
  mesh = parallel.make_mesh(config.mesh, devices=jax.devices()[:1])
  rules = parallel.rules_from_config(config.mesh)
  t0 = time.perf_counter()
  lowered, figures = report.lower_train(config, mesh, rules)
  mem = lowered.compile().memory_analysis()
  row = {"params": figures["params"], "trainable_params": figures["trainable_params"],
         "argument_bytes": int(mem.argument_size_in_bytes),
         "temp_bytes": int(mem.temp_size_in_bytes),
         "output_bytes": int(mem.output_size_in_bytes),
         "alias_bytes": int(mem.alias_size_in_bytes),
         "compile_s": round(time.perf_counter() - t0, 1)}
  row["peak_bytes"] = row["argument_bytes"] + row["temp_bytes"] + row["output_bytes"] - row[
      "alias_bytes"]
  return row


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--d_model", type=int, default=768)
  ap.add_argument("--num_layers", type=int, default=12)
  ap.add_argument("--vocab", type=int, default=8192)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq_len", type=int, default=256)
  ap.add_argument("--rank", type=int, default=8)
  args = ap.parse_args()
  rows = {}
  for name, rank in (("full", 0), ("lora", args.rank)):
    rows[name] = measure(recipe(args, rank))
    r = rows[name]
    print(f"{name}: {r['trainable_params'] / 1e6:.2f}M of {r['params'] / 1e6:.2f}M parameters"
          f" trained; arguments {r['argument_bytes'] / 2**20:.0f} MiB + temporaries"
          f" {r['temp_bytes'] / 2**20:.0f} MiB -> peak {r['peak_bytes'] / 2**20:.0f} MiB",
          flush=True)
  print(json.dumps({"shapes": vars(args), **rows,
                    "peak_ratio_lora_vs_full": rows["lora"]["peak_bytes"] / rows["full"]["peak_bytes"],
                    "state_ratio_lora_vs_full": rows["lora"]["argument_bytes"]
                    / rows["full"]["argument_bytes"]}))


if __name__ == "__main__":
  main()
