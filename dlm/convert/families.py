"""Public checkpoint families as configurations of our Transformer: config and tensor-name maps.

LLaDA (Nie et al. 2025): a bidirectional LLaMA, no biases, rotate-half RoPE,
untied head.  Dream (Ye et al. 2025): Qwen2.5 weights (GQA, q/k/v biases, RoPE
theta 1e6) whose logits are shifted by one position (adapted from an AR model).
Llama and Qwen2 (``LlamaForCausalLM``, ``Qwen2ForCausalLM``): the same blocks with causal
attention and shifted logits, i.e. autoregressive models (``mask_kind="causal"``, the
``autoregressive`` process, the ``ar`` sampler).
Each family is a set of ``Rule``s: our parameter path <- its tensor name, and
the exact (invertible) reshape between the two layouts.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import numpy as np

from dlm.errors import UserError
from dlm.models import transformer

Array = np.ndarray
MAX_SIZE = 2**31 - 1  # the largest size or id a config.json may give (int32 indices)
FLOAT_FIELDS = ("rope_theta", "norm_eps")  # our fields that are positive floats; the rest are sizes
ID_KEYS = tuple(f"{k}_token_id" for k in ("mask", "eos", "pad", "bos"))
LENGTH_KEYS = ("max_sequence_length", "max_position_embeddings")


@dataclasses.dataclass(frozen=True)
class Rule:
  ours: tuple[str, ...]  # path in our params dict; under "blocks" the layer axis comes first
  theirs: str  # tensor name, "{i}" for the layer index
  to_ours: Callable[[Array, dict[str, int]], Array]
  to_theirs: Callable[[Array, dict[str, int]], Array]

  @property
  def per_layer(self) -> bool:
    return "{i}" in self.theirs


def _same(x: Array, _: dict[str, int]) -> Array:
  return x


def _t(x: Array, _: dict[str, int]) -> Array:
  return x.T


def _in_heads(n: str) -> tuple[Callable, Callable]:
  """Linear [n*hd, d] (out, in) <-> ours [d, n, hd]."""
  return (lambda x, s: x.T.reshape(s["d"], s[n], s["hd"]),
          lambda y, s: y.reshape(s["d"], s[n] * s["hd"]).T)


def _bias(n: str) -> tuple[Callable, Callable]:
  """Bias [n*hd] <-> ours [n, hd]."""
  return (lambda x, s: x.reshape(s[n], s["hd"]), lambda y, s: y.reshape(s[n] * s["hd"]))


_OUT = (lambda x, s: x.T.reshape(s["nh"], s["hd"], s["d"]),  # o_proj [d, nh*hd] <-> [nh, hd, d]
        lambda y, s: y.reshape(s["nh"] * s["hd"], s["d"]).T)


def _rules(names: dict[str, str], qkv_bias: bool, tied: bool) -> list[Rule]:
  q, kv = _in_heads("nh"), _in_heads("nkv")
  rules = [
      Rule(("embed",), names["embed"], _same, _same),
      Rule(("blocks", "attn_norm", "scale"), names["attn_norm"], _same, _same),
      Rule(("blocks", "attn", "wq"), names["q"], *q),
      Rule(("blocks", "attn", "wk"), names["k"], *kv),
      Rule(("blocks", "attn", "wv"), names["v"], *kv),
      Rule(("blocks", "attn", "wo"), names["o"], *_OUT),
      Rule(("blocks", "mlp_norm", "scale"), names["mlp_norm"], _same, _same),
      Rule(("blocks", "mlp", "w_gate"), names["gate"], _t, _t),
      Rule(("blocks", "mlp", "w_up"), names["up"], _t, _t),
      Rule(("blocks", "mlp", "w_out"), names["down"], _t, _t),
      Rule(("final_norm", "scale"), names["final_norm"], _same, _same),
  ]
  if qkv_bias:
    rules += [Rule(("blocks", "attn", "bq"), names["q"].replace(".weight", ".bias"), *_bias("nh")),
              Rule(("blocks", "attn", "bk"), names["k"].replace(".weight", ".bias"), *_bias("nkv")),
              Rule(("blocks", "attn", "bv"), names["v"].replace(".weight", ".bias"), *_bias("nkv"))]
  if not tied:
    rules.append(Rule(("head",), names["head"], _t, _t))
  return rules


_LLADA = {"embed": "model.transformer.wte.weight",
          "attn_norm": "model.transformer.blocks.{i}.attn_norm.weight",
          "q": "model.transformer.blocks.{i}.q_proj.weight",
          "k": "model.transformer.blocks.{i}.k_proj.weight",
          "v": "model.transformer.blocks.{i}.v_proj.weight",
          "o": "model.transformer.blocks.{i}.attn_out.weight",
          "mlp_norm": "model.transformer.blocks.{i}.ff_norm.weight",
          "gate": "model.transformer.blocks.{i}.ff_proj.weight",
          "up": "model.transformer.blocks.{i}.up_proj.weight",
          "down": "model.transformer.blocks.{i}.ff_out.weight",
          "final_norm": "model.transformer.ln_f.weight",
          "head": "model.transformer.ff_out.weight"}

_DREAM = {"embed": "model.embed_tokens.weight",
          "attn_norm": "model.layers.{i}.input_layernorm.weight",
          "q": "model.layers.{i}.self_attn.q_proj.weight",
          "k": "model.layers.{i}.self_attn.k_proj.weight",
          "v": "model.layers.{i}.self_attn.v_proj.weight",
          "o": "model.layers.{i}.self_attn.o_proj.weight",
          "mlp_norm": "model.layers.{i}.post_attention_layernorm.weight",
          "gate": "model.layers.{i}.mlp.gate_proj.weight",
          "up": "model.layers.{i}.mlp.up_proj.weight",
          "down": "model.layers.{i}.mlp.down_proj.weight",
          "final_norm": "model.norm.weight",
          "head": "lm_head.weight"}


def _show(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 40 else text[:37] + "..."


def _refuse(path: str, key: str, value: Any, want: str) -> UserError:
  return UserError(f"{path}: {key}={_show(value)} is not {want}; fix it or use the config.json"
                   " that came with the weights")


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def check_size(path: str, key: str, value: Any, lo: int = 1, hi: int = MAX_SIZE) -> int:
  """``value`` when it is an integer in [lo, hi] (a bool, float or string is refused)."""
  if not _is_int(value) or not lo <= value <= hi:
    raise _refuse(path, key, value, f"an integer in [{lo}, {hi}]")
  return value


def check_positive(path: str, key: str, value: Any) -> float:
  """``value`` when it is a finite positive number (a bool or string is refused)."""
  if (not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
      or value <= 0):
    raise _refuse(path, key, value, "a finite positive number")
  return value


def check_flag(path: str, key: str, value: Any) -> None:
  """A true/false option: absent, null or a JSON bool (the string "false" is refused)."""
  if value is not None and not isinstance(value, bool):
    raise _refuse(path, key, value, "true or false")


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  model_types: tuple[str, ...]
  names: dict[str, str]
  # config.json key -> our field, per family
  keys: dict[str, str]
  defaults: dict[str, Any]
  fixed: dict[str, Any]  # our model options this family always has
  flags: tuple[str, ...] = ()  # config.json keys that are true/false
  causal: bool = False  # an autoregressive model (causal attention, next-token logits)

  def model_fields(self, hf: dict[str, Any], path: str) -> dict[str, Any]:
    """Our config.model (plus "vocab_size") from the family's config.json."""
    missing = [k for k in self.keys if hf.get(k) is None and k not in self.defaults]
    if missing:
      raise UserError(f"{path} lacks {missing} for a {self.name} model; use the config.json"
                      " that came with the weights")
    get = lambda k: hf[k] if hf.get(k) is not None else self.defaults[k]
    for key in self.flags:
      check_flag(path, key, hf.get(key))
    out = {ours: get(k) for k, ours in self.keys.items()}
    self._check_numbers(hf, out, path)
    out.update(self.fixed)
    if self.name == "llada":
      out["qkv_bias"] = bool(hf.get("include_qkv_bias") or hf.get("include_bias"))
      out["tie_embeddings"] = bool(hf.get("weight_tying", False))
      if hf.get("block_type", "llama") != "llama" or hf.get("activation_type", "silu") != "silu":
        raise UserError(f"{path}: only LLaDA's llama/silu blocks are supported, got block_type="
                        f"{_show(hf.get('block_type'))}, activation_type="
                        f"{_show(hf.get('activation_type'))}")
    else:
      out["tie_embeddings"] = bool(hf.get("tie_word_embeddings", False))
    if self.causal:
      self._check_causal(hf, path)
    out["num_kv_heads"] = out.get("num_kv_heads") or out["num_heads"]
    out["head_dim"] = out["d_model"] // out["num_heads"]
    return out

  def _check_causal(self, hf: dict[str, Any], path: str) -> None:
    """What a Llama / Qwen2 config.json may ask that our blocks do not compute: one line."""
    refuse = {"rope_scaling": hf.get("rope_scaling") is not None,
              "use_sliding_window": bool(hf.get("use_sliding_window")),
              "attention_bias": bool(hf.get("attention_bias")),
              "mlp_bias": bool(hf.get("mlp_bias")),
              "hidden_act": hf.get("hidden_act", "silu") != "silu",
              "head_dim": hf.get("head_dim") not in (None, hf.get("hidden_size", 0) // max(
                  1, hf.get("num_attention_heads") or 1))}
    bad = [k for k, v in refuse.items() if v]
    if bad:
      raise UserError(f"{path}: {bad[0]}={_show(hf.get(bad[0]))} is not supported for a"
                      f" {self.name} model (dlm computes plain RoPE, no sliding window, no"
                      " o_proj/MLP biases, SiLU, head_dim = hidden_size / heads)")

  def _check_numbers(self, hf: dict[str, Any], out: dict[str, Any], path: str) -> None:
    """Types and ranges of every number read from config.json, before any size is used."""
    theirs = {ours: k for k, ours in self.keys.items()}
    if self.name == "llada" and hf.get("vocab_size") is not None:  # embedding_size's default
      check_size(path, "vocab_size", hf["vocab_size"])
    for ours, value in out.items():
      if ours in FLOAT_FIELDS:
        check_positive(path, theirs[ours], value)
      elif value is not None or ours != "num_kv_heads":
        check_size(path, theirs[ours], value)
    d, nh, nkv = out["d_model"], out["num_heads"], out["num_kv_heads"] or out["num_heads"]
    if d % nh:
      raise UserError(f"{path}: {theirs['d_model']}={d} is not divisible by"
                      f" {theirs['num_heads']}={nh}; fix it or use the config.json that came with"
                      " the weights")
    if nh % nkv:
      raise UserError(f"{path}: {theirs['num_kv_heads']}={nkv} does not divide"
                      f" {theirs['num_heads']}={nh}; fix it or use the config.json that came with"
                      " the weights")
    for key in LENGTH_KEYS:
      if hf.get(key) is not None:
        check_size(path, key, hf[key])
    for key in ID_KEYS:
      value = hf.get(key)
      # Llama 3 lists several eos ids; every other id is one integer
      for v in (_listed(value) if key == "eos_token_id" and isinstance(value, list) else
                [] if value is None else [value]):
        check_size(path, key, v, 0, out["vocab_size"] - 1)
    mask = self.defaults.get("mask_token_id")
    if hf.get("mask_token_id") is None and mask is not None and mask >= out["vocab_size"]:
      raise UserError(f"{path} has no mask_token_id and the {self.name} default {mask} is not"
                      f" below its {out['vocab_size']} embedding rows; add the model's"
                      " mask_token_id to config.json")

  def rules(self, model: dict[str, Any]) -> list[Rule]:
    return _rules(self.names, bool(model.get("qkv_bias")), bool(model.get("tie_embeddings")))

  def special_ids(self, hf: dict[str, Any]) -> dict[str, int | None]:
    """mask, eos, pad, bos ids (the first of a list: Llama 3's several EOS ids)."""
    ids = {k: next(iter(_listed(hf.get(f"{k}_token_id"))), None)
           for k in ("mask", "eos", "pad", "bos")}
    if ids["mask"] is None:
      ids["mask"] = self.defaults.get("mask_token_id")
    return ids


