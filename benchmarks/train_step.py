"""Train-step throughput and model FLOPs utilization at a recipe's shapes.

  python benchmarks/train_step.py [--config=configs/quickstart.py] [--shapes=all]
                                  [--set model.scan_layers=True] [--steps=20]

``--shapes``: the shapes MD4's own step was measured at (issue 18; below), else the
recipe's.  MFU (dlm/train/mfu.py, as the train loop reports it) is taken against a float32
matmul peak measured in the same run, so the ratio is meaningful on a noisy shared
machine; the step time is the median of ``--steps`` (the best is in the JSON too).  Last
line: one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import numpy as np

from dlm import losses, parallel, processes
from dlm.models import transformer
from dlm.train import mfu, optim, state as state_lib, step as step_lib


def load_config(path: str):
  import importlib.util
  file, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location("recipe", file)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg or None)


def measure(cfg, steps: int, vocab: int = 0) -> dict:
  """Median train-step time at the recipe's shapes, and its model FLOPs."""
  vocab = vocab or int(cfg.data.vocab_size)
  model_cfg = transformer.ModelConfig.from_config(cfg.model, vocab_size=vocab)
  mesh = parallel.make_mesh(cfg.mesh)
  rules = parallel.rules_from_config(cfg.mesh)
  process = processes.make_process(cfg.process, vocab_size=vocab, mask_id=vocab - 1)
  tx = optim.make_optimizer(cfg.optim, cfg.train.steps)
  graphdef, _, shardings = state_lib.state_shardings(model_cfg, tx, mesh, rules)
  loss_fn = functools.partial(losses.get_loss(cfg.loss.name), model=transformer.apply_fn(graphdef),
                              process=process, config=cfg.loss)
  state = state_lib.init_state(model_cfg, tx, 0, shardings)
  step = step_lib.jit_train_step(mesh, rules, shardings, loss_fn=loss_fn, tx=tx,
                                 lr_fn=optim.learning_rate(cfg.optim, cfg.train.steps))
  b, l = int(cfg.train.batch_size), int(cfg.data.seq_len)
  rng = np.random.default_rng(0)
  batch = parallel.global_batch({"tokens": rng.integers(0, vocab - 1, (b, l)).astype(np.int32)},
                                mesh, rules)
  n_params = transformer.count_params(state.params)
  flops_model = mfu.train_flops(model_cfg, n_params, b, l)  # what the train loop reports
  state, m = step(state, batch)  # compile + warm-up
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  dt = float(np.median(times))
  return {"params": n_params, "batch": b, "seq_len": l, "devices": jax.device_count(),
          "platform": jax.devices()[0].platform, "step_s_median": dt,
          "step_s_min": float(np.min(times)), "tokens_per_s": b * l / dt,
          "model_flops_per_step": flops_model, "achieved_flops": flops_model / dt}


# The shapes MD4's own step was measured at (issue 18): layers, d_model, heads, mlp, vocab,
# batch x seq_len.  MD4 reached 26%, 20% and 40% MFU on them on this CPU.
SHAPES = {
    "quickstart": dict(num_layers=4, d_model=192, num_heads=4, mlp_dim=512, vocab=512,
                       batch=16, seq_len=128),
    "mid": dict(num_layers=4, d_model=192, num_heads=4, mlp_dim=512, vocab=4096, batch=32,
                seq_len=256),
    "large": dict(num_layers=8, d_model=512, num_heads=8, mlp_dim=1408, vocab=8192, batch=8,
                  seq_len=256),
}


def at_shape(cfg, shape: dict):
  cfg = cfg.copy_and_resolve_references()
  for k in ("num_layers", "d_model", "num_heads", "mlp_dim"):
    cfg.model[k] = shape[k]
  cfg.data.vocab_size, cfg.data.seq_len = shape["vocab"], shape["seq_len"]
  cfg.train.batch_size = shape["batch"]
  return cfg


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", default="configs/quickstart.py")
  ap.add_argument("--shapes", default="", help=f"comma list of {sorted(SHAPES)} (or 'all'):"
                  " the config at those model/batch shapes; empty: the config's own")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="a config override, e.g. model.scan_layers=True or model.dtype=bfloat16")
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--vocab_size", type=int, default=0, help="default: config.data.vocab_size")
  args = ap.parse_args()
  cfg = load_config(args.config)
  for item in args.set:
    key, _, value = item.partition("=")
    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
      node = node[p]
    old = node[leaf]
    node[leaf] = (value == "True") if isinstance(old, bool) else type(old)(value)
  names = list(SHAPES) if args.shapes == "all" else [s for s in args.shapes.split(",") if s]
  runs = {name: at_shape(cfg, SHAPES[name]) for name in names} or {"config": cfg}
  # the peak before and after the steps, the higher kept: a neighbour's load during one
  # measurement must not inflate MFU
  peak = mfu.measure_matmul()
  results = {name: measure(c, args.steps, args.vocab_size) for name, c in runs.items()}
  peak = max(peak, mfu.measure_matmul())
  for name, result in results.items():
    result.update(peak_flops=peak, mfu=result["achieved_flops"] / peak)
    print(f"{name}: {result['tokens_per_s']:.0f} tokens/s, step"
          f" {result['step_s_median'] * 1e3:.1f} ms, MFU {result['mfu']:.1%} of a measured"
          f" {peak / 1e9:.1f} GFLOP/s matmul peak")
  print(json.dumps({"config": args.config, "set": args.set, "peak_flops": peak,
                    "shapes": results}))


if __name__ == "__main__":
  main()
