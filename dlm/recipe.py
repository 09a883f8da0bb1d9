"""Recipes build on each other: ``base(__file__, "quickstart")`` is configs/quickstart.py's config."""

from __future__ import annotations

import importlib.util
import pathlib

import ml_collections


def base(recipe_file: str, name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """get_config(arg) of the recipe ``name``.py in the same folder as ``recipe_file``."""
  path = pathlib.Path(recipe_file).with_name(f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"dlm_recipe_{name}", path)
  if spec is None or spec.loader is None or not path.is_file():
    raise FileNotFoundError(f"recipe {path} not found")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def flags(arg: str | None, known: set[str], recipe: str) -> set[str]:
  """``"smoke,lora"`` -> {"smoke", "lora"}: a recipe's comma-separated switches, all known."""
  args = set(filter(None, (arg or "").split(",")))
  if args - known:
    raise ValueError(f"configs/{recipe}.py: unknown argument(s) {sorted(args - known)}; known:"
                     f" {sorted(known)}")
  return args


def pod_model(c: ml_collections.ConfigDict, *, d_model: int, num_layers: int, num_heads: int,
              mlp_dim: int, vocab_size: int, seq_len: int) -> None:
  """A TPU-pod model: bf16 compute over f32 master weights, full remat, splash attention."""
  c.data.vocab_size = vocab_size
  c.data.seq_len = seq_len
  c.model.d_model, c.model.num_layers, c.model.num_heads = d_model, num_layers, num_heads
  c.model.mlp_dim = mlp_dim
  c.model.dtype = "bfloat16"
  c.model.remat = "full"
  c.model.scan_layers = True  # one compiled layer: compiles of deep models stay small on TPU
  c.model.attention = "splash"