LLADA = Family(
    name="llada", model_types=("llada",), names=_LLADA,
    keys={"embedding_size": "vocab_size", "d_model": "d_model", "n_layers": "num_layers",
          "n_heads": "num_heads", "n_kv_heads": "num_kv_heads", "mlp_hidden_size": "mlp_dim",
          "rope_theta": "rope_theta", "rms_norm_eps": "norm_eps"},
    defaults={"n_kv_heads": None, "rope_theta": 10_000.0, "rms_norm_eps": 1e-5,
              "embedding_size": None, "mask_token_id": 126336},
    fixed={"shift_logits": False, "pad_positions": "index"},
    flags=("weight_tying", "include_bias", "include_qkv_bias"))

DREAM = Family(
    name="dream", model_types=("dream",), names=_DREAM,
    keys={"vocab_size": "vocab_size", "hidden_size": "d_model", "num_hidden_layers": "num_layers",
          "num_attention_heads": "num_heads", "num_key_value_heads": "num_kv_heads",
          "intermediate_size": "mlp_dim", "rope_theta": "rope_theta", "rms_norm_eps": "norm_eps"},
    defaults={"num_key_value_heads": None, "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6,
              "mask_token_id": 151666},
    fixed={"qkv_bias": True, "shift_logits": True, "pad_positions": "cumsum"},
    flags=("tie_word_embeddings",))

