"""Import and export LLaDA / Dream / Llama / Qwen2 Hugging Face folders as our parameters, one tensor at a time.

Import reads ``config.json`` and the (single or sharded) safetensors tensor by
tensor into the stacked layout of our Transformer, so host memory peaks near
one copy of the weights plus one tensor.  Export is the exact inverse (only
reshapes and transposes), so import -> export -> import is bit-identical.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

import numpy as np

from dlm import jsonfile
from dlm.convert import families, safetensors_io
from dlm.errors import UserError

CONFIG = "config.json"
MAX_CONFIG_BYTES = 10 * 2**20  # released config.json files are a few KB


def read_hf_config(src: str | os.PathLike) -> dict[str, Any]:
  """The ``config.json`` of a model folder as a dict; one-line errors naming the file."""
  path = pathlib.Path(src) / CONFIG
  if not path.is_file():
    raise UserError(f"{path} not found: --src must be a Hugging Face model folder (config.json"
                    " and *.safetensors)")
  safetensors_io.inside(src, CONFIG, src)
  hf = jsonfile.read_object(path, max_bytes=MAX_CONFIG_BYTES,
                            fix="download it again or use the config.json that came with the weights")
  return families.with_embedding_size(hf)


def describe(src: str | os.PathLike, expected: str | None = None
             ) -> tuple[families.Family, dict[str, Any], dict[str, Any]]:
  """(family, our model fields, config.json) of a folder, without reading weights."""
  hf = read_hf_config(src)
  fam = families.family_of(hf, str(pathlib.Path(src) / CONFIG), expected)
  return fam, fam.model_fields(hf, str(pathlib.Path(src) / CONFIG)), hf


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _their_shape(rule: families.Rule, our_shape: tuple[int, ...], s: dict[str, int]
                 ) -> tuple[int, ...]:
  """The stored shape of a parameter, from a zero-stride view: nothing of its size is allocated."""
  view = np.lib.stride_tricks.as_strided(np.zeros(1, np.int8), our_shape, (0,) * len(our_shape))
  return rule.to_theirs(view, s).shape


def our_shapes(model: dict[str, Any]) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Per-layer (or whole) shapes of our parameters for these model fields, by path."""
  d, nh, nkv, hd = model["d_model"], model["num_heads"], model["num_kv_heads"], model["head_dim"]
  mlp, v = model["mlp_dim"], model["vocab_size"]
  return {("embed",): (v, d), ("head",): (d, v), ("final_norm", "scale"): (d,),
          ("blocks", "attn_norm", "scale"): (d,), ("blocks", "mlp_norm", "scale"): (d,),
          ("blocks", "attn", "wq"): (d, nh, hd), ("blocks", "attn", "wk"): (d, nkv, hd),
          ("blocks", "attn", "wv"): (d, nkv, hd), ("blocks", "attn", "wo"): (nh, hd, d),
          ("blocks", "attn", "bq"): (nh, hd), ("blocks", "attn", "bk"): (nkv, hd),
          ("blocks", "attn", "bv"): (nkv, hd), ("blocks", "mlp", "w_gate"): (d, mlp),
          ("blocks", "mlp", "w_up"): (d, mlp), ("blocks", "mlp", "w_out"): (mlp, d)}


def _names(rule: families.Rule, layers: int) -> list[str]:
  return [rule.theirs.format(i=i) for i in range(layers)] if rule.per_layer else [rule.theirs]


def check_tensors(fam: families.Family, model: dict[str, Any],
                  folder: safetensors_io.SafetensorsFolder, src: str | os.PathLike) -> None:
  """Every tensor config.json implies is in the headers, of that shape and a floating dtype.

  Run on the headers alone, before any parameter is allocated, so a config.json
  that disagrees with the weights (absurd sizes included) costs no memory.
  """
  rules, layers = fam.rules(model), model["num_layers"]
  needed = sum(layers if r.per_layer else 1 for r in rules)
  if needed > len(folder):
    raise UserError(f"{pathlib.Path(src) / CONFIG} implies {needed} tensors ({layers} layers)"
                    f" but the safetensors in {src} hold {len(folder)}; the weights do not match"
                    " config.json: use the config.json that came with them")
  s, shapes = families.sizes(model), our_shapes(model)
  for rule in rules:
    want = _their_shape(rule, shapes[rule.ours], s)
    for name in _names(rule, layers):
      if name not in folder:
        raise UserError(f"tensor {name} is missing from {src}; the checkpoint is incomplete or not"
                        f" a {fam.name} model")
      info = folder.info(name)
      if tuple(info.shape) != want:
        raise UserError(f"{info.path}: tensor {name} has shape {list(info.shape)} but"
                        f" {pathlib.Path(src) / CONFIG} implies {list(want)}; the weights do not"
                        " match config.json: use the config.json that came with them")
      if not safetensors_io.is_floating(info.dtype):
        raise UserError(f"{info.path}: tensor {name} is stored as"
                        f" {safetensors_io.name_of(info.dtype)}, but it becomes the floating"
                        f" parameter {'/'.join(rule.ours)}; the header is wrong or the file is"
                        f" not these weights: download it again (dlm reads"
                        f" {'/'.join(safetensors_io.FLOATING)} weights)")


