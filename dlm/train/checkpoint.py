"""Orbax checkpoints of a run: train state, data iterator, config and tokenizer, kept safely.

Layout of a workdir::

  config.json            the full config of the run (written once, checked on resume)
  tokenizer.model        the sentencepiece model
  checkpoints/<step>/    orbax, saved asynchronously: ``state`` (TrainState: step, params,
                         optimizer, EMA, RNG, non-finite counters), ``data`` (iterator state)
                         and ``meta`` (the config and the tokenizer file, so one checkpoint
                         directory is a whole model)
  checkpoints_unreadable/<step>/   checkpoints that failed to restore, moved aside (never deleted)

The last ``max_to_keep`` checkpoints are kept, and also the one with the lowest
validation loss.  A save that fails warns and training goes on; a checkpoint
that cannot be read is moved aside with a warning and the previous one is used.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pathlib
import time
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
UNREADABLE = "checkpoints_unreadable"
ITEMS = ("state", "data", "meta")


class CheckpointWarning(UserWarning):
  """A checkpoint could not be written or read; training goes on."""


def _warn(msg: str) -> None:
  if jax.process_index() == 0:
    warnings.warn(msg, CheckpointWarning, stacklevel=3)


def manager(workdir: str | os.PathLike, *, max_to_keep: int = 3, keep_best: bool = True,
            create: bool = True, _host_arrays: bool = False) -> ocp.CheckpointManager:
  """Keeps the newest ``max_to_keep`` checkpoints and, with ``keep_best``, the lowest ``val_loss``.

  ``_host_arrays``: see ``save_host_arrays``.
  """
  policies: list[Any] = [ocp.checkpoint_managers.LatestN(n=max(int(max_to_keep), 1))]
  if keep_best:  # checkpoints saved without a validation loss rank last
    policies.append(ocp.checkpoint_managers.BestN(
        get_metric_fn=lambda m: -float(m.get("val_loss", float("inf"))), n=1,
        keep_checkpoints_without_metrics=False))
  options = ocp.CheckpointManagerOptions(
      create=create, enable_async_checkpointing=True,
      # Step directories made before save() returns: a directory that cannot be created is an
      # error there (a warning for us), not a background wait for a signal that never comes.
      async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
      # best_fn only makes orbax write each checkpoint's metrics; the policy decides.
      best_fn=lambda m: float(m.get("val_loss", float("inf"))), best_mode="min",
      preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies))
  path = pathlib.Path(workdir).absolute() / CHECKPOINTS
  if not _host_arrays:
    return ocp.CheckpointManager(path, options=options, item_names=ITEMS)
  registry = ocp.type_handlers.create_type_handler_registry(
      (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)))
  handlers = {"state": ocp.PyTreeCheckpointHandler(save_concurrent_gb=0.25, use_ocdbt=False, use_compression=False,
                                                   type_handler_registry=registry),
              "data": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(path, options=options, item_handlers=handlers)


def run_meta(config_dict: dict[str, Any], tokenizer_path: str | os.PathLike) -> dict[str, Any]:
  """The ``meta`` item: the run's config and its tokenizer file (base64) with its sha256."""
  raw = pathlib.Path(tokenizer_path).read_bytes()
  return {"config": config_dict, "tokenizer_file": pathlib.Path(tokenizer_path).name,
          "tokenizer_sha256": hashlib.sha256(raw).hexdigest(),
          "tokenizer_base64": base64.b64encode(raw).decode("ascii")}


def tokenizer_bytes(meta: dict[str, Any]) -> bytes:
  raw = base64.b64decode(meta["tokenizer_base64"])
  if hashlib.sha256(raw).hexdigest() != meta["tokenizer_sha256"]:
    raise ValueError("the checkpoint's tokenizer does not match its sha256")
  return raw


def wait(mngr: ocp.CheckpointManager) -> bool:
  """Waits for the pending async save; a failed one is a warning.  Returns whether it succeeded."""
  try:
    mngr.wait_until_finished()
    return True
  except Exception as e:  # noqa: BLE001  (any I/O error of the background save)
    _warn(f"saving a checkpoint failed in the background ({type(e).__name__}: {e});"
          " training goes on and the previous checkpoints are intact")
    return False


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_state: dict[str, Any],
         meta: dict[str, Any], val_loss: float | None = None, *, _host_arrays: bool = False) -> bool:
  """Starts an async save of ``step``; returns False (with a warning) if it could not start.

  ``val_loss`` ranks the checkpoint for keeping the best one.
  """
  wait(mngr)
  metrics = {} if val_loss is None else {"val_loss": float(val_loss)}
  state_args = ocp.args.PyTreeSave(state) if _host_arrays else ocp.args.StandardSave(state)
  try:
    mngr.save(step, args=ocp.args.Composite(state=state_args,
                                            data=ocp.args.JsonSave(data_state),
                                            meta=ocp.args.JsonSave(meta)),
              metrics=metrics, force=True)
    return True
  except Exception as e:  # noqa: BLE001  (unwritable directory, full disk, ...)
    _warn(f"could not save the checkpoint of step {step} in {mngr.directory}"
          f" ({type(e).__name__}: {e}); training goes on and the previous checkpoints are intact")
    return False


