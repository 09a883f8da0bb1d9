"""Orbax checkpoints of a run: train state, data iterator, config and tokenizer, kept safely.

Layout of a workdir::

  config.json            the full config of the run (written once, checked on resume)
  tokenizer.model        the sentencepiece model
  checkpoints/<step>/    orbax, saved asynchronously: ``state`` (TrainState: step, params,
                         optimizer, EMA, RNG, non-finite counters), ``data`` (iterator state)
                         and ``meta`` (the config and the tokenizer file, so one checkpoint
                         directory is a whole model)
  checkpoints/<step>/dlm_digest.json   sha256 of every file of the step, written after it commits
  checkpoints_unreadable/<step>/   checkpoints that failed to restore, moved aside (never deleted)

The last ``max_to_keep`` checkpoints are kept, and also the one with the lowest
validation loss.  A save that fails warns and training goes on; a checkpoint
that cannot be read, or whose files no longer match their digests, is moved
aside with a warning and the previous one is used: by ``dlm train``, and by the
readers (``dlm sample``, ``dlm eval``, ``from_pretrained``) alike.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pathlib
import threading
import time
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dlm import jsonfile, registry
from dlm.errors import UserError

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
UNREADABLE = "checkpoints_unreadable"
ITEMS = ("state", "data", "meta")
DIGEST_FILE = "dlm_digest.json"
_CHUNK = 8 << 20


class CorruptCheckpoint(ValueError):
  """A checkpoint's files do not match the digests recorded when it was saved."""


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


def _files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name != DIGEST_FILE
                and not p.is_symlink())


def _sha256(path: pathlib.Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  return h.hexdigest()


def _sha256_all(paths: list[pathlib.Path]) -> list[str]:
  """The digests of ``paths``, hashed in threads (hashlib drops the GIL): disk-bound, not core-bound."""
  if len(paths) < 2:
    return [_sha256(p) for p in paths]
  from concurrent import futures
  with futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, len(paths))) as pool:
    return list(pool.map(_sha256, paths))


def write_digest(step_dir: str | os.PathLike) -> pathlib.Path:
  """Records the sha256 of every file of a committed step in ``<step>/dlm_digest.json``."""
  step_dir = pathlib.Path(step_dir)
  files = _files(step_dir)
  digests = {str(p.relative_to(step_dir)): d for p, d in zip(files, _sha256_all(files))}
  out = step_dir / DIGEST_FILE
  tmp = step_dir / (DIGEST_FILE + ".tmp")
  tmp.write_text(json.dumps({"algorithm": "sha256", "files": digests}, indent=1, sort_keys=True))
  os.replace(tmp, out)
  return out


def verify(step_dir: str | os.PathLike) -> bool:
  """Checks a step's files against its digest; False if it has none (saved before digests).

  Raises ``CorruptCheckpoint`` naming the first file that is missing, extra or changed.
  """
  step_dir = pathlib.Path(step_dir)
  path = step_dir / DIGEST_FILE
  if not path.is_file():
    return False
  try:
    recorded = json.loads(path.read_bytes().decode("utf-8"))["files"]
    assert isinstance(recorded, dict)
  except Exception:  # noqa: BLE001
    raise CorruptCheckpoint(f"{path} is garbled") from None
  present = {str(p.relative_to(step_dir)) for p in _files(step_dir)}
  for name in sorted(set(recorded) - present):
    raise CorruptCheckpoint(f"{step_dir / name} is missing")
  for name in sorted(present - set(recorded)):
    raise CorruptCheckpoint(f"{step_dir / name} was not part of the saved checkpoint")
  names = sorted(recorded)
  for name, digest in zip(names, _sha256_all([step_dir / n for n in names])):
    if digest != recorded[name]:
      raise CorruptCheckpoint(f"{step_dir / name} does not match its sha256 digest")
  return True


def _digest_new_steps(directory: pathlib.Path) -> None:
  for step_dir in sorted(directory.iterdir()) if directory.is_dir() else []:
    if step_dir.name.isdigit() and not (step_dir / DIGEST_FILE).exists():
      try:
        write_digest(step_dir)
      except OSError as e:  # a step deleted by the keep policy meanwhile, a full disk
        if step_dir.exists():
          _warn(f"could not record the digest of {step_dir} ({e}); it restores unverified")


