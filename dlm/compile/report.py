"""`dlm compile`: a recipe's train (or sample) step compiled for a TPU slice on a CPU host.

The real mesh, shardings, model, optimizer and step of ``dlm train`` are built
over the slice's devices (``topology.devices``; no chip attached), lowered with
abstract inputs (nothing is allocated) and compiled by libtpu.  From the
compiled program: per-device argument / output / temporary bytes (XLA's memory
analysis; donated inputs counted once), FLOPs and bytes accessed (its cost
analysis), and the collectives it contains.  The projection uses model FLOPs
(6 N D for training, Kaplan et al. 2020 eq. 2.1 with attention's 12 n_layer L d_attn
per token; 2 N D per sampler call) at a stated MFU:

  step_time = model_flops / (devices * peak_flops_per_device * mfu)

``fits``: total bytes <= (1 - margin) * HBM per device.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P

from dlm import parallel
from dlm.compile import topology
from dlm.data import inputs, tokenizer as tokenizer_lib
from dlm.errors import UserError
from dlm.models import loader, transformer
from dlm.train import mfu

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_COLLECTIVE_RE = re.compile(r"\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(")


def _model(config: ml_collections.ConfigDict) -> tuple[transformer.ModelConfig, Any]:
  vocab = int(config.data.vocab_size)
  # The mask id is a constant of the program: it changes no shape, byte or FLOP.
  return loader.build(config, vocab, tokenizer_lib.MASK_ID)


def _abstract(shape: tuple[int, ...], dtype: Any, sharding: Any) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


def lower_train(config: ml_collections.ConfigDict, mesh: Any, rules: Any):
  """(lowered train step, figures) for the config's train step over ``mesh``."""
  from dlm.train import loop
  tc = config.train
  loop.check_batch(tc, mesh, process_count=1)
  model_cfg, process = _model(config)
  if config.data.source == "grpo":  # the rollout stage's batch
    from dlm.train import grpo
    keys = grpo.batch_keys(config.grpo, float(config.loss.get("beta", 0.04)))
  else:
    keys = inputs.batch_keys(config.data)
  _, _, abstract, _, step, frozen = loop.make_train_step(config, model_cfg, process, mesh, rules,
                                                         keys)
  b, l = int(tc.batch_size), int(config.data.seq_len)
  row = parallel.batch_sharding(mesh, rules)
  floats = ("loss_mask", "prompt_mask", "advantages", "old_logp", "ref_logp")
  batch = {k: _abstract((b, l), jnp.float32 if k in floats else jnp.int32, row) for k in keys}
  n = transformer.count_params(abstract.params) + (transformer.count_params(frozen) if frozen else 0)
  figures = {"params": n, "trainable_params": transformer.count_params(abstract.params), "batch": b, "seq_len": l, "tokens_per_step": b * l,
             "model_flops_per_step": mfu.train_flops(model_cfg, n, b, l)}
  figures["input_bytes"] = parallel.bytes_per_device((abstract, batch, frozen))
  return step.lower(abstract, batch, *(() if frozen is None else (frozen,))), figures


