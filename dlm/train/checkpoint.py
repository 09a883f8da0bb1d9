"""Orbax checkpoints of the TrainState and the data iterator, plus the run's config.

Layout of a workdir::

  config.json          the full config of the run (written once, checked on resume)
  tokenizer.model      the sentencepiece model (stored beside the checkpoints)
  checkpoints/<step>/  orbax: ``state`` (TrainState) and ``data`` (iterator state)
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import orbax.checkpoint as ocp

CONFIG_FILE = "config.json"


def manager(workdir: str | os.PathLike, *, max_to_keep: int = 3,
            create: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create,
                                         enable_async_checkpointing=True)
  path = pathlib.Path(workdir).absolute() / "checkpoints"
  return ocp.CheckpointManager(path, options=options, item_names=("state", "data"))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_state: dict[str, Any]) -> None:
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=ocp.args.JsonSave(data_state)), force=True)


def restore(mngr: ocp.CheckpointManager, abstract_state: Any,
            step: int | None = None) -> tuple[int, Any, dict[str, Any]]:
  step = mngr.latest_step() if step is None else step
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  return step, out["state"], out["data"]


def restore_params(workdir: str | os.PathLike, abstract_params: Any,
                   step: int | None = None) -> tuple[int, Any]:
  """Only the parameters of the newest (or given) checkpoint, for sampling and eval."""
  ckpt_dir = pathlib.Path(workdir) / "checkpoints"
  mngr = manager(workdir, create=False) if ckpt_dir.is_dir() else None
  step = (mngr.latest_step() if mngr else None) if step is None else step
  if step is None:
    raise FileNotFoundError(
        f"no checkpoint in {pathlib.Path(workdir) / 'checkpoints'}; train first with"
        f" `dlm train --config=... --workdir={workdir}`")
  out = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.PyTreeRestore(
          item={"params": abstract_params},
          restore_args=ocp.checkpoint_utils.construct_restore_args({"params": abstract_params}),
          partial_restore=True)))
  return step, out["state"]["params"]


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
