"""The denoiser: a Transformer over token ids (bidirectional, or causal for AR models),
optionally time-conditioned.

Pre-norm blocks (RMSNorm -> attention with RoPE -> SwiGLU), layers stacked on a
leading ``layers`` axis and run under ``nnx.scan``; with time conditioning each
block is modulated by adaLN-Zero (Peebles & Xie 2023).  The embedding table
includes the mask token.  ``apply_fn(graphdef)`` gives the pure
``apply(params, x_t, t, *, attention_mask=None, segment_ids=None, positions=None,
cache=None) -> (logits, cache)`` that losses, evaluation and samplers all call.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
from flax import nnx

from dlm.errors import UserError
from dlm.models import attention as attention_lib
from dlm.models import cache as cache_lib
from dlm.models import layers
from dlm.parallel import constrain

Array = jax.Array

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
_REMAT = {"none", "full", "dots"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  d_model: int = 256
  num_layers: int = 4
  num_heads: int = 4
  head_dim: int | None = None
  mlp_dim: int | None = None
  rope_theta: float = 10_000.0
  norm_eps: float = 1e-6
  time_conditioning: bool = False
  cond_dim: int = 128
  # self-conditioning (Chen et al. 2023, Analog Bits; CDCD, Plaid): the denoiser also takes its
  # previous x0 estimate (``self_cond``), through a zero-initialised projection
  self_conditioning: bool = False
  # parameters a process learns with the denoiser (GenMD4's schedule, ``Process.learned``),
  # filled in by ``loader.build`` from the process, never by hand: ((name, shape, logical axes,
  # initial value), ...), kept under ``params["process"][name]``
  process_params: tuple = ()
  dtype: str = "float32"
  remat: str = "none"
  # MaxText's scan_layers: True runs the layers under one scan (one layer compiled: small,
  # fast compiles of deep models); False unrolls them (no stacked activations for the
  # backward: faster steps where compiling is cheap).  Parameters are stacked either way,
  # so checkpoints are the same.
  scan_layers: bool = True
  # Options that make public checkpoints configurations of this one model (see dlm/convert/):
  num_kv_heads: int | None = None  # grouped-query attention when < num_heads
  qkv_bias: bool = False  # Qwen2 / Dream
  tie_embeddings: bool = False  # logits = h @ embed.T, no separate head
  shift_logits: bool = False  # Dream (from an AR model): position i is predicted at output i-1
  pad_positions: str = "index"  # "index": RoPE at 0..L-1; "cumsum": cumsum(attention_mask) - 1
  # Attention kernel and mask (dlm/models/attention.py): "xla" (any device), "cudnn" (GPU),
  # "splash" (Pallas TPU); "bidirectional", "causal", "block_causal" (blocks of block_size)
  # or "bd3" (BD3-LM: a full pass takes x_t (+) x_0, 2L tokens, positions 0..L-1 twice).
  attention: str = "xla"
  mask_kind: str = "bidirectional"
  block_size: int = 0
  # mask_kind "annealed" (DiffuLLaMA): causal + random keys, visible with probability
  # step / anneal_steps during training; bidirectional from anneal_steps on (and when sampling)
  anneal_steps: int = 0
  # LoRA adapters on these projections (config.lora, dlm/models/lora.py); rank 0 = none
  lora_rank: int = 0
  lora_alpha: float = 0.0
  lora_targets: tuple[str, ...] = ()

  def __post_init__(self):
    if self.dtype not in _DTYPES:
      raise ValueError(f"model.dtype {self.dtype!r} unknown; use one of {sorted(_DTYPES)}")
    if self.remat not in _REMAT:
      raise ValueError(f"model.remat {self.remat!r} unknown; use one of {sorted(_REMAT)}")
    if self.num_kv_heads is not None and (self.num_kv_heads < 1
                                          or self.num_heads % self.num_kv_heads):
      raise ValueError(f"model.num_kv_heads={self.num_kv_heads} must divide"
                       f" model.num_heads={self.num_heads}")
    if self.pad_positions not in ("index", "cumsum"):
      raise ValueError(f"model.pad_positions {self.pad_positions!r} unknown; use 'index' or 'cumsum'")
    attention_lib.check(self.attention, self.mask_kind, self.block_size)
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(
          f"model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads};"
          " change one of them or set model.head_dim")

  @property
  def compute_dtype(self) -> jnp.dtype:
    return _DTYPES[self.dtype]

  @property
  def hd(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def mlp(self) -> int:
    return self.mlp_dim or 4 * self.d_model

  @classmethod
  def from_config(cls, cfg: Any, vocab_size: int | None = None) -> "ModelConfig":
    d = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
    if vocab_size is not None:
      d["vocab_size"] = vocab_size
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"config.model has unknown keys {unknown}; known: {sorted(names)}")
    return cls(**d)


class Block(nnx.Module):
  """x += gate * Attn(mod(norm(x))); x += gate * MLP(mod(norm(x)))."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, decode: bool = False):
    dt = cfg.compute_dtype
    # the decode layout merges adapters into its fused kernels (decode.layout)
    lora = (cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets) if cfg.lora_rank and not decode else None
    self.attn_norm = layers.RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
    self.attn = layers.Attention(cfg.d_model, cfg.num_heads, cfg.hd, rope_theta=cfg.rope_theta,
                                 dtype=dt, rngs=rngs, num_kv_heads=cfg.num_kv_heads,
                                 qkv_bias=cfg.qkv_bias, backend=cfg.attention,
                                 mask_kind=cfg.mask_kind, block_size=cfg.block_size,
                                 decode=decode, lora=lora)
    self.mlp_norm = layers.RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
    self.mlp = layers.SwiGLU(cfg.d_model, cfg.mlp, dtype=dt, rngs=rngs, decode=decode, lora=lora)
    self.ada = (layers.AdaLNZero(cfg.cond_dim, cfg.d_model, 6, rngs=rngs)
                if cfg.time_conditioning else None)

  def __call__(self, x: Array, positions: Array, mask: tuple[Array | None, Array | None],
               c: Array | None,
               kv: tuple[Array, Array, Array] | None = None,
               rotations: tuple[Any, Any] | None = None) -> tuple[Array, Array, Array]:
    """-> (x, this layer's pre-RoPE keys, values for x's positions)."""
    if self.ada is not None:
      s1, sc1, g1, s2, sc2, g2 = self.ada(c)
      a, k, v = self.attn(layers.modulate(self.attn_norm(x), s1, sc1), positions, mask, kv,
                          rotations)
      x = x + g1.astype(x.dtype) * a
      x = x + g2.astype(x.dtype) * self.mlp(layers.modulate(self.mlp_norm(x), s2, sc2))
    else:
      a, k, v = self.attn(self.attn_norm(x), positions, mask, kv, rotations)
      x = x + a
      x = x + self.mlp(self.mlp_norm(x))
    return constrain(x, ("batch", "length", "embed")), k, v


