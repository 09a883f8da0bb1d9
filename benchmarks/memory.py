"""Per-device bytes of parameters + optimizer state as FSDP grows, without training.

  python benchmarks/memory.py [--fsdp=1,2,4,8] [--compile]

Builds a ~100M-parameter model on 8 (fake, on CPU) devices with meshes
data x fsdp = 8 and reads (1) the bytes each device holds from the state's
shardings (``jax.eval_shape``: nothing is allocated) and, with ``--compile``,
(2) the compiled train step's memory analysis.  Last line: one JSON object.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from dlm import losses, parallel, processes  # noqa: E402
from dlm.models import transformer  # noqa: E402
from dlm.train import optim, state as state_lib, step as step_lib  # noqa: E402

MODEL = transformer.ModelConfig(vocab_size=8192, d_model=768, num_layers=12, num_heads=12,
                                mlp_dim=3072)
OPTIM = ml_collections.ConfigDict({"name": "adamw", "lr": 1e-3, "warmup_steps": 10,
                                   "final_lr_frac": 0.1, "b1": 0.9, "b2": 0.95, "eps": 1e-8,
                                   "weight_decay": 0.1, "clip_norm": 1.0})


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--fsdp", default="1,2,4,8")
  ap.add_argument("--compile", action="store_true", help="also compile the train step (slow)")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq_len", type=int, default=256)
  args = ap.parse_args()
  n = jax.device_count()
  tx = optim.make_optimizer(OPTIM, 1000)
  process = processes.make_process({"name": "masked", "schedule": {"name": "linear"}},
                                   vocab_size=MODEL.vocab_size, mask_id=MODEL.vocab_size - 1)
  rows = []
  for f in (int(x) for x in args.fsdp.split(",")):
    mesh = parallel.make_mesh({"data": n // f, "fsdp": f, "tensor": 1})
    rules = parallel.DEFAULT_RULES
    graphdef, abstract, shardings = state_lib.state_shardings(MODEL, tx, mesh, rules)
    row = {"fsdp": f, "data": n // f,
           "param_bytes_per_device": parallel.bytes_per_device(abstract.params),
           "opt_bytes_per_device": parallel.bytes_per_device(abstract.opt_state)}
    row["state_bytes_per_device"] = row["param_bytes_per_device"] + row["opt_bytes_per_device"]
    if args.compile:
      loss_fn = functools.partial(losses.get_loss("nelbo_count"),
                                  model=transformer.apply_fn(graphdef), process=process, config={})
      step = step_lib.jit_train_step(mesh, rules, shardings, loss_fn=loss_fn, tx=tx,
                                     lr_fn=optim.learning_rate(OPTIM, 1000))
      batch = {"tokens": jax.ShapeDtypeStruct((args.batch, args.seq_len), jnp.int32,
                                              sharding=parallel.batch_sharding(mesh, rules))}
      mem = step.lower(abstract, batch).compile().memory_analysis()
      row.update(compiled_argument_bytes=int(mem.argument_size_in_bytes),
                 compiled_output_bytes=int(mem.output_size_in_bytes),
                 compiled_temp_bytes=int(mem.temp_size_in_bytes))
    rows.append(row)
    print(f"fsdp={f}: params {row['param_bytes_per_device'] / 2**20:.1f} MiB + optimizer"
          f" {row['opt_bytes_per_device'] / 2**20:.1f} MiB per device"
          + (f"; compiled step arguments {row['compiled_argument_bytes'] / 2**20:.1f} MiB,"
             f" temporaries {row['compiled_temp_bytes'] / 2**20:.1f} MiB" if args.compile else ""),
          flush=True)
  base = rows[0]["state_bytes_per_device"]
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract.params))
  print(json.dumps({"params": n_params, "devices": n, "rows": rows,
                    "state_ratio_vs_first": [r["state_bytes_per_device"] / base for r in rows]}))


if __name__ == "__main__":
  main()