_DIGESTS: dict[int, threading.Thread] = {}


def _join_digests(mngr: ocp.CheckpointManager) -> None:
  thread = _DIGESTS.pop(id(mngr), None)
  if thread is not None:
    thread.join()


def wait(mngr: ocp.CheckpointManager, *, digest_in_background: bool = True) -> bool:
  """Waits for the pending async save; a failed one is a warning.  Returns whether it succeeded.

  Then records the digests of newly committed steps (process 0), in a thread that
  the next ``wait``/``close`` joins, so hashing a large checkpoint overlaps training.
  """
  try:
    mngr.wait_until_finished()
    ok = True
  except Exception as e:  # noqa: BLE001  (any I/O error of the background save)
    _warn(f"saving a checkpoint failed in the background ({type(e).__name__}: {e});"
          " training goes on and the previous checkpoints are intact")
    ok = False
  _join_digests(mngr)
  if jax.process_index() == 0:
    directory = pathlib.Path(str(mngr.directory))
    if digest_in_background:
      thread = threading.Thread(target=_digest_new_steps, args=(directory,), daemon=False,
                                name="dlm-checkpoint-digest")
      _DIGESTS[id(mngr)] = thread
      thread.start()
    else:
      _digest_new_steps(directory)
  return ok


def close(mngr: ocp.CheckpointManager) -> bool:
  """Finishes the pending save and its digests, then closes the manager."""
  ok = wait(mngr, digest_in_background=False)
  mngr.close()
  return ok


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
    close(mngr)


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
      _checked(workdir, step)
      state, data_state, _ = _restore_step(mngr, step, abstract_state)
      return mngr, step, state, data_state
    except Exception as e:  # noqa: BLE001  (truncated, garbled, changed or missing files)
      mngr.close()
      dst = _move_aside(workdir, step)
      _warn(f"checkpoint {workdir / CHECKPOINTS / str(step)} is unreadable ({_reason(e)});"
            f" moved it to {dst} and falling back to the previous checkpoint")
      mngr = manager(workdir, **manager_kw)
  return mngr, None, None, None


def _reason(e: Exception) -> str:
  text = str(e).splitlines()[0] if str(e) else ""
  return f"{type(e).__name__}: {text[:300]}"


def _checked(workdir: pathlib.Path, step: int) -> None:
  """Verifies ``step``'s digest on process 0 (the others follow its verdict)."""
  step_dir = pathlib.Path(workdir) / CHECKPOINTS / str(step)
  error = ""
  verified = False
  if jax.process_index() == 0:
    try:
      verified = verify(step_dir)
    except (CorruptCheckpoint, OSError) as e:
      error = str(e)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    bad = multihost_utils.broadcast_one_to_all(np.int32(bool(error)))
    error = error or ("corrupt on process 0" if int(bad) else "")
  if error:
    raise CorruptCheckpoint(error)
  if not verified and jax.process_index() == 0:
    _warn(f"{step_dir} has no {DIGEST_FILE} (saved before dlm recorded digests, or stopped"
          " before writing it); restoring it unverified")


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
  steps = [step] if step is not None else sorted(mngr.all_steps(), reverse=True) if mngr else []
  if not steps:
    raise FileNotFoundError(
        f"no checkpoint in {ckpt_dir}; train first with"
        f" `dlm train --config=... --workdir={workdir}`")
  key = "ema_params" if ema else "params"
  for s in steps:
    try:
      _checked(pathlib.Path(workdir), s)
      return s, _restore_params_step(mngr, s, key, abstract_params)
    except Exception as e:  # noqa: BLE001  (truncated, garbled, changed or missing files)
      if step is not None:  # the user asked for this one
        raise UserError(f"checkpoint {ckpt_dir / str(s)} is unreadable ({_reason(e)}); pick"
                        " another step or restore the files") from None
      where = _set_aside(pathlib.Path(workdir), s)
      _warn(f"checkpoint {ckpt_dir / str(s)} is unreadable ({_reason(e)}); {where}, falling"
            " back to the previous checkpoint")
      mngr.close()
      mngr = _reader(workdir)
  raise UserError(f"no readable checkpoint in {ckpt_dir} (all {len(steps)} failed, see the"
                  f" warnings); retrain, or restore the files from {workdir / UNREADABLE}")


