"""The training driver: mesh, data, model, sharded state, resume, steps, eval, checkpoints."""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
import shutil
import time
from typing import Any

import jax
import ml_collections
from tqdm.auto import tqdm

from dlm import distributed, lock, losses, parallel
from dlm.data import inputs, pipeline
from dlm.errors import UserError
from dlm.eval import elbo
from dlm.models import loader, lora, transformer
from dlm import checkpoint
from dlm.train import grpo, metrics as metrics_lib, mfu, optim, preemption
from dlm.train import state as state_lib, step as step_lib

# Config entries that fix the shapes of what is saved in a workdir.
_SHAPE_KEYS = ("model", "process", "data.vocab_size", "data.source", "data.seq_len", "lora.rank",
               "lora.targets")


def _get(d: dict[str, Any], dotted: str) -> Any:
  for part in dotted.split("."):
    d = d.get(part, {}) if isinstance(d, dict) else {}
  return d


def _model_fields(model: Any) -> Any:
  """config.model with defaults filled in, without the execution choices (kernel, scanned or
  unrolled layers, remat: any of them resumes a run)."""
  if not isinstance(model, dict):
    return model
  defaults = {f.name: f.default for f in dataclasses.fields(transformer.ModelConfig)
              if f.default is not dataclasses.MISSING}
  out = {**defaults, **model}
  for how in ("attention", "scan_layers", "remat"):  # how it runs, not what is saved
    out.pop(how, None)
  return out


# Model fields that change how parameters are used, not what they are: a warm start may change
# them (adapting an autoregressive model into a diffusion one: its mask and logit shift).
_USE_FIELDS = ("mask_kind", "block_size", "anneal_steps", "shift_logits", "pad_positions")


def _param_fields(model: Any) -> Any:
  fields = _model_fields(model)
  return {k: v for k, v in fields.items() if k not in _USE_FIELDS} if isinstance(
      fields, dict) else fields


def check_compatible(workdir: pathlib.Path, config: ml_collections.ConfigDict) -> None:
  """Refuses (before touching anything) to train over a run of a different model."""
  path = workdir / checkpoint.CONFIG_FILE
  if not path.exists():
    return
  # compared, never resolved: the recipe given now names what runs
  saved, new = checkpoint.read_config(workdir, trust_config_code=True), config.to_dict()
  for key in _SHAPE_KEYS:
    a, b = _get(saved, key), _get(new, key)
    if key == "model":
      a, b = _model_fields(a), _model_fields(b)
    if a != b:
      if isinstance(a, dict) and isinstance(b, dict):
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        detail = ", ".join(f"{key}.{k}: {a.get(k)!r} saved vs {b.get(k)!r} now" for k in diff)
      else:
        detail = f"{key}: {a!r} saved vs {b!r} now"
      raise UserError(
          f"workdir {workdir} holds a run of a different model ({detail}); use a new --workdir"
          " or the config it was trained with")


def _warm_start_params(init_from: str | pathlib.Path, config: ml_collections.ConfigDict,
                       abstract_params: Any) -> tuple[int, Any]:
  """``--init_from=DIR``: the parameters of DIR's newest checkpoint, checked against this model."""
  src = pathlib.Path(init_from)
  if not (src / checkpoint.CONFIG_FILE).exists():
    raise UserError(f"--init_from={init_from} is not a dlm workdir (no {checkpoint.CONFIG_FILE});"
                    " point it at a trained run's --workdir")
  saved, new = checkpoint.read_config(src, trust_config_code=True), config.to_dict()
  for key in ("model", "data.vocab_size"):
    if _param_fields(_get(saved, key)) != _param_fields(_get(new, key)):
      raise UserError(f"--init_from={init_from} holds a different model ({key}: {_get(saved, key)!r}"
                      f" there vs {_get(new, key)!r} here); use its config.model and data.vocab_size")
  try:
    return checkpoint.restore_params(src, abstract_params)
  except FileNotFoundError as e:
    raise UserError(f"--init_from={init_from}: {e}") from None


# The tokenizer files a warm start copies: a dlm run's sentencepiece model, or an imported
# model's Hugging Face files (tokenizer.json and its config: special tokens, chat template).
_TOKENIZER_FILES = (pipeline.TOKENIZER_FILE, "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json")


