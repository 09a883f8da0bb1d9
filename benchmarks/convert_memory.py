"""Peak host memory of `dlm convert` on a synthetic sharded LLaDA-shaped checkpoint.

  python benchmarks/convert_memory.py [--gib=1.0] [--dtype=bfloat16|float32] [--shards=4]

Writes a random-weight LLaDA folder of about ``--gib`` GiB in several
safetensors shards (streamed: the writer never holds it whole), converts it
in a fresh process, and reads that process's peak RSS.  ``peak_rss_over_size``
is (peak RSS - RSS after imports) / checkpoint bytes: what the conversion
itself holds (the target is < 1.3); ``peak_total_over_size`` includes the
Python/JAX baseline.  Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

from dlm.convert import families, hf, safetensors_io

_CHILD = r"""
import json, resource, sys, time
from dlm.convert import workdir
import jax, orbax.checkpoint  # imported before the baseline is read
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.time()
workdir.convert(sys.argv[1], sys.argv[2], expected="llada")
print(json.dumps({"baseline_kib": base, "seconds": time.time() - t0}))
"""


def synthetic_config(gib: float) -> dict:
  """A LLaDA config.json whose weights take about ``gib`` GiB at 2 bytes per parameter."""
  d, layers, vocab = 1024, 1, 32_000
  per_layer = lambda d: 4 * d * d + 3 * d * (8 * d // 3) + 2 * d
  target = gib * 2**30 / 2
  while 2 * vocab * d + layers * per_layer(d) < target:
    layers += 1
  mlp = 8 * d // 3
  return {"model_type": "llada", "d_model": d, "n_heads": 16, "n_kv_heads": 16, "n_layers": layers,
          "mlp_hidden_size": mlp, "vocab_size": vocab, "embedding_size": vocab,
          "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "block_type": "llama",
          "activation_type": "silu", "weight_tying": False, "include_bias": False,
          "mask_token_id": vocab - 2, "eos_token_id": vocab - 1, "max_sequence_length": 4096}


def write_synthetic(folder: pathlib.Path, cfg: dict, dtype: np.dtype, shards: int) -> int:
  model = families.LLADA.model_fields(cfg, "synthetic")
  s, shapes = families.sizes(model), hf.our_shapes(model)
  specs = []
  for rule in families.LLADA.rules(model):
    shape = hf._their_shape(rule, shapes[rule.ours], s)
    for i in range(model["num_layers"]) if rule.per_layer else [None]:
      specs.append((rule.theirs.format(i=i) if rule.per_layer else rule.theirs, shape, dtype))
  total = sum(math.prod(shape) * dtype.itemsize for _, shape, _ in specs)
  rng = np.random.default_rng(0)
  shape_of = {name: shape for name, shape, _ in specs}

  def get(name: str) -> np.ndarray:
    return rng.standard_normal(shape_of[name], np.float32).astype(dtype)

  folder.mkdir(parents=True)
  safetensors_io.write_folder(folder, specs, get, max_shard_bytes=total // shards + 1)
  (folder / "config.json").write_text(json.dumps(cfg))
  return total


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--gib", type=float, default=1.0)
  ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
  ap.add_argument("--shards", type=int, default=4)
  args = ap.parse_args()
  dtype = np.dtype(ml_dtypes.bfloat16) if args.dtype == "bfloat16" else np.dtype(np.float32)
  with tempfile.TemporaryDirectory() as tmp:
    src, out = pathlib.Path(tmp) / "hf", pathlib.Path(tmp) / "dlm"
    cfg = synthetic_config(args.gib * (2 / dtype.itemsize))
    t0 = time.time()
    size = write_synthetic(src, cfg, dtype, args.shards)
    write_s = time.time() - t0
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(out)], capture_output=True,
                          text=True, check=False)
    if proc.returncode:
      sys.exit(f"convert failed:\n{proc.stderr[-3000:]}")
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    base = child["baseline_kib"] * 1024
    result = {
        "checkpoint_bytes": size, "shards": len(list(src.glob("*.safetensors"))),
        "dtype": args.dtype, "num_layers": cfg["n_layers"],
        "peak_rss_bytes": peak, "baseline_rss_bytes": base,
        "peak_rss_over_size": round((peak - base) / size, 3),
        "peak_total_over_size": round(peak / size, 3),
        "convert_seconds": round(child["seconds"], 2), "write_seconds": round(write_s, 2),
    }
    print(f"{size / 2**30:.2f} GiB in {result['shards']} shards: conversion peak"
          f" {(peak - base) / 2**30:.2f} GiB over a {base / 2**30:.2f} GiB baseline")
    print(json.dumps(result))


if __name__ == "__main__":
  main()