def load_params(src: str | os.PathLike, expected: str | None = None, *, progress: Any = None
                ) -> tuple[families.Family, dict[str, Any], dict[str, Any], dict[str, Any]]:
  """(family, model fields, config.json, params as numpy in the stored dtype) of a folder.

  Headers are checked against config.json (``check_tensors``) before anything is allocated.
  """
  fam, model, hf = describe(src, expected)
  folder = safetensors_io.SafetensorsFolder(src)
  check_tensors(fam, model, folder, src)
  s, shapes, layers = families.sizes(model), our_shapes(model), model["num_layers"]
  params: dict[str, Any] = {}
  for rule in fam.rules(model):
    shape = shapes[rule.ours]
    out = None
    for i, name in enumerate(_names(rule, layers)):
      x = folder.read(name)
      if out is None:
        out = np.empty(((layers,) if rule.per_layer else ()) + shape, x.dtype)
      if rule.per_layer:
        out[i] = rule.to_ours(x, s)
      else:
        out[...] = rule.to_ours(x, s)
      del x
      if progress is not None:
        progress(1)
    _set(params, rule.ours, out)
  return fam, model, hf, params


def check_folder(src: str | os.PathLike, expected: str | None = None) -> int:
  """Checks config.json and the safetensors headers of ``src`` against each other, reading no
  weights; returns how many tensors an import reads."""
  fam, model, _ = describe(src, expected)
  check_tensors(fam, model, safetensors_io.SafetensorsFolder(src), src)
  return sum(model["num_layers"] if r.per_layer else 1 for r in fam.rules(model))


def num_tensors(src: str | os.PathLike, expected: str | None = None) -> int:
  fam, model, _ = describe(src, expected)
  return sum(model["num_layers"] if r.per_layer else 1 for r in fam.rules(model))


def export_params(params: dict[str, Any], model: dict[str, Any], family: str,
                  hf_config: dict[str, Any], out: str | os.PathLike, *,
                  max_shard_bytes: int = 5 * 2**30) -> pathlib.Path:
  """Writes ``config.json`` and safetensors shards that ``load_params`` reads back identically."""
  out = pathlib.Path(out)
  if out.exists() and any(out.iterdir()):
    raise UserError(f"--out={out} is not empty; exports never overwrite: pick a new folder")
  fam = families.FAMILIES[family]
  s = families.sizes(model)
  specs, getters = [], {}
  for rule in fam.rules(model):
    ours = _get(params, rule.ours)
    for i in range(model["num_layers"]) if rule.per_layer else [None]:
      name = rule.theirs.format(i=i) if rule.per_layer else rule.theirs
      shape = _their_shape(rule, tuple(ours.shape[1:] if rule.per_layer else ours.shape), s)
      specs.append((name, shape, np.dtype(ours.dtype)))
      getters[name] = (rule, i)

  def get(name: str) -> np.ndarray:
    rule, i = getters[name]
    ours = np.asarray(_get(params, rule.ours))
    return rule.to_theirs(ours[i] if i is not None else ours, s).copy(order="C")

  out.mkdir(parents=True, exist_ok=True)
  safetensors_io.write_folder(out, specs, get, max_shard_bytes=max_shard_bytes,
                              metadata={"format": "pt"})
  tmp = out / (CONFIG + ".tmp")
  tmp.write_text(json.dumps(hf_config, indent=2, sort_keys=True))
  os.replace(tmp, out / CONFIG)
  return out


def hf_config_for(model: dict[str, Any], family: str, ids: dict[str, Any],
                  base: dict[str, Any] | None = None) -> dict[str, Any]:
  """config.json for our model fields: ``base`` (the imported one) updated, or a fresh one."""
  fam = families.FAMILIES[family]
  hf = dict(base or {})
  for theirs, ours in fam.keys.items():
    hf[theirs] = model[ours]
  if family == "llada":
    hf.setdefault("model_type", "llada")
    hf.setdefault("vocab_size", model["vocab_size"])
    hf.update(weight_tying=bool(model.get("tie_embeddings")), include_bias=False,
              include_qkv_bias=bool(model.get("qkv_bias")), block_type="llama",
              activation_type="silu")
  else:
    hf.setdefault("model_type", {"dream": "Dream"}.get(family, family))
    hf["tie_word_embeddings"] = bool(model.get("tie_embeddings"))
    if fam.causal:
      hf.setdefault("architectures", [{"llama": "LlamaForCausalLM",
                                       "qwen2": "Qwen2ForCausalLM"}[family]])
      hf.setdefault("hidden_act", "silu")
  for k, v in ids.items():
    if v is not None:
      hf[f"{k}_token_id"] = v
  return hf
