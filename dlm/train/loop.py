"""The training driver: mesh, data, model, sharded state, resume, steps, eval, checkpoints."""

from __future__ import annotations

import functools
import json
import pathlib
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from tqdm.auto import tqdm

from dlm import distributed, losses, parallel, processes
from dlm.data import inputs
from dlm.errors import UserError
from dlm.eval import elbo
from dlm.models import transformer
from dlm.train import checkpoint, metrics as metrics_lib, optim, state as state_lib, step as step_lib

# Config entries that fix the shapes of what is saved in a workdir.
_SHAPE_KEYS = ("model", "process", "data.vocab_size", "data.source")


def _get(d: dict[str, Any], dotted: str) -> Any:
  for part in dotted.split("."):
    d = d.get(part, {}) if isinstance(d, dict) else {}
  return d


def check_compatible(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """Refuses (before touching anything) to train over a run of a different model."""
  path = workdir / checkpoint.CONFIG_FILE
  if not path.exists():
    return
  saved, new = json.loads(path.read_text()), config.to_dict()
  for key in _SHAPE_KEYS:
    a, b = _get(saved, key), _get(new, key)
    if a != b:
      if isinstance(a, dict) and isinstance(b, dict):
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        detail = ", ".join(f"{key}.{k}: {a.get(k)!r} saved vs {b.get(k)!r} now" for k in diff)
      else:
        detail = f"{key}: {a!r} saved vs {b!r} now"
      raise UserError(
          f"workdir {workdir} holds a run of a different model ({detail}); use a new --workdir"
          " or the config it was trained with")


def build_model(config: ml_collections.ConfigDict, tokenizer: Any):
  model_cfg = transformer.ModelConfig.from_config(config.model, vocab_size=tokenizer.vocab_size)
  process = processes.make_process(config.process, vocab_size=tokenizer.vocab_size,
                                   mask_id=tokenizer.mask_id)
  return model_cfg, process


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
  """Trains (resuming from ``workdir`` if it holds a checkpoint); returns the final metrics."""
  workdir = pathlib.Path(workdir)
  check_compatible(workdir, config)
  workdir.mkdir(parents=True, exist_ok=True)
  is_main = jax.process_index() == 0

  # --- mesh ---
  mesh = parallel.make_mesh(config.mesh)
  rules = parallel.rules_from_config(config.mesh)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.train.batch_size % shards or config.train.batch_size % jax.process_count():
    raise UserError(
        f"train.batch_size={config.train.batch_size} must be divisible by the {shards}"
        f" data-parallel devices and the {jax.process_count()} processes; change it")

  # --- data: process 0 trains the tokenizer and fills the cache, the others then load it ---
  if not is_main:
    distributed.barrier("dlm_prepare")
  data = inputs.make_train_input(
      config.data, workdir, batch_size=config.train.batch_size // jax.process_count(),
      seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count(),
      max_val_rows=int(config.eval.max_rows))
  if is_main:
    distributed.barrier("dlm_prepare")
  tok = data.tokenizer
  if is_main:
    checkpoint.write_config(workdir, config.to_dict())

  # --- model, process, loss, optimizer ---
  model_cfg, process = build_model(config, tok)
  total_steps = int(config.train.steps)
  tx = optim.make_optimizer(config.optim, total_steps)
  graphdef, abstract, shardings = state_lib.state_shardings(model_cfg, tx, mesh, rules)
  apply = transformer.apply_fn(graphdef)
  loss_fn = functools.partial(losses.get_loss(config.loss.name), model=apply, process=process,
                              config=config.loss)

  # --- state: resume or init ---
  mngr = checkpoint.manager(workdir, max_to_keep=int(config.train.max_to_keep))
  it = data.iterator
  if mngr.latest_step() is not None:
    start, state, data_state = checkpoint.restore(mngr, abstract)
    it.set_state(data_state)
    if is_main:
      print(f"resumed from {workdir}/checkpoints/{start}")
  else:
    state = state_lib.init_state(model_cfg, tx, config.seed, shardings)
    start = 0
  if is_main:
    n = transformer.count_params(state.params)
    print(f"model: {n / 1e6:.2f}M parameters, vocab {tok.vocab_size}, process {config.process.name},"
          f" mesh {dict(mesh.shape)}, rows of {config.data.seq_len} tokens from"
          f" {config.data.source}" + (f" (Python {data.meta['python_version']}, "
                                      f"{data.meta['train_rows']} train rows)"
                                      if "python_version" in data.meta else ""))

  # --- steps ---
  train_step = step_lib.jit_train_step(mesh, rules, shardings, batch_keys=data.batch_keys,
                                       loss_fn=loss_fn, tx=tx,
                                       lr_fn=optim.learning_rate(config.optim, total_steps),
                                       base_rng=jax.random.key(config.seed))
  eval_step = step_lib.jit_eval_step(mesh, rules, shardings.params, model=apply, process=process)
  put = functools.partial(parallel.global_batch, mesh=mesh, rules=rules)
  put_eval = functools.partial(parallel.replicated_batch, mesh=mesh, rules=rules)
  piece_bytes = tok.piece_bytes()

  def run_eval(params: Any, max_rows: int, passes: int) -> dict[str, float]:
    rows = data.val_rows[:max_rows] if max_rows else data.val_rows
    return elbo.evaluate(eval_step, params, rows, batch_size=int(config.eval.batch_size),
                         piece_bytes=piece_bytes, num_passes=passes, seed=int(config.eval.seed),
                         put=put_eval, progress=lambda _: watchdog.kick())

  writer = metrics_lib.MetricsWriter(workdir)
  tokens_per_step = config.train.batch_size * config.data.seq_len
  bar = tqdm(total=total_steps, initial=start, disable=not is_main, desc="train", unit="step",
             dynamic_ncols=True)
  t_start, t_last, last_step = time.time(), time.time(), start
  last: dict[str, Any] = {}
  step = start
  stopped_early = False
  # Multi-process: a step blocked on a dead peer becomes an exit with a message.
  hang_s = float(config.train.get("hang_timeout_s", 45.0)) if jax.process_count() > 1 else 0.0
  watchdog = distributed.Watchdog(hang_s)
  try:
    while step < total_steps:
      batch = put(next(it))
      state, m = train_step(state, batch)
      if step == start:
        jax.block_until_ready(state.step)  # compiled and run once: now watch for hangs
        watchdog.start()
      step += 1
      watchdog.kick()
      bar.update(1)
      if step % config.train.log_every == 0 or step == total_steps:
        m = jax.device_get(m)
        now = time.time()
        m["tokens_per_s"] = tokens_per_step * (step - last_step) / max(now - t_last, 1e-9)
        t_last, last_step = now, step
        if not np.isfinite(m["loss"]):
          raise FloatingPointError(f"loss is {m['loss']} at step {step}; lower optim.lr")
        writer.write(step, {k: m[k] for k in ("loss", "grad_norm", "lr", "tokens_per_s")})
        bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m['tokens_per_s']:.0f}")
        last = m
      if step % config.train.eval_every == 0 or step == total_steps:
        ev = run_eval(state.params, int(config.eval.periodic_rows), 1)
        writer.write(step, {"bits_per_byte": ev["bits_per_byte"],
                            "nelbo_per_token": ev["nelbo_per_token"]}, prefix="val_")
        if is_main:
          bar.write(f"step {step}: val bits/byte {ev['bits_per_byte']:.4f}")
      limit = float(config.train.time_limit_s)
      stopped_early = limit > 0 and time.time() - t_start > limit and step < total_steps
      if step % config.train.checkpoint_every == 0 or step == total_steps or stopped_early:
        checkpoint.save(mngr, step, state, it.get_state())
      watchdog.kick()
      if stopped_early:
        if is_main:
          bar.write(f"train.time_limit_s={limit:g} reached at step {step}; saved, stopping")
        break
  finally:
    bar.close()
    mngr.wait_until_finished()
    watchdog.stop()
    writer.close()
  result = {"step": step, "loss": float(last.get("loss", float("nan"))),
            "train_seconds": time.time() - t_start, "stopped_early": stopped_early}
  return result
