"""The denoiser in decode layout: what samplers run on CPU, where a pass sees only a few tokens.

Same network, same numbers (tests/test_decode_layout.py), different parameter layout:

- layers are separate buffers run in a Python loop, not one stacked array under
  ``scan`` (a scanned layer's weights are a slice of the stack, which XLA:CPU
  copies before each matmul);
- q|k|v and gate|up are fused into one kernel each, and every kernel is stored
  [out, in] (contracting the minor axis of both operands).

On XLA:CPU a 32-token window pass of a 114M-parameter model costs about half
as much in this layout (benchmarks/sampler.py), and a full pass is a little
cheaper too.  Training keeps the stacked layout: it shards, remats and scans.

``layout(cfg, params)`` converts; it is pure jnp, so a sampler can call it inside
its jit, before its loop.  ``DiffusionLM.sampling_params()`` converts once and keeps
the copy between calls (``layout`` passes decode-layout parameters through).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from dlm.models import lora, transformer

Array = jax.Array


def layout(cfg: transformer.ModelConfig, params: dict) -> dict:
  """Standard (stacked, [in, out]) parameters -> decode-layout parameters of the same network
  (decode-layout parameters are returned as they are)."""
  if is_decode_layout(params):
    return params
  p = dict(params)
  blocks = p.pop("blocks")
  if cfg.lora_rank:  # adapters folded into the kernels: the fused layout has no low-rank path
    blocks = lora.merge(blocks, cfg.lora_alpha / cfg.lora_rank)
  if p.get("head") is not None:
    p["head"] = p["head"].T  # [V, D]
  p["blocks"] = {i: _layer(jax.tree.map(lambda a, i=i: a[i], blocks))
                 for i in range(cfg.num_layers)}
  return p


def is_decode_layout(params: dict) -> bool:
  return 0 in params["blocks"]  # one entry per layer, not a stack


def _layer(b: dict) -> dict:
  b = dict(b)
  attn, mlp = dict(b.pop("attn")), dict(b.pop("mlp"))
  d = attn["wq"].shape[0]
  flat = lambda w: w.reshape(d, -1)  # [D, heads, H] -> [D, heads * H]
  new_attn = {"wqkv": jnp.concatenate([flat(attn["wq"]), flat(attn["wk"]), flat(attn["wv"])], 1).T,
              "wo": attn["wo"].reshape(-1, d).T}
  if attn.get("bq") is not None:
    new_attn["bqkv"] = jnp.concatenate([attn[k].reshape(-1) for k in ("bq", "bk", "bv")])
  b["attn"] = new_attn
  b["mlp"] = {"w_gate_up": jnp.concatenate([mlp["w_gate"], mlp["w_up"]], 1).T,
              "w_out": mlp["w_out"].T}
  return b


def graphdef(cfg: transformer.ModelConfig) -> nnx.GraphDef:
  return nnx.split(nnx.eval_shape(lambda: transformer.Transformer(
      cfg, rngs=nnx.Rngs(params=0), decode=True)))[0]


def apply_fn(cfg: transformer.ModelConfig) -> Callable[..., Array]:
  """``apply(decode_params, x_t, t, **kw)``: the denoiser's call signature, in decode layout."""
  return transformer.apply_fn(graphdef(cfg))


def for_sampling(cfg: transformer.ModelConfig, apply: Callable[..., Array],
                 use: bool | None = None) -> tuple[Callable[[dict], dict], Callable[..., Array]]:
  """(prepare, apply) a sampler runs as ``apply(prepare(params), x_t, t, **kw)``: the decode
  layout when ``use`` (None: on CPU), else the stacked ``apply`` as is."""
  if not (use_by_default() if use is None else use):
    return (lambda params: params), apply
  return functools.partial(layout, cfg), apply_fn(cfg)


def use_by_default() -> bool:
  """The decode layout pays on XLA:CPU; GPUs and TPUs choose layouts themselves and keep
  the stacked weights (no transient copy)."""
  return jax.default_backend() == "cpu"
