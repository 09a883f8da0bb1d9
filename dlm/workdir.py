"""Load a trained run from its workdir: config, tokenizer, model, process, parameters."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable

import jax
import ml_collections

from dlm.data import tokenizer as tokenizer_lib
from dlm.models import transformer
from dlm.train import checkpoint, loop, state as state_lib


@dataclasses.dataclass
class Run:
  config: ml_collections.ConfigDict
  tokenizer: Any
  model_cfg: transformer.ModelConfig
  process: Any
  apply: Callable[..., jax.Array]
  params: Any
  step: int
  weights: str = "params"  # or "ema_params": which of the checkpoint's weights were loaded


def load_run(workdir: str | pathlib.Path, step: int | None = None,
             ema: bool | None = None, *, trust_config_code: bool = False) -> Run:
  """``ema=None`` loads the EMA weights when the run kept them (``train.ema_decay > 0``).

  ``trust_config_code``: let ``config.json`` name ``module:attr`` imports (refused otherwise).
  """
  workdir = pathlib.Path(workdir)
  config = ml_collections.ConfigDict(
      checkpoint.read_config(workdir, trust_config_code=trust_config_code))
  tok = tokenizer_lib.load_tokenizer(workdir / "tokenizer.model")
  model_cfg, process = loop.build_model(config, tok)
  graphdef, abstract_params, _ = state_lib.param_logical_specs(model_cfg)
  if ema is None:  # from the config, not the checkpoint's metadata: a lost file is an error
    ema = float(config.get("train", {}).get("ema_decay", 0.0) or 0.0) > 0
  step, params = checkpoint.restore_params(workdir, abstract_params, step, ema=ema)
  return Run(config=config, tokenizer=tok, model_cfg=model_cfg, process=process,
             apply=transformer.apply_fn(graphdef), params=params, step=step,
             weights="ema_params" if ema else "params")


def load_imported(path: str | pathlib.Path, *, trust_config_code: bool = False) -> Run:
  """A Hugging Face LLaDA/Dream folder or a converted workdir, as a ``Run`` for the sampler."""
  from dlm import api, processes
  m = api.from_pretrained(path, trust_config_code=trust_config_code)
  process = processes.make_process(m.config.process, vocab_size=m.model_cfg.vocab_size,
                                   mask_id=m.ids["mask"])
  return Run(config=m.config, tokenizer=m.tokenizer, model_cfg=m.model_cfg, process=process,
             apply=m.apply, params=m.params, step=0)


def is_imported(workdir: str | pathlib.Path, *, trust_config_code: bool = False) -> bool:
  cfg = checkpoint.read_config(workdir, trust_config_code=trust_config_code)
  return "hf" in cfg