def _restore_params_step(mngr: ocp.CheckpointManager, step: int, key: str,
                         abstract_params: Any) -> Any:
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
          item={key: abstract_params},
          restore_args=ocp.checkpoint_utils.construct_restore_args({key: abstract_params}),
          partial_restore=True), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
  if not isinstance(out["data"], dict) or not isinstance(out["meta"], dict):
    raise ValueError("the data or meta item is missing")
  if key not in out["state"]:
    raise ValueError(f"the state item has no {key}")
  return out["state"][key]


def is_step_folder(path: str | os.PathLike) -> bool:
  """One checkpoint directory (``WORKDIR/checkpoints/STEP``, or a copy of it anywhere)."""
  path = pathlib.Path(path)
  return (path / "state").is_dir() and (path / "meta" / "metadata").is_file()


def read_step_meta(step_dir: str | os.PathLike, *, trust_config_code: bool = False
                   ) -> dict[str, Any]:
  """The ``meta`` item (config, tokenizer) of a step folder read on its own, after its files
  were checked against their digests; the config is data (``module:attr`` refused unless
  trusted), as a workdir's ``config.json`` is."""
  step_dir = pathlib.Path(step_dir)
  try:
    if not verify(step_dir):
      _warn(f"{step_dir} has no {DIGEST_FILE}; reading it unverified")
  except (CorruptCheckpoint, OSError) as e:
    raise UserError(f"checkpoint {step_dir} is unreadable ({e}); copy the whole step folder"
                    " again") from None
  path = step_dir / "meta" / "metadata"
  meta = jsonfile.read_object(path, fix="copy the whole step folder again")
  config = meta.get("config")
  if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
    raise UserError(f"{path} holds no dlm config (no 'model' section); give a dlm workdir or"
                    " one of its checkpoints/STEP folders")
  registry.check_untrusted(config, str(path), trust=trust_config_code)
  return meta


def restore_step_folder(step_dir: str | os.PathLike, abstract_params: Any, *, ema: bool = False
                        ) -> tuple[int, Any]:
  """(step, parameters or their EMA) of a step folder read on its own (``read_step_meta``
  first: it checks the digests)."""
  step_dir = pathlib.Path(step_dir).absolute()
  key = "ema_params" if ema else "params"
  item = {key: abstract_params, "step": jax.ShapeDtypeStruct((), np.int32)}
  try:
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
      out = ckptr.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
          item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True))
    if out.get(key) is None:
      raise ValueError(f"the state item has no {key}")
  except Exception as e:  # noqa: BLE001  (truncated, garbled or missing files)
    raise UserError(f"checkpoint {step_dir} is unreadable ({_reason(e)}); copy the whole step"
                    " folder again") from None
  return int(out["step"]), out[key]


def _set_aside(workdir: pathlib.Path, step: int) -> str:
  """A reader moves an unreadable checkpoint aside as train does, unless a writer is at work."""
  from dlm import lock
  if lock.is_held(workdir):
    return "left in place (a writer holds the workdir)"
  try:
    return f"moved it to {_move_aside(workdir, step)}"
  except OSError as e:
    return f"left in place ({e.strerror})"


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


def read_config(workdir: str | os.PathLike, *, trust_config_code: bool = False) -> dict[str, Any]:
  """A workdir's ``config.json``: data, so a ``module:attr`` name in it is refused unless trusted."""
  path = pathlib.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(
        f"{path} not found: {workdir} is not a dlm workdir; train one with"
        f" `dlm train --config=configs/quickstart.py --workdir={workdir}`")
  config = jsonfile.read_object(path, fix="restore it from a checkpoint's meta item or retrain")
  if not isinstance(config.get("model"), dict):
    raise UserError(f"{path} is not a dlm config (no 'model' section); point at a dlm workdir")
  registry.check_untrusted(config, str(path), trust=trust_config_code)
  return config