_CAUSAL_KEYS = dict(DREAM.keys)
_CAUSAL_FIXED = {"shift_logits": True, "pad_positions": "index", "mask_kind": "causal"}

LLAMA = Family(
    name="llama", model_types=("llama",), names=_DREAM, keys=_CAUSAL_KEYS,
    defaults={"num_key_value_heads": None, "rope_theta": 10_000.0, "rms_norm_eps": 1e-6},
    fixed={"qkv_bias": False, **_CAUSAL_FIXED},
    flags=("tie_word_embeddings", "attention_bias", "mlp_bias"), causal=True)

QWEN2 = Family(
    name="qwen2", model_types=("qwen2",), names=_DREAM, keys=_CAUSAL_KEYS,
    defaults={"num_key_value_heads": None, "rope_theta": 10_000.0, "rms_norm_eps": 1e-6},
    fixed={"qkv_bias": True, **_CAUSAL_FIXED},
    flags=("tie_word_embeddings", "use_sliding_window"), causal=True)

FAMILIES = {f.name: f for f in (LLADA, DREAM, LLAMA, QWEN2)}


def _listed(value: Any) -> list[Any]:
  """An id field of config.json as a list (absent: empty; Llama 3's eos list as it is)."""
  if value is None:
    return []
  return list(value) if isinstance(value, list) and value else [value]