def _copy_tokenizer(init_from: str | pathlib.Path, workdir: pathlib.Path) -> None:
  """A warm start keeps its source's tokenizer: token ids must mean the same."""
  src_dir = pathlib.Path(init_from)
  if not (src_dir / checkpoint.CONFIG_FILE).exists():
    raise UserError(f"--init_from={init_from} is not a dlm workdir (no {checkpoint.CONFIG_FILE});"
                    " point it at a trained run's --workdir")
  names = [n for n in _TOKENIZER_FILES if (src_dir / n).is_file()]
  if not any(n in names for n in _TOKENIZER_FILES[:2]):
    raise UserError(f"--init_from={init_from} has no {pipeline.TOKENIZER_FILE} (or tokenizer.json)"
                    "; point it at a trained run's --workdir or a converted one")
  for name in names:
    src, dst = src_dir / name, workdir / name
    if dst.exists():
      if dst.read_bytes() != src.read_bytes():
        raise UserError(f"{dst} differs from the tokenizer of --init_from={init_from}; use a new"
                        " --workdir")
      continue
    tmp = dst.with_name(f".{name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _tokenizer_file(workdir: pathlib.Path) -> pathlib.Path:
  """The tokenizer file a checkpoint's meta item carries."""
  spm = workdir / pipeline.TOKENIZER_FILE
  return spm if spm.is_file() or not (workdir / "tokenizer.json").is_file() else (
      workdir / "tokenizer.json")


_HOW_FIELDS = ("attention", "scan_layers", "remat")  # how a model runs: the recipe's choice


def inherit_from_source(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                        init_from: str | pathlib.Path | None) -> ml_collections.ConfigDict:
  """``config.init.inherit`` (dotted keys, e.g. "model", "process", "hf"): taken from the
  config of ``--init_from`` (else of the workdir's own run, when resuming), so that a
  fine-tuning recipe fits any dlm or converted checkpoint.  The recipe keeps its model's
  execution fields (attention kernel, scanned layers, remat) and ``init.keep_model_fields``
  (an adaptation's mask and logit shift).  A block-diffusion source
  brings its loss (the block NELBO must use its blocks).  Values are read as data: a
  ``module:function`` there is refused (``checkpoint.read_config``)."""
  keys = list(config.get("init", {}).get("inherit", []) or [])
  src = pathlib.Path(init_from) if init_from else workdir
  if not keys or not (src / checkpoint.CONFIG_FILE).is_file():
    return config
  try:
    saved = checkpoint.read_config(src)
  except UserError as e:
    raise UserError(f"--init_from={src}: {e}") from None
  out = config.to_dict()
  for key in keys:
    value = _get(saved, key)
    if value == {} and key not in saved and "." not in key:
      continue  # the source has no such section (e.g. "hf" of a dlm run)
    *parents, last = key.split(".")
    node = out
    for part in parents:
      node = node.setdefault(part, {})
    if key == "model" and isinstance(node.get("model"), dict):
      keep = _HOW_FIELDS + tuple(config.init.get("keep_model_fields", ()) or ())
      value = {**value, **{k: node["model"][k] for k in keep if k in node["model"]}}
    node[last] = value
  if "model" in keys and _get(saved, "model.mask_kind") == "bd3" and "loss" in saved:
    out["loss"] = saved["loss"]
  mask = config.init.get("mask_id")
  if mask is not None and isinstance(out.get("hf"), dict) and out["hf"]["ids"].get("mask") is None:
    # an autoregressive import has no mask token: the recipe names one (-1: the last id)
    vocab = int(_get(out, "data.vocab_size"))
    out["hf"]["ids"]["mask"] = vocab - 1 if int(mask) < 0 else int(mask)
  return ml_collections.ConfigDict(out)


def _recorded_source(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
  """A warm-started run resumed: ``config.init.source`` / ``source_step`` (the checkpoint its
  first run started from: a LoRA run's frozen base, a GRPO run's reference) as recorded."""
  if not (workdir / checkpoint.CONFIG_FILE).is_file():
    return
  saved = checkpoint.read_config(workdir)
  if _get(saved, "init.source"):
    _set_source(config, _get(saved, "init.source"), _get(saved, "init.source_step"))


def _set_source(config: ml_collections.ConfigDict, source: str, step: int) -> None:
  with config.unlocked():  # a recipe from the command line is locked
    if "init" not in config:
      config.init = ml_collections.ConfigDict()
    config.init.source, config.init.source_step = str(source), int(step)


def source_params(config: ml_collections.ConfigDict, workdir: pathlib.Path,
                  init_from: str | pathlib.Path | None, resuming: bool, abstract: Any,
                  what: str) -> Any:
  """The parameters of the checkpoint a run started from (``abstract``'s tree): ``--init_from``'s
  newest on a new run, recorded as ``config.init.source`` / ``source_step`` in the workdir's
  config.json; the recorded one when resuming.  ``what`` names the use in errors."""
  source, step = config.get("init", {}).get("source"), config.get("init", {}).get("source_step")
  if resuming or not init_from:
    if not source:
      raise UserError(f"{what} needs the trained model it starts from: pass --init_from=DIR (a"
                      " dlm or converted workdir)")
    if not (pathlib.Path(source) / checkpoint.CONFIG_FILE).is_file():
      raise UserError(f"{workdir} started from {source}, which is gone; restore it there ({what}"
                      " needs it)")
    try:
      _, params = checkpoint.restore_params(source, abstract, int(step))
    except FileNotFoundError as e:
      raise UserError(f"{source}: {e}; restore its checkpoint {step} ({what} needs it)") from None
  else:
    step, params = _warm_start_params(init_from, config, abstract)
    source = str(pathlib.Path(init_from).resolve())
  _set_source(config, source, step)
  if jax.process_index() == 0:
    checkpoint.write_config(workdir, config.to_dict())
  return params


def _rollouts(config: ml_collections.ConfigDict, data: Any, model_cfg: Any, process: Any,
              apply: Any, mesh: Any, rules: Any, shardings: Any, frozen: Any,
              param_sh: Any, put: Any, workdir: pathlib.Path, init_from: Any,
              resuming: bool, abstract: Any) -> grpo.Rollouts:
  """GRPO's batch source over this run's model: the sampling engine on the training mesh and
  parameters, the reference model (beta > 0) kept as d1 does: a LoRA run's base (adapters
  off), else the checkpoint the run started from (else its initialization)."""
  tok = data.tokenizer
  ids = (dict(config.hf.ids) if "hf" in config else
         {"mask": tok.mask_id, "eos": tok.eos_id, "pad": tok.pad_id, "bos": tok.bos_id})
  model = loader.DiffusionLM(config=config, model_cfg=model_cfg, params=None, ids=ids,
                             tokenizer=tok, apply=apply, process=process, mesh=mesh, rules=rules,
                             keep_sampling_params=False)  # new weights every rollout
  logp = grpo.logp_fn(apply, int(process.mask_id), float(config.loss.get("p_mask_prompt", 0.15)),
                      param_sh, mesh, rules, grpo.BUFFER_KEYS + ("mask_seed",))
  kept: list[Any] = []

  def ref_params() -> Any:
    if not kept:
      if frozen is not None:
        zeros = jax.tree.map(lambda a: jax.numpy.zeros(a.shape, a.dtype, device=a.sharding),
                             abstract.params)
        kept.append(lora.combine(frozen, zeros))
      elif init_from or config.get("init", {}).get("source"):
        kept.append(source_params(config, workdir, init_from, resuming, abstract.params,
                                  "GRPO's reference model"))
      else:  # trained from scratch: the reference is the initialization (same seed)
        tx = optim.make_optimizer(config.optim, int(config.train.steps))
        kept.append(state_lib.init_state(model_cfg, tx, config.seed, shardings).params)
    return kept[0]

  train, val = data.prompts
  return grpo.Rollouts(config, prompts=data.iterator, train_prompts=train, val_prompts=val,
                       model=model, logp_fn=logp, put=put, ref_params=ref_params)


def make_train_step(config: ml_collections.ConfigDict, model_cfg: transformer.ModelConfig,
                    process: Any, mesh: Any, rules: Any, batch_keys: tuple[str, ...]):
  """(tx, graphdef, abstract TrainState, its shardings, jitted train step, abstract frozen
  params) of the config; the last is None unless the model has LoRA adapters (the step then
  takes the frozen base third)."""
  tc = config.train
  total_steps = int(tc.steps)
  ema_decay = float(tc.get("ema_decay", 0.0))
  tx = optim.make_optimizer(config.optim, total_steps)
  graphdef, abstract, shardings = state_lib.state_shardings(model_cfg, tx, mesh, rules,
                                                            ema=ema_decay > 0)
  frozen, frozen_sh = (state_lib.frozen_shardings(model_cfg, mesh, rules) if model_cfg.lora_rank
                       else (None, None))
  loss = losses.get_loss(config.loss.name)
  losses.check_process(config.loss.name, process, loss)  # one line naming both, before a step
  loss_fn = functools.partial(loss, model=transformer.apply_fn(graphdef), process=process,
                              config=config.loss)
  step = step_lib.jit_train_step(mesh, rules, shardings, batch_keys=batch_keys, loss_fn=loss_fn,
                                 tx=tx, lr_fn=optim.learning_rate(config.optim, total_steps),
                                 microbatches=int(tc.get("microbatches", 1)), ema_decay=ema_decay,
                                 frozen_shardings=frozen_sh)
  return tx, graphdef, abstract, shardings, step, frozen


def check_batch(tc: ml_collections.ConfigDict, mesh: Any, process_count: int) -> None:
  """train.batch_size splits into microbatches, each over the data-parallel devices."""
  microbatches = int(tc.get("microbatches", 1))
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if microbatches < 1 or tc.batch_size % microbatches:
    raise UserError(f"train.microbatches={microbatches} must be >= 1 and divide"
                    f" train.batch_size={tc.batch_size}; change one of them")
  per_micro = tc.batch_size // microbatches
  if shards % process_count:
    raise UserError(f"the mesh's data x fsdp = {shards} devices must be a multiple of the"
                    f" {process_count} processes: each process feeds its own rows (keep"
                    " tensor parallelism within a host, e.g. --config.mesh.data=-1)")
  if per_micro % shards or tc.batch_size % process_count:
    raise UserError(
        f"train.batch_size={tc.batch_size} / train.microbatches={microbatches} must be divisible"
        f" by the {shards} data-parallel devices, and train.batch_size by the"
        f" {process_count} processes; change them")


def check_blocks(config: ml_collections.ConfigDict) -> None:
  """A BD3-LM model's blocks tile every row, and its loss uses the same blocks."""
  block = _bd3_block_size(config.model)
  if not block:
    return
  seq_len = int(config.data.seq_len)
  if seq_len % block:
    raise UserError(f"model.block_size={block} does not divide data.seq_len={seq_len}; pick a"
                    " divisor (e.g. --config.model.block_size=4 with --config.loss.block_size=4)")
  if config.loss.get("name") == "bd3_nelbo" and int(config.loss.get("block_size", 0)) != block:
    raise UserError(f"loss.block_size={config.loss.get('block_size')} != model.block_size="
                    f"{block}: set both to the same block")


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
          init_from: str | pathlib.Path | None = None) -> dict[str, Any]:
  """Trains (resuming from ``workdir`` if it holds a checkpoint); returns the final metrics.

  ``init_from``: a trained workdir whose newest parameters start a new run
  (optimizer, step and data order start afresh); ignored when resuming.
  """
  workdir = pathlib.Path(workdir)
  config = inherit_from_source(config, workdir, init_from)
  check_train_config(config)
  check_compatible(workdir, config)
  _recorded_source(config, workdir)
  if lora.settings(config) and not init_from and not config.get("init", {}).get("source"):
    raise UserError("LoRA (lora.rank > 0) adapts a trained model: pass --init_from=DIR (a dlm or"
                    " converted workdir), whose weights stay frozen")
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UserError(f"cannot create --workdir={workdir} ({e.strerror}); pick a writable"
                    " location") from None
  if not os.access(workdir, os.W_OK | os.X_OK):
    raise UserError(f"--workdir={workdir} is not writable; fix its permissions or pick another")
  if jax.process_index() != 0:  # process 0 holds the writer lock for the job
    return _train(config, workdir, init_from)
  with lock.hold(workdir, "dlm train"):
    return _train(config, workdir, init_from)


def check_train_config(config: ml_collections.ConfigDict) -> None:
  """The loop's counts and periods, checked before anything is written."""
  tc = config.train
  for key in ("steps", "log_every", "eval_every", "checkpoint_every", "batch_size",
              "max_to_keep"):
    if key not in tc:
      continue
    value = tc[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise UserError(f"train.{key}={value!r} must be an integer >= 1; fix --config.train.{key}")
  profile_range(tc.get("profile_steps", ""))
  if not float(tc.get("peak_flops", 0.0) or 0.0) >= 0:
    raise UserError(f"train.peak_flops={tc.peak_flops!r} must be >= 0 (0 = measure a matmul)")
  if not float(tc.get("time_limit_s", 0.0)) >= 0:
    raise UserError(f"train.time_limit_s={tc.time_limit_s!r} must be >= 0 (0 = no limit)")
  seq_len = config.data.get("seq_len")
  if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
    raise UserError(f"data.seq_len={seq_len!r} must be an integer >= 1; fix --config.data.seq_len")
  if config.data.get("source") == "grpo":
    grpo.check(config)


def _train(config: ml_collections.ConfigDict, workdir: pathlib.Path,
           init_from: str | pathlib.Path | None) -> dict[str, Any]:
  is_main = jax.process_index() == 0
  tc = config.train
  ema_decay = float(tc.get("ema_decay", 0.0))
  max_bad = int(tc.get("max_nonfinite_in_a_row", 10))
  if not 0.0 <= ema_decay < 1.0:
    raise UserError(f"train.ema_decay={ema_decay} must be in [0, 1) (0 turns EMA off)")
  resuming = (workdir / checkpoint.CHECKPOINTS).is_dir() and any(
      p.name.isdigit() for p in (workdir / checkpoint.CHECKPOINTS).iterdir())
  if init_from and not resuming and is_main:
    _copy_tokenizer(init_from, workdir)

  # --- mesh ---
  mesh = parallel.make_mesh(config.mesh)
  rules = parallel.rules_from_config(config.mesh)
  check_batch(tc, mesh, jax.process_count())
  check_blocks(config)

  data_is_grpo = config.data.source == "grpo"
  # --- data: process 0 trains the tokenizer and fills the cache, the others then load it ---
  if not is_main:
    distributed.barrier("dlm_prepare")
  data = inputs.make_train_input(
      config.data, workdir, batch_size=tc.batch_size // jax.process_count(),
      seed=config.seed, process_index=jax.process_index(), process_count=jax.process_count(),
      max_val_rows=int(config.eval.max_rows),
      ids=dict(config.hf.ids) if "hf" in config else None,
      group_size=int(config.grpo.num_generations) if data_is_grpo else 1)
  if is_main:
    distributed.barrier("dlm_prepare")
  tok = data.tokenizer
  if is_main:
    checkpoint.write_config(workdir, config.to_dict())
  meta = checkpoint.run_meta(config.to_dict(), _tokenizer_file(workdir))

  # --- model, process, loss, optimizer ---
  model_cfg, process = loader.build(config, tok.vocab_size, tok.mask_id)
  total_steps = int(tc.steps)
  batch_keys = data.batch_keys
  if data_is_grpo:
    with config.unlocked():
      config.loss.mask_id = int(process.mask_id)  # the loss masks with the model's own id
    batch_keys = grpo.batch_keys(config.grpo, float(config.loss.get("beta", 0.04)))
  tx, graphdef, abstract, shardings, train_step, frozen_abstract = make_train_step(
      config, model_cfg, process, mesh, rules, batch_keys)
  apply = transformer.apply_fn(graphdef)
  frozen = None  # LoRA: the base parameters, never updated nor saved here
  # the whole model's parameter shardings (a LoRA run's: base + adapters), for eval and rollouts
  full_sh = shardings.params if frozen_abstract is None else lora.combine(
      jax.tree.map(lambda a: a.sharding, frozen_abstract), shardings.params)
  if frozen_abstract is not None:
    frozen = source_params(config, workdir, init_from, resuming, frozen_abstract, "LoRA")
    meta = checkpoint.run_meta(config.to_dict(), _tokenizer_file(workdir))  # with its base

  # --- state: resume (falling back past unreadable checkpoints), warm start, or init ---
  mngr, start, state, data_state = checkpoint.resume(
      workdir, abstract, max_to_keep=int(tc.max_to_keep), keep_best=bool(tc.get("keep_best", True)))
  it = data.iterator
  put = functools.partial(parallel.global_batch, mesh=mesh, rules=rules)
  rollouts = None
  if data_is_grpo:  # the batch source: rollouts of the current policy; it is what is checkpointed
    rollouts = _rollouts(config, data, model_cfg, process, apply, mesh, rules, shardings, frozen,
                         full_sh, put, workdir, init_from, start is not None, abstract)
    it = rollouts
  if start is not None:
    it.set_state(data_state)
    if is_main:
      print(f"resumed from {workdir}/checkpoints/{start}"
            + (f" (--init_from={init_from} ignored)" if init_from else ""))
  elif frozen is not None:  # LoRA: fresh adapters on the frozen base
    state = state_lib.warm_start(state_lib.init_adapters(model_cfg, config.seed, shardings.params),
                                 tx, config.seed, shardings)
    start = 0
    if is_main:
      print(f"LoRA adapters (rank {model_cfg.lora_rank}, alpha {model_cfg.lora_alpha:g}) on the"
            f" frozen base {config.init.source}/checkpoints/{config.init.source_step}")
  elif init_from:
    params = source_params(config, workdir, init_from, False, abstract.params, "--init_from")
    state = state_lib.warm_start(params, tx, config.seed, shardings)
    start = 0
    meta = checkpoint.run_meta(config.to_dict(), _tokenizer_file(workdir))  # with its source
    if is_main:
      print(f"initialized parameters from {init_from}/checkpoints/{config.init.source_step}")
  else:
    state = state_lib.init_state(model_cfg, tx, config.seed, shardings)
    start = 0
  n_params = transformer.count_params(state.params) + (
      transformer.count_params(frozen) if frozen is not None else 0)
  if is_main:
    n = n_params
    if frozen is not None:
      print(f"training {transformer.count_params(state.params) / 1e6:.3f}M adapter parameters"
            f" ({transformer.count_params(state.params) / n:.2%} of the model)")
    print(f"model: {n / 1e6:.2f}M parameters, vocab {tok.vocab_size}, process {config.process.name},"
          f" mesh {dict(mesh.shape)}, rows of {config.data.seq_len} tokens from"
          f" {config.data.source}"
          + (f" (Python {data.meta['python_version']})" if "python_version" in data.meta else "")
          + (f" ({data.meta['train_rows']} train rows)" if "train_rows" in data.meta else ""))

  # --- steps ---
  eval_keys = ("tokens", "loss_mask")  # SFT rows also carry their segments and positions
  if isinstance(data.val_rows, dict):
    eval_keys += tuple(k for k in data.val_rows if k not in eval_keys)
  eval_step = elbo.jit_eval_step(mesh, rules, full_sh, batch_keys=eval_keys,
                                 model=apply, process=process,
                                 bd3_block_size=_bd3_block_size(config.model))
  all_finite = step_lib.jit_all_finite(shardings)
  put_eval = functools.partial(parallel.replicated_batch, mesh=mesh, rules=rules)
  piece_bytes = tok.piece_bytes()
  use_ema = ema_decay > 0 and bool(config.eval.get("use_ema", True))

  def run_eval(st: state_lib.TrainState, max_rows: int, passes: int) -> dict[str, float]:
    params = st.ema_params if use_ema else st.params
    if frozen is not None:
      params = lora.combine(frozen, params)
    if rollouts is not None:  # GRPO: the validation prompts' rewards (no rows)
      return rollouts.evaluate(params)
    rows = data.val_rows
    if max_rows:
      rows = ({k: v[:max_rows] for k, v in rows.items()} if isinstance(rows, dict)
              else rows[:max_rows])
    return elbo.evaluate(eval_step, params, rows, batch_size=int(config.eval.batch_size),
                         piece_bytes=piece_bytes, num_passes=passes, seed=int(config.eval.seed),
                         put=put_eval, progress=lambda _: watchdog.kick())

  def save(step: int, val_loss: float | None = None) -> bool:
    if not bool(all_finite(state)):  # cannot happen through the guarded step; never saved
      if is_main:
        bar.write(f"step {step}: the train state is not finite; checkpoint not saved")
      return False
    return checkpoint.save(mngr, step, state, it.get_state(), meta, val_loss)

  writer = metrics_lib.MetricsWriter(workdir)
  tokens_per_step = tc.batch_size * config.data.seq_len
  flops_per_step = mfu.train_flops(model_cfg, n_params, tc.batch_size, config.data.seq_len)
  peak = mfu.peak_flops(float(tc.get("peak_flops", 0.0) or 0.0))
  profile = profile_range(tc.get("profile_steps", ""))
  data_s = 0.0  # host seconds spent waiting for batches since the last log
  profiling = False  # a run resumed inside the range does not profile it
  bar = tqdm(total=total_steps, initial=start, disable=not is_main, desc="train", unit="step",
             dynamic_ncols=True)
  t_start, t_last, last_step = time.time(), time.time(), start
  last: dict[str, Any] = {}
  step = start
  stop_reason = ""
  pending: tuple[int, jax.Array] | None = None  # last step's non-finite streak, read one step late
  # Multi-process: a step blocked on a dead peer becomes an exit with a message.
  hang_s = float(tc.get("hang_timeout_s", 45.0)) if jax.process_count() > 1 else 0.0
  watchdog = distributed.Watchdog(hang_s)
  try:
    with preemption.StopRequest() as stop:
      while step < total_steps:
        if profile and step + 1 == profile[0]:
          jax.profiler.start_trace(str(workdir / "profile"))
          profiling = True
        t_data = time.perf_counter()
        if rollouts is not None:
          raw, rollout_metrics = rollouts.batch(
              state.params if frozen is None else lora.combine(frozen, state.params), step)
          if rollout_metrics:
            writer.write(step + 1, rollout_metrics)
            bar.set_postfix(reward=f"{rollout_metrics['reward']:.3f}")
          batch = put(raw)
        else:
          batch = put(next(it))
        data_s += time.perf_counter() - t_data
        state, m = train_step(state, batch) if frozen is None else train_step(state, batch, frozen)
        if profiling and step + 1 == profile[1]:
          jax.block_until_ready(state)
          jax.profiler.stop_trace()
          profiling = False
          if is_main:
            bar.write(f"steps {profile[0]}..{profile[1]} profiled: tensorboard --logdir"
                      f" {workdir / 'profile'} (Profile tab)")
        if step == start:
          jax.block_until_ready(state.step)  # compiled and run once: now watch for hangs
          watchdog.start()
        step += 1
        watchdog.kick()
        bar.update(1)
        if pending is not None:  # the previous step is done by now: no pipeline stall
          _check_nonfinite(*pending, max_bad=max_bad, bar=bar if is_main else None,
                           save=lambda: save(step) and checkpoint.wait(mngr), step_now=step)
        pending = (step, m["nonfinite_streak"])
        if step % tc.log_every == 0 or step == total_steps:
          m = jax.device_get(m)
          now = time.time()
          n_steps = step - last_step
          m["step_s"] = max(now - t_last, 1e-9) / n_steps  # wall time per step, data included
          m["data_s"] = data_s / n_steps  # of which waiting for the batch
          m["tokens_per_s"] = tokens_per_step / m["step_s"]
          m["mfu"] = flops_per_step / m["step_s"] / peak
          t_last, last_step, data_s = now, step, 0.0
          writer.write(step, {k: m[k] for k in ("loss", "grad_norm", "lr", "tokens_per_s", "mfu",
                                                "step_s", "data_s", "nonfinite_total", "kl",
                                                "clip_ratio", "ce", "warp_fit", "power_min",
                                                "power_mean", "power_max") if k in m})
          bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{m['tokens_per_s']:.0f}",
                          mfu=f"{m['mfu']:.1%}", step=f"{m['step_s'] * 1e3:.0f}ms",
                          data=f"{m['data_s'] * 1e3:.0f}ms")
          last = m
        val_loss = None
        if step % tc.eval_every == 0 or step == total_steps:
          ev = run_eval(state, int(config.eval.periodic_rows), 1)
          if rollouts is not None:
            val_loss = -ev["reward"]  # the best checkpoint: the highest validation reward
            writer.write(step, ev, prefix="val_")
            if is_main:
              bar.write(f"step {step}: val reward {ev['reward']:.4f} (greedy, "
                        f"{len(data.prompts[1].texts)} prompts)")
          else:
            val_loss = ev["nelbo_per_token"]
            writer.write(step, {k: ev[k] for k in ("bits_per_byte", "nelbo_per_token",
                                                   "ppl_bound")}, prefix="val_")
            if is_main:
              bar.write(f"step {step}: val bits/byte {ev['bits_per_byte']:.4f},"
                        f" ppl bound {ev['ppl_bound']:.6g}")
        limit = float(tc.time_limit_s)
        if stop.stop_at(step) and step < total_steps:
          stop_reason = stop.signal_name or "signal"
        elif limit > 0 and time.time() - t_start > limit and step < total_steps:
          stop_reason = f"train.time_limit_s={limit:g}"
        if step % tc.checkpoint_every == 0 or step == total_steps or stop_reason:
          save(step, val_loss)
        watchdog.kick()
        if stop_reason:
          checkpoint.wait(mngr)
          if is_main:
            bar.write(f"{stop_reason} at step {step}: saved checkpoint {step}, stopping")
          break
      if pending is not None:
        _check_nonfinite(*pending, max_bad=max_bad, bar=bar if is_main else None,
                         save=lambda: True, step_now=step)
  finally:
    if profiling:  # stopped inside the range: the trace of the steps run
      jax.profiler.stop_trace()
    bar.close()
    checkpoint.close(mngr)
    watchdog.stop()
    writer.close()
  result = {"step": step, "loss": float(last.get("loss", float("nan"))),
            "train_seconds": time.time() - t_start, "stopped_early": bool(stop_reason),
            "stop_reason": stop_reason, "nonfinite_total": int(jax.device_get(state.nonfinite_total))}
  return result


def profile_range(spec: Any) -> tuple[int, int] | None:
  """``train.profile_steps="a:b"`` -> (a, b): a ``jax.profiler`` trace of steps a..b (1-based,
  as the progress bar counts them); empty -> None."""
  if spec in (None, ""):
    return None
  a, sep, b = str(spec).partition(":")
  try:
    lo, hi = int(a), int(b)
  except ValueError:
    lo = hi = 0
  if not sep or lo < 1 or hi < lo:
    raise UserError(f"train.profile_steps={spec!r}: need 'a:b' with 1 <= a <= b (e.g. '10:12')")
  return lo, hi


def _check_nonfinite(step: int, streak: jax.Array, *, max_bad: int, bar: Any, save: Any,
                     step_now: int) -> None:
  """Reports a skipped update; after ``max_bad`` in a row saves the (finite) state and stops."""
  streak = int(jax.device_get(streak))
  if not streak:
    return
  if bar is not None:
    bar.write(f"step {step}: loss or gradient not finite, update skipped ({streak} in a row)")
  if streak >= max_bad:
    saved = save()
    raise UserError(
        f"{streak} non-finite updates in a row (steps {step - streak + 1}..{step}), all skipped"
        f" (train.max_nonfinite_in_a_row={max_bad}); the finite state of step {step_now} is"
        f" {'saved' if saved else 'NOT saved'}: lower optim.lr or check the data, then resume")


def _bd3_block_size(model_cfg: Any) -> int:
  """The block size of a BD3-LM model (mask_kind "bd3"), else 0."""
  return int(model_cfg.get("block_size", 0) or 0) if model_cfg.get("mask_kind") == "bd3" else 0
