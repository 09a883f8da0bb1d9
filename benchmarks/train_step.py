"""Train-step throughput and model FLOPs utilization at a recipe's shapes.

  python benchmarks/train_step.py [--config=configs/quickstart.py] [--steps=20]

MFU is measured against a matmul peak taken in the same run (a large float32
matmul on the same devices), so the ratio is meaningful on a noisy shared
machine.  Last line: one JSON object with tokens_per_s, mfu, peak_flops.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from dlm import losses, parallel, processes
from dlm.models import transformer
from dlm.train import optim, state as state_lib, step as step_lib


def load_config(path: str):
  import importlib.util
  file, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location("recipe", file)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg or None)


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
  """FLOP/s of a square float32 matmul, best of ``reps``."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 / best


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
  n_embed = vocab * model_cfg.d_model  # the embedding lookup is not a matmul
  # 6 N per token for the matmuls, plus attention scores and values (fwd 4 L d per layer, x3).
  flops_model = b * l * (6 * (n_params - n_embed)
                         + 12 * model_cfg.num_layers * l * model_cfg.num_heads * model_cfg.hd)
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
          "platform": jax.devices()[0].platform, "step_s_median": dt, "tokens_per_s": b * l / dt,
          "model_flops_per_step": flops_model, "achieved_flops": flops_model / dt}


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", default="configs/quickstart.py")
  ap.add_argument("--steps", type=int, default=20)
  ap.add_argument("--vocab_size", type=int, default=0, help="default: config.data.vocab_size")
  args = ap.parse_args()
  result = {"config": args.config, **measure(load_config(args.config), args.steps, args.vocab_size)}
  peak = matmul_peak()
  result.update(peak_flops=peak, mfu=result["achieved_flops"] / peak)
  print(f"{result['tokens_per_s']:.0f} tokens/s, step {result['step_s_median'] * 1e3:.1f} ms, "
        f"MFU {result['mfu']:.1%} of a measured {peak / 1e9:.1f} GFLOP/s matmul peak")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