def family_of(hf: dict[str, Any], path: str, expected: str | None = None) -> Family:
  """The family of a config.json by its ``model_type`` (checked against ``--from`` if given)."""
  model_type = str(hf.get("model_type", "")).lower()
  found = next((f for f in FAMILIES.values() if model_type in f.model_types), None)
  if found is None:
    raise UserError(f"{path} has model_type={hf.get('model_type')!r}; dlm converts"
                    f" {sorted(FAMILIES)} (model_type 'llada', 'Dream', 'llama' or 'qwen2')")
  if expected is not None and expected != found.name:
    raise UserError(f"--from={expected} but {path} holds a {found.name} model; use --from={found.name}")
  return found


def with_embedding_size(hf: dict[str, Any]) -> dict[str, Any]:
  """LLaDA's embedding rows (``embedding_size``, padded) default to ``vocab_size``."""
  hf = dict(hf)
  if str(hf.get("model_type", "")).lower() == "llada" and not hf.get("embedding_size"):
    hf["embedding_size"] = hf.get("vocab_size")
  return hf


def sizes(model: dict[str, Any]) -> dict[str, int]:
  return {"d": model["d_model"], "nh": model["num_heads"], "nkv": model["num_kv_heads"],
          "hd": model["head_dim"]}


def dlm_config(family: str, model: dict[str, Any], hf_cfg: dict[str, Any],
               ids: dict[str, Any], src: str, param_dtype: str) -> dict[str, Any]:
  """The workdir config.json of an imported model: our model fields, a masked process, ids."""
  fields = {f.name: f.default for f in dataclasses.fields(transformer.ModelConfig)
            if f.default is not dataclasses.MISSING}
  fields.update({k: v for k, v in model.items() if k in fields or k == "vocab_size"})
  seq_len = int(hf_cfg.get("max_sequence_length") or hf_cfg.get("max_position_embeddings") or 4096)
  causal = FAMILIES[family].causal
  process = ({"name": "autoregressive", "schedule": {"name": "linear"}} if causal
             else {"name": "masked", "schedule": {"name": "linear", "eps": 1e-4}})
  return {
      "seed": 0,
      "model": fields,
      "process": process,
      "data": {"source": "hf", "vocab_size": int(model["vocab_size"]), "seq_len": seq_len},
      "sample": {"sampler": "ar" if causal else family, "steps": 128, "num_samples": 1, "length": 128,
                 "temperature": 1.0, "top_p": 1.0, "seed": 0},
      "eval": {"batch_size": 8, "num_passes": 1, "max_rows": 0, "seed": 1234},
      "hf": {"family": family, "ids": ids, "source": src, "param_dtype": param_dtype},
  }
