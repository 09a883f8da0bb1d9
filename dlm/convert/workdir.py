"""`dlm convert` / `dlm export`: a Hugging Face folder <-> a dlm workdir (config + orbax params)."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dlm.convert import families, hf, safetensors_io, staging
from dlm import jsonfile
from dlm.errors import UserError
from dlm import checkpoint

HF_CONFIG = "hf_config.json"  # the imported config.json, kept for export
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json")


def _tokenizer_files(src: pathlib.Path) -> list[pathlib.Path]:
  """The tokenizer files of ``src`` to copy, each checked to lie inside it (links included)."""
  return [safetensors_io.inside(src, name, src) for name in TOKENIZER_FILES
          if (src / name).is_file()]


def convert(src: str | os.PathLike, workdir: str | os.PathLike,
            expected: str | None = None) -> pathlib.Path:
  """Imports ``src`` into a new workdir: config.json, tokenizer files, checkpoints/0 (params).

  Everything from ``src`` is read and checked first; the workdir is then written
  under a hidden sibling name and renamed into place when complete, so a failure
  (or a kill) leaves ``workdir`` as it was: absent or empty.
  """
  src, workdir = pathlib.Path(src), pathlib.Path(workdir)
  staging.check_new(workdir, "--workdir", "convert")
  total = hf.check_folder(src, expected)  # config and header errors before any bar or reading
  tokenizer_files = _tokenizer_files(src)
  with tqdm(total=total, desc="convert", unit="tensor") as bar:
    fam, model, hf_cfg, params = hf.load_params(src, expected, progress=bar.update)
  dtype = str(np.dtype(params["embed"].dtype))
  config = families.dlm_config(fam.name, model, hf_cfg, fam.special_ids(hf_cfg), str(src), dtype)
  with staging.staged(workdir, "--workdir", "convert") as stage:
    _write(stage, tokenizer_files, hf_cfg, params, config, str(src), workdir)
  return workdir


def _write(stage: pathlib.Path, tokenizer_files: list[pathlib.Path], hf_cfg: dict[str, Any],
           params: dict[str, Any], config: dict[str, Any], src: str,
           workdir: pathlib.Path) -> None:
  """The files of the converted ``workdir``, into its staging folder ``stage``."""
  for path in tokenizer_files:
    shutil.copyfile(path, stage / path.name)
  (stage / HF_CONFIG).write_text(json.dumps(hf_cfg, indent=2, sort_keys=True))
  # Written in place from the numpy arrays: peak ~ the weights + 0.25 GB, not twice the weights.
  if not checkpoint.save_host_arrays(stage, {"params": params}, {"config": config, "source": src}):
    raise UserError(f"could not write the checkpoint of {workdir}; check the disk and retry")
  checkpoint.write_config(stage, config)  # last: a workdir with config.json is complete


def export(workdir: str | os.PathLike, out: str | os.PathLike, *,
           max_shard_bytes: int = 5 * 2**30, trust_config_code: bool = False) -> pathlib.Path:
  """Writes the newest parameters of a workdir as a Hugging Face folder (safetensors + config).

  ``out`` is staged and renamed into place (``staging.staged``): written whole or not at all.
  """
  from dlm.models import loader
  out = pathlib.Path(out)
  staging.check_new(out, "--out", "export")  # before the (long) restore
  m = loader.load(workdir, dtype=None, trust_config_code=trust_config_code)
  cfg = m.config
  family = cfg.get("hf", {}).get("family", "llada")
  if m.model_cfg.time_conditioning:
    raise UserError("a time-conditioned model (model.time_conditioning=True) has no LLaDA/Dream"
                    " equivalent; export a model trained without it")
  if m.model_cfg.process_params or m.model_cfg.self_conditioning:
    raise UserError("a model with learned process parameters or self-conditioning has no"
                    " LLaDA/Dream equivalent; export a masked-diffusion model")
  model = dataclasses.asdict(m.model_cfg)
  rank, alpha = model.pop("lora_rank"), model.pop("lora_alpha")
  model.pop("lora_targets")
  model["num_kv_heads"] = model["num_kv_heads"] or model["num_heads"]
  model["head_dim"] = m.model_cfg.hd
  model["mlp_dim"] = m.model_cfg.mlp
  base_path = pathlib.Path(workdir) / HF_CONFIG
  base = jsonfile.read_object(base_path, fix="restore it from the original model folder or"
                              " delete it (a fresh config.json is written)",
                              max_bytes=1 << 20) if base_path.exists() else None
  hf_cfg = hf.hf_config_for(model, family, m.ids, base)
  params = m.params
  if rank:  # LoRA adapters folded into their kernels: W + (alpha / r) A B
    from dlm.models import lora
    params = lora.merge(params, alpha / rank)
  params = {k: v for k, v in _numpy(params).items()}
  with staging.staged(out, "--out", "export") as stage:
    hf.export_params(params, model, family, hf_cfg, stage, max_shard_bytes=max_shard_bytes)
    for name in TOKENIZER_FILES:
      if (pathlib.Path(workdir) / name).is_file():
        shutil.copyfile(pathlib.Path(workdir) / name, stage / name)
  return out


def _numpy(tree: Any) -> Any:
  import jax
  return jax.tree.map(np.asarray, tree)