def lower_sample(config: ml_collections.ConfigDict, mesh: Any, rules: Any):
  """(lowered sampler, figures): the whole jitted loop of ``config.sample.sampler`` (default
  ``llada``) exactly as ``dlm sample`` runs it over a mesh (``engine.program`` on a model
  placed by ``loader.sampling_shardings``: prompts over ``data``, parameters over ``fsdp`` and
  ``tensor``), its weights in the compute dtype; each step is one model call."""
  del rules  # sampling has its own: the training rules with prompts over `data` only
  from dlm.models import loader
  from dlm.sample import engine
  model_cfg, process = _model(config)
  sc = config.sample
  name = sc.get("sampler") or "llada"
  make = engine.resolve(name)
  l = int(sc.get("length", 0) or config.data.seq_len)
  prompt_len = int(sc.get("prompt_length", 0) or l // 4)
  gen = l - prompt_len
  steps = int(sc.steps)
  knobs = {"steps": steps} if "steps" in make.knobs else {}
  if make.length is not None:
    knobs[make.length] = gen
  full = engine.check_knobs(name, make, knobs)
  data = mesh.shape["data"]
  b = math.ceil(int(sc.num_samples) / data) * data  # rows split over `data`
  sampling_rules, param_sh = loader.sampling_shardings(model_cfg, config, mesh)
  graphdef, abstract_params, _ = transformer.param_logical_specs(model_cfg)
  params = jax.tree.map(lambda a, s: _abstract(a.shape, model_cfg.compute_dtype, s),
                        abstract_params, param_sh)
  ids = {"mask": tokenizer_lib.MASK_ID, "eos": tokenizer_lib.EOS_ID, "pad": tokenizer_lib.PAD_ID}
  model = loader.DiffusionLM(config=config, model_cfg=model_cfg, params=params, ids=ids,
                             tokenizer=None, apply=transformer.apply_fn(graphdef),
                             process=process, mesh=mesh, rules=sampling_rules,
                             decode_layout=False)
  fn = engine.program(model, name, make, full, batch=b, padded=False)
  row = NamedSharding(mesh, P("data", None))
  given = _abstract((b, l), jnp.int32, row)
  fixed = _abstract((b, l), jnp.bool_, row)
  rng = jax.eval_shape(lambda: jax.random.key(0))
  n = transformer.count_params(abstract_params)
  figures = {"params": n, "batch": b, "seq_len": l, "prompt_length": prompt_len,
             "gen_length": gen, "steps": steps, "sampler": name, "knobs": full,
             "param_dtype": str(jnp.dtype(model_cfg.compute_dtype)),
             "tokens_per_step": b * gen / steps,
             "model_flops_per_step": mfu.forward_flops(model_cfg, n, b, l)}
  figures["input_bytes"] = parallel.bytes_per_device((params, given, fixed))
  return fn.lower(params, rng, given, fixed, None), figures


def compile_report(config: ml_collections.ConfigDict, topology_name: str, *, what: str = "train",
                   mfu: float = 0.4, margin: float = 0.1) -> dict[str, Any]:
  """Compiles the config's step for the slice; the figures of the module docstring."""
  if what not in ("train", "sample"):
    raise UserError(f"--what={what!r} unknown; use 'train' or 'sample'")
  if not 0 < mfu <= 1 or not 0 <= margin < 1:
    raise UserError(f"need 0 < --mfu <= 1 and 0 <= --margin < 1, got {mfu}, {margin}")
  s = topology.parse(topology_name)
  devices = topology.devices(s)
  mesh = parallel.make_mesh(config.mesh, devices)
  rules = parallel.rules_from_config(config.mesh)
  t0 = time.time()
  lowered, fig = (lower_train if what == "train" else lower_sample)(config, mesh, rules)
  error = None
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:  # the TPU compiler refuses programs that cannot fit
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    compiled, error = None, str(e).strip().splitlines()[0]
  compile_s = time.time() - t0
  collectives = {name: 0 for name in COLLECTIVES}
  if compiled is not None:
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    for m in _COLLECTIVE_RE.finditer(compiled.as_text()):
      collectives[m.group(1)] += 1
    arg, out = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    alias, temp = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
    code = int(getattr(mem, "generated_code_size_in_bytes", 0))
  else:  # what the compiler said it needed: a lower bound on the total
    cost, arg, out, alias, code = {}, fig["input_bytes"], 0, 0, 0
    m = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", error)
    temp = int(float(m.group(1)) * 2 ** (10 * "KMGT".index(m.group(2)) + 10)) if m else 0
  total = arg + out - alias + temp + code
  n_dev = len(devices)
  hbm = s.chip.hbm_bytes * s.num_chips // n_dev
  peak = s.chip.peak_bf16_flops * s.num_chips / n_dev
  step_s = fig["model_flops_per_step"] / (n_dev * peak * mfu)
  return {
      "what": what, "topology": s.topology, "slice": s.accelerator_type, "devices": n_dev,
      "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape),
      **fig,
      "argument_bytes": arg, "output_bytes": out, "alias_bytes": alias, "temp_bytes": temp,
      "code_bytes": code, "total_bytes": total, "hbm_bytes": hbm,
      "hbm_fraction": round(total / hbm, 4), "margin": margin,
      "fits": error is None and total <= (1 - margin) * hbm,
      "compile_error": error,
      "flops_per_device": float(cost.get("flops", 0.0)),
      "bytes_accessed_per_device": float(cost.get("bytes accessed", 0.0)),
      "collectives": collectives,
      "mfu": mfu, "peak_flops_per_device": peak,
      "projected_step_s": step_s,
      "projected_tokens_per_s": fig["tokens_per_step"] / step_s,
      "compile_seconds": round(compile_s, 2),
  }


def format_report(r: dict[str, Any]) -> str:
  gib = lambda b: f"{b / 2**30:.2f} GiB"
  lines = [
      f"{r['what']} step of a {r['params'] / 1e6:.1f}M-parameter model on {r['slice']}"
      f" ({r['topology']}, {r['devices']} x {r['device_kind']}), mesh {r['mesh']}",
      f"  batch {r['batch']} x {r['seq_len']} tokens; compiled in {r['compile_seconds']} s",
      *([f"  sampler {r['sampler']} ({', '.join(f'{k}={v!r}' for k, v in r['knobs'].items())}),"
         f" prompt {r['prompt_length']} + {r['gen_length']} generated; weights"
         f" {r['param_dtype']}"] if r["what"] == "sample" else []),
      "  per device:",
      f"    arguments   {gib(r['argument_bytes'])}",
      f"    outputs     {gib(r['output_bytes'])} ({gib(r['alias_bytes'])} of them donated inputs)",
      f"    temporaries {gib(r['temp_bytes'])}",
      f"    total       {gib(r['total_bytes'])} of {gib(r['hbm_bytes'])} HBM"
      f" ({100 * r['hbm_fraction']:.1f}%): "
      + (f"fits with a {100 * r['margin']:.0f}% margin" if r["fits"]
         else f"DOES NOT FIT with a {100 * r['margin']:.0f}% margin"),
      f"    FLOPs {r['flops_per_device']:.3e}, bytes accessed {r['bytes_accessed_per_device']:.3e}"
      " (compiled cost analysis; a scanned layer counts once)",
      *([f"    the TPU compiler refused it: {r['compile_error']}"] if r["compile_error"] else []),
      "  collectives: " + ", ".join(f"{k} {v}" for k, v in r["collectives"].items()),
      f"  projected at {100 * r['mfu']:.0f}% MFU: {r['projected_step_s'] * 1e3:.1f} ms per step,"
      f" {r['projected_tokens_per_s']:,.0f} tokens/s",
  ]
  return "\n".join(lines)