def save_host_arrays(workdir: str | os.PathLike, state: Any, meta: dict[str, Any]) -> bool:
  """Saves step 0 of a new workdir from numpy arrays that nothing changes meanwhile (imports).

  They are written in place, a quarter GB at a time, uncompressed and without
  OCDBT, skipping the copy orbax otherwise makes first: writing adds little to
  the arrays themselves.  The files are the ones ``StandardRestore`` reads.
  """
  mngr = manager(workdir, max_to_keep=1, keep_best=False, _host_arrays=True)
  try:
    return save(mngr, 0, state, {}, meta, _host_arrays=True) and wait(mngr)
  finally:
    mngr.close()


def _restore_step(mngr: ocp.CheckpointManager, step: int,
                  abstract_state: Any) -> tuple[Any, dict[str, Any], dict[str, Any]]:
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
      meta=ocp.args.JsonRestore()))
  if not isinstance(out["data"], dict) or not isinstance(out["meta"], dict):
    raise ValueError("the data or meta item is missing")
  return out["state"], out["data"], out["meta"]


def _move_aside(workdir: pathlib.Path, step: int) -> pathlib.Path:
  src = workdir / CHECKPOINTS / str(step)
  dst = workdir / UNREADABLE / f"{step}-{time.strftime('%Y%m%dT%H%M%S')}"
  if jax.process_index() == 0:
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)
  _barrier(f"dlm_ckpt_move_{step}")
  return dst


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def resume(workdir: str | os.PathLike, abstract_state: Any, **manager_kw: Any
           ) -> tuple[ocp.CheckpointManager, int | None, Any, dict[str, Any] | None]:
  """(manager, step, state, data_state) of the newest readable checkpoint; step None if none.

  A checkpoint that fails to restore is moved to ``checkpoints_unreadable/``
  with a warning (nothing is deleted) and the one before it is tried.
  """
  workdir = pathlib.Path(workdir).absolute()
  mngr = manager(workdir, **manager_kw)
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      state, data_state, _ = _restore_step(mngr, step, abstract_state)
      return mngr, step, state, data_state
    except Exception as e:  # noqa: BLE001  (truncated, garbled or missing files)
      mngr.close()
      dst = _move_aside(workdir, step)
      _warn(f"checkpoint {workdir / CHECKPOINTS / str(step)} is unreadable"
            f" ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); moved it to"
            f" {dst} and falling back to the previous checkpoint")
      mngr = manager(workdir, **manager_kw)
  return mngr, None, None, None


def _reader(workdir: str | os.PathLike) -> ocp.CheckpointManager:
  """A read-only manager that reads any part of the state tree (sampling, eval, warm starts)."""
  options = ocp.CheckpointManagerOptions(create=False)
  handlers = {"state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
              "meta": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(pathlib.Path(workdir).absolute() / CHECKPOINTS, options=options,
                               item_handlers=handlers)


def restore_params(workdir: str | os.PathLike, abstract_params: Any, step: int | None = None,
                   *, ema: bool = False) -> tuple[int, Any]:
  """Only the parameters (or their EMA) of the newest (or given) checkpoint, for sampling and eval."""
  ckpt_dir = pathlib.Path(workdir) / CHECKPOINTS
  mngr = _reader(workdir) if ckpt_dir.is_dir() else None
  step = (mngr.latest_step() if mngr else None) if step is None else step
  if step is None:
    raise FileNotFoundError(
        f"no checkpoint in {ckpt_dir}; train first with"
        f" `dlm train --config=... --workdir={workdir}`")
  key = "ema_params" if ema else "params"
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
          item={key: abstract_params},
          restore_args=ocp.checkpoint_utils.construct_restore_args({key: abstract_params}),
          partial_restore=True), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
  return step, out["state"][key]


def has_ema(workdir: str | os.PathLike, step: int | None = None) -> bool:
  """Whether the newest (or given) checkpoint holds EMA parameters."""
  mngr = _reader(workdir)
  step = mngr.latest_step() if step is None else step
  if step is None:
    return False
  try:
    return bool(mngr.item_metadata(step)["state"]["ema_params"])
  except (KeyError, TypeError):
    return False


def write_config(workdir: str | os.PathLike, config_dict: dict[str, Any]) -> None:
  path = pathlib.Path(workdir) / CONFIG_FILE
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(config_dict, indent=2, sort_keys=True))
  os.replace(tmp, path)


def read_config(workdir: str | os.PathLike) -> dict[str, Any]:
  path = pathlib.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(
        f"{path} not found: {workdir} is not a dlm workdir; train one with"
        f" `dlm train --config=configs/quickstart.py --workdir={workdir}`")
  return json.loads(path.read_text())