class Transformer(nnx.Module):
  """Bidirectional denoiser: token ids x_t (and t) -> logits over the vocabulary.

  ``decode=True`` builds the same network in decode layout (see decode.py): a
  list of layers run in a Python loop, fused kernels stored [out, in].
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, decode: bool = False):
    self.cfg, self.decode = cfg, decode
    self.embed = layers.param(rngs, jax.nn.initializers.normal(1.0), (cfg.vocab_size, cfg.d_model),
                              ("vocab", "embed"))

    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(r: nnx.Rngs) -> Block:
      return Block(cfg, rngs=r)

    self.blocks = (nnx.List([Block(cfg, rngs=rngs, decode=True) for _ in range(cfg.num_layers)])
                   if decode else make_blocks(rngs))
    self.time_embed = layers.TimeEmbed(cfg.cond_dim, rngs=rngs) if cfg.time_conditioning else None
    self.self_cond = (layers.param(rngs, jax.nn.initializers.zeros, (cfg.d_model, cfg.d_model),
                                   (None, "embed")) if cfg.self_conditioning else None)
    if cfg.process_params:
      self.process = nnx.Dict({
          name: layers.param(rngs, jax.nn.initializers.constant(init), tuple(shape), tuple(axes))
          for name, shape, axes, init in cfg.process_params})
    self.final_ada = (layers.AdaLNZero(cfg.cond_dim, cfg.d_model, 2, rngs=rngs)
                      if cfg.time_conditioning else None)
    self.final_norm = layers.RMSNorm(cfg.d_model, eps=cfg.norm_eps, rngs=rngs)
    head_shape, head_names = (((cfg.vocab_size, cfg.d_model), ("vocab", "embed")) if decode
                              else ((cfg.d_model, cfg.vocab_size), ("embed", "vocab")))
    self.head = (None if cfg.tie_embeddings else
                 layers.param(rngs, jax.nn.initializers.normal(cfg.d_model ** -0.5), head_shape,
                              head_names))

  def __call__(self, x_t: Array, t: Array | None = None, *, attention_mask: Array | None = None,
               segment_ids: Array | None = None, positions: Array | None = None,
               cache: cache_lib.KVCache | None = None, cache_start: Array | None = None,
               fill_cache: bool = False, raw_logits: bool = False, step: Array | None = None,
               inputs_embeds: Array | None = None, self_cond: Array | None = None
               ) -> tuple[Array, cache_lib.KVCache | None]:
    """The denoiser contract: x_t int [B, L] (or ``inputs_embeds`` float [B, L, D], continuous
    inputs, with x_t None), t float [B], [B, L] or None -> (logits f32 [B, L, V], cache).

    ``self_cond``: the previous x0 estimate, probabilities [B, L, V] (embedded as p @ embed) or
    vectors [B, L, D], added through the model's zero-initialised self-conditioning
    projection (``model.self_conditioning``; a model without it refuses).

    Logits at position i are the denoiser's prediction of token i; with
    ``shift_logits`` that is the network's output i-1 (position 0 keeps its own),
    and ``raw_logits=True`` returns the unshifted output (what the public code returns).
    ``attention_mask`` (1 = real token) masks keys; left-padded rows get positions
    per ``pad_positions``; with ``cache`` it is the mask of all L cached keys.
    ``segment_ids`` / ``positions`` [B, L]: packed rows.  KV cache (see cache.py):
    ``step``: the training step, which an ``annealed`` model's attention mask follows
    (``attention.annealed_visible``; None: bidirectional).
    ``fill_cache=True`` returns this pass's KVCache; with ``cache`` and ``cache_start``,
    x_t is the window of tokens at [cache_start, cache_start + W) of the cached
    sequence, and the cache comes back as given, or with ``fill_cache=True`` with the
    window's keys/values written in.  Otherwise the cache returned is None.
    """
    cfg = self.cfg
    if inputs_embeds is not None:
      chex.assert_rank(inputs_embeds, 3)
      chex.assert_axis_dimension(inputs_embeds, 2, cfg.d_model)
      b, l = inputs_embeds.shape[:2]
    else:
      chex.assert_rank(x_t, 2)
      b, l = x_t.shape
    if self_cond is not None and self.self_cond is None:
      raise UserError("self-conditioning was asked of a denoiser without it: set"
                      " model.self_conditioning=True (and train with it), or pass no self_cond")
    if (positions is None and attention_mask is not None and cfg.pad_positions == "cumsum"
        and cache is None):
      real = attention_mask.astype(jnp.int32)
      positions = jnp.where(real > 0, jnp.cumsum(real, axis=-1) - 1, 1)
    rotations = None
    if positions is None and cfg.mask_kind == "bd3" and cache is None:
      if l % 2:
        raise ValueError(f"a full pass of a mask_kind='bd3' model takes x_t (+) x_0 (2L"
                         f" tokens); got {l}")
      positions = jnp.broadcast_to(jnp.tile(jnp.arange(l // 2, dtype=jnp.int32), 2), (b, l))
    if positions is None:
      offset = 0 if cache_start is None else cache_start
      positions = jnp.broadcast_to(offset + jnp.arange(l, dtype=jnp.int32), (b, l))
      if self.decode:  # RoPE tables as constants (layers.rotation_table)
        k_rot = layers.rotation_table(l if cache is None else cache.length, cfg.hd,
                                      cfg.rope_theta)
        q_rot = k_rot if cache is None else tuple(
            jax.lax.dynamic_slice_in_dim(a, offset, l, axis=1) for a in k_rot)
        rotations = tuple(tuple(jnp.broadcast_to(a, (b, *a.shape[1:])) for a in r)
                          for r in (q_rot, k_rot))
    mask = (segment_ids, attention_mask)
    if cfg.mask_kind == "annealed" and step is not None and cache is None:
      mask = mask + (attention_lib.annealed_visible(jnp.asarray(step), cfg.anneal_steps, l),)
    if cache is not None and (segment_ids is not None
                              or (attention_mask is not None and cfg.pad_positions != "index")):
      raise ValueError("a KV-cached window pass takes no segment_ids, and needs, with an"
                       " attention_mask (all L cached keys'), pad_positions='index'")
    if inputs_embeds is not None:
      x = inputs_embeds.astype(cfg.compute_dtype)  # continuous inputs (embedding diffusion)
    else:
      x = jnp.take(self.embed[...], x_t, axis=0).astype(cfg.compute_dtype)  # [B, L, D]
    if self_cond is not None:
      chex.assert_rank(self_cond, 3)
      prev = self_cond.astype(cfg.compute_dtype)
      if prev.shape[-1] == cfg.vocab_size:  # probabilities: their expected embedding
        prev = prev @ self.embed[...].astype(cfg.compute_dtype)
      chex.assert_axis_dimension(prev, 2, cfg.d_model)
      x = x + layers.matmul(prev, self.self_cond[...].astype(cfg.compute_dtype))
    x = constrain(x, ("batch", "length", "embed"))
    c = None
    if self.time_embed is not None:
      if t is None:
        raise ValueError("this model is time-conditioned (model.time_conditioning=True): pass t")
      t = jnp.asarray(t)
      c = self.time_embed(t if t.ndim == 2 else jnp.broadcast_to(t, (b,)))  # per position or row

    def body(block: Block, h: Array) -> Array:
      return block(h, positions, mask, c)[0]

    if self.decode:
      ks, vs = [], []
      for i, block in enumerate(self.blocks):
        kv = None if cache is None else (cache.k[i], cache.v[i], cache_start)
        x, k, v = block(x, positions, mask, c, kv, rotations)
        ks.append(k)
        vs.append(v)
      new_cache = cache_lib.KVCache(k=tuple(ks), v=tuple(vs))  # one buffer per layer
    elif cache is not None or fill_cache:
      def body_kv(block: Block, h: Array, layer_kv: Any) -> tuple[Array, tuple[Array, Array]]:
        kv = None if layer_kv is None else (layer_kv[0], layer_kv[1], cache_start)
        h, k, v = block(h, positions, mask, c, kv)
        return h, (k, v)

      stacked = None if cache is None else cache.stacked()
      xs = None if stacked is None else (stacked.k, stacked.v)
      x, (ks, vs) = nnx.scan(body_kv, in_axes=(0, nnx.Carry, 0),
                             out_axes=(nnx.Carry, 0))(self.blocks, x, xs)
      new_cache = cache_lib.KVCache(k=ks, v=vs)
    else:
      if cfg.remat != "none":
        policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable if cfg.remat == "dots"
                  else None)
        body = nnx.remat(body, policy=policy)
      if cfg.scan_layers:
        x = nnx.scan(body, in_axes=(0, nnx.Carry), out_axes=nnx.Carry)(self.blocks, x)
      else:  # the same stacked parameters, layer i sliced out: a Python loop in the program
        graphdef, stacked = nnx.split(self.blocks)
        for i in range(cfg.num_layers):
          x = body(nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], stacked)), x)
      new_cache = None

    h = self.final_norm(x)
    if self.final_ada is not None:
      shift, scale = self.final_ada(c)
      h = layers.modulate(h, shift, scale)
    if self.decode:
      w = self.embed if self.head is None else self.head
      logits = layers.dense(h, w[...].astype(cfg.compute_dtype))
    elif self.head is None:
      logits = layers.matmul(h, self.embed[...].astype(cfg.compute_dtype).T)
    else:
      logits = layers.matmul(h, self.head[...].astype(cfg.compute_dtype))
    if cfg.shift_logits and not raw_logits:
      logits = jnp.concatenate([logits[:, :1], logits[:, :-1]], axis=1)
    logits = constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))
    chex.assert_shape(logits, (b, l, cfg.vocab_size))
    return logits, (new_cache if fill_cache else cache)


def init_model(cfg: ModelConfig, seed: int) -> Transformer:
  return Transformer(cfg, rngs=nnx.Rngs(params=seed))


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
  """GraphDef and shape-only State, without allocating parameters."""
  return nnx.split(nnx.eval_shape(lambda: init_model(cfg, 0)))


def apply_fn(graphdef: nnx.GraphDef) -> Callable[..., tuple[Array, Any]]:
  """The pure denoiser ``apply(params, x_t, t, **kw) -> (logits, cache)`` of a split model
  (``Transformer.__call__``'s keywords)."""

  def apply(params: nnx.State, x_t: Array, t: Array | None = None,
            **kw: Any) -> tuple[Array, Any]:
    return nnx.merge(graphdef, params)(x_t, t, **kw)

  return apply


def count_params(params: Any) -> int:
  return int(sum(x.size for x in jax.tree.leaves(params)))


def param_logical_specs(model_cfg: ModelConfig) -> tuple[nnx.GraphDef, Any, Any]:
  """(graphdef, abstract params, logical PartitionSpecs) without allocating anything."""
  graphdef, abstract = abstract_model(model_cfg)
  specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract))
  return graphdef, nnx.to_pure_dict(abstract), specs
