"""Attention backends behind one mask description: ``xla``, ``cudnn`` and ``splash`` (Pallas TPU).

softmax(q k^T / sqrt(H) + mask) v (Vaswani et al. 2017, eq. 1) with the mask

  allowed[b, i, j] = kind(i, j) & (segment_q[b, i] == segment_kv[b, j]) & real_kv[b, j]

where ``kind`` is ``bidirectional`` (all pairs), ``causal`` (j <= i) or
``block_causal`` (block(j) <= block(i), blocks of ``block_size``: block size 1 is causal,
L is bidirectional) or ``bd3``: BD3-LM's training mask over x_t (+) x_0, 2L tokens
(Arriola et al. 2025, Sec. 3.2 / Fig. 2): block-diagonal inside x_t and inside x_0
(M_BD), each noisy block sees the clean blocks before it (offset block-causal, M_OBC), and
x_0 is block-causal (M_BC); x_0 never sees x_t.  A KV-cached window pass of a ``bd3``
model (sampling: the noisy block against the cached clean ones) is ``block_causal``.

- ``xla``: two heads-major batched matmuls with a dense boolean mask, normalized after the
  value product (``jax.nn.dot_product_attention``'s math, leaner on XLA:CPU); any device.
- ``cudnn``: the same call with ``implementation="cudnn"`` (NVIDIA GPUs; fused flash attention).
- ``splash``: the Pallas TPU splash-attention kernel (block-sparse flash attention).  The kind
  is a static block mask; segments and padding become segment ids (a pad key gets segment 0,
  so no real query sees it).  Under a mesh the kernel runs per shard (``shard_map`` over the
  batch and head axes); on a non-TPU backend it runs in Pallas interpret mode (for tests).
  Rows of pad *queries* are left unspecified (they see other pads, not the real tokens as in
  ``xla``); every output of a real query is identical.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dlm import parallel

Array = jax.Array
BACKENDS = ("xla", "cudnn", "splash")
MASK_KINDS = ("bidirectional", "causal", "block_causal", "bd3", "annealed")
SPLASH_BLOCK = 128  # splash tiles: sequence lengths must be multiples of this


def check(backend: str, kind: str, block_size: int) -> None:
  if backend not in BACKENDS:
    raise ValueError(f"model.attention={backend!r} unknown; use one of {list(BACKENDS)}")
  if kind not in MASK_KINDS:
    raise ValueError(f"model.mask_kind={kind!r} unknown; use one of {list(MASK_KINDS)}")
  if kind in ("block_causal", "bd3") and block_size < 1:
    raise ValueError(f"model.mask_kind={kind!r} needs model.block_size >= 1")
  if kind == "annealed" and backend == "splash":
    raise ValueError("model.mask_kind='annealed' draws a random mask per step: use"
                     " model.attention='xla' or 'cudnn'")


def annealed_visible(step: Array, anneal_steps: int, length: int) -> Array:
  """DiffuLLaMA's attention-mask annealing (Gong et al. 2024, sec. 3.2): [L, L] bool, causal
  plus each key after the query visible with probability min(1, step / anneal_steps), one
  draw per step shared by the batch; fully bidirectional from step ``anneal_steps`` on."""
  ratio = jnp.clip(step.astype(jnp.float32) / max(int(anneal_steps), 1), 0.0, 1.0)
  u = jax.random.uniform(jax.random.fold_in(jax.random.key(0), step), (length, length))
  causal = jnp.arange(length)[None, :] <= jnp.arange(length)[:, None]
  return causal | (u < ratio)


def kind_mask(kind: str, block_size: int, q_len: int, kv_len: int, q_offset: int = 0) -> np.ndarray:
  """Static [Lq, Lk] bool: which keys each query may see by position alone."""
  i = np.arange(q_len)[:, None] + q_offset
  j = np.arange(kv_len)[None, :]
  if kind in ("bidirectional", "annealed"):  # annealed: bidirectional once trained (no step)
    return np.ones((q_len, kv_len), bool)
  if kind == "causal":
    return j <= i
  if kind == "bd3":
    return bd3_mask(q_len, block_size)[q_offset:q_offset + q_len, :kv_len]
  return (j // block_size) <= (i // block_size)


def bd3_mask(length: int, block_size: int) -> np.ndarray:
  """BD3-LM's [2n, 2n] mask over x_t (+) x_0 (``length`` = 2n): M_BD | M_OBC | M_BC."""
  if length % 2 or (length // 2) % block_size:
    raise ValueError(f"mask_kind='bd3' needs x_t (+) x_0 of 2n tokens with block_size"
                     f" {block_size} dividing n; got {length} tokens")
  n = length // 2
  idx = np.arange(length)
  clean = idx >= n
  block = np.where(clean, idx - n, idx) // block_size
  bq, bk = block[:, None], block[None, :]
  cq, ck = clean[:, None], clean[None, :]
  diagonal = (bq == bk) & (cq == ck)
  offset_causal = (bq > bk) & ck & ~cq
  causal_clean = (bq >= bk) & ck & cq
  return diagonal | offset_causal | causal_clean


def dense_mask(kind: str, block_size: int, q_len: int, kv_len: int, *,
               segment_ids: Array | None = None, attention_mask: Array | None = None,
               q_offset: int = 0, visible: Array | None = None) -> Array | None:
  """The boolean mask [B or 1, 1, Lq, Lk] of the module docstring (None: attend everywhere).
  ``visible`` [Lq, Lk] replaces the kind's position mask (``annealed_visible``)."""
  mask = None
  if visible is not None:
    mask = visible[None, None]
  elif kind not in ("bidirectional", "annealed"):
    mask = jnp.asarray(kind_mask(kind, block_size, q_len, kv_len, q_offset))[None, None]
  if segment_ids is not None:
    same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    mask = same if mask is None else mask & same
  if attention_mask is not None:
    keys = attention_mask.astype(bool)[:, None, None, :]
    mask = keys if mask is None else mask & keys
  return mask


def attend(q: Array, k: Array, v: Array, *, backend: str = "xla", kind: str = "bidirectional",
           block_size: int = 0, segment_ids: Array | None = None,
           attention_mask: Array | None = None, q_offset: int = 0,
           visible: Array | None = None) -> Array:
  """q: [B, Lq, N, H]; k, v: [B, Lk, K, H] with K dividing N (GQA) -> [B, Lq, N, H].

  ``segment_ids`` / ``attention_mask`` ([B, Lk], 1 = real) are the keys' (and, for
  segments, the queries', when Lq == Lk); ``q_offset`` places a query window at
  absolute positions [q_offset, q_offset + Lq) for the kind mask (KV-cached passes).
  """
  check(backend, kind, block_size)
  if backend == "splash":
    if q.shape[1] != k.shape[1] or q_offset:
      raise ValueError("model.attention='splash' runs full-sequence passes; a KV-cached window"
                       " pass needs model.attention='xla' or 'cudnn'")
    return _splash(q, k, v, kind, block_size, segment_ids, attention_mask)
  if kind == "annealed" and visible is None:
    kind = "bidirectional"
  mask = dense_mask(kind, block_size, q.shape[1], k.shape[1], segment_ids=segment_ids,
                    attention_mask=attention_mask, q_offset=q_offset, visible=visible)
  if backend == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
  return _xla(q, k, v, mask)


def _xla(q: Array, k: Array, v: Array, mask: Array | None) -> Array:
  """softmax(q k^T / sqrt(H) + mask) v, heads-major, normalized after the value product:
  exp(s - max) v / sum exp(s - max) divides the [Lq, H] output, not the [Lq, Lk] scores (one
  pass over the scores fewer than a softmax).  A kv head's G query heads are one query axis
  of G * Lq rows, so every product is a 4-D batched matmul over (batch, kv head), with no
  repeated keys (XLA:CPU's gradient of a 5-D grouped product is ~1.5x slower).  On XLA:CPU
  this is faster forward and backward than ``jax.nn.dot_product_attention`` at
  benchmarks/train_step.py's shapes (tests/test_attention.py checks they agree)."""
  b, lq, n, h = q.shape
  lk, kv = k.shape[1], k.shape[2]
  g = n // kv
  qg = (q * (1.0 / math.sqrt(h))).reshape(b, lq, kv, g, h).transpose(0, 2, 3, 1, 4)
  qg = qg.reshape(b, kv, g * lq, h)  # [B, K, G * Lq, H]
  kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, K, Lk, H]
  s = jnp.einsum("bkqh,bklh->bkql", qg, kt, preferred_element_type=jnp.float32)
  if mask is not None and g == 1:  # [B or 1, 1, Lq, Lk]
    s = jnp.where(mask, s, jnp.finfo(jnp.float32).min)
  elif mask is not None:  # against [B, K, G, Lq, Lk]
    s = jnp.where(mask[:, :, None], s.reshape(b, kv, g, lq, lk),
                  jnp.finfo(jnp.float32).min).reshape(b, kv, g * lq, lk)
  e = jnp.exp(s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True)))
  out = jnp.einsum("bkql,bklh->bkqh", e.astype(v.dtype), vt, preferred_element_type=jnp.float32)
  out = (out / jnp.sum(e, axis=-1, keepdims=True)).astype(v.dtype)
  return out.reshape(b, kv, g, lq, h).transpose(0, 3, 1, 2, 4).reshape(b, lq, n, h)


def attend_cached(q: Array, k: Array, v: Array, key_mask: Array | None = None, *,
                  kind: str = "bidirectional", block_size: int = 0,
                  q_offset: Array | int = 0) -> Array:
  """A KV-cached window pass: q [B, W, N, H] attends to the cached keys, k, v [B, K, L, H]
  (heads-major, as cache.py holds them; K divides N) -> [B, W, N, H].

  softmax(q k^T / sqrt(H) + mask) v in float32: ``key_mask`` [B, L] (1 = real key) masks
  left padding, and ``kind`` the keys a query at absolute position ``q_offset + w`` may see
  (``causal``: j <= i, an AR decoding step; ``block_causal``: block(j) <= block(i); the
  offset may be traced).  Heads-major keys need no per-pass transpose (on XLA:CPU that
  halves its cost).
  """
  b, w, n, h = q.shape
  kv = k.shape[1]
  qh = q.reshape(b, w, kv, n // kv, h).transpose(0, 2, 3, 1, 4)  # [B, K, G, W, H]
  logits = jnp.einsum("bkgwh,bklh->bkgwl", qh, k, preferred_element_type=jnp.float32)
  logits = logits * (1.0 / math.sqrt(h))
  if key_mask is not None:  # a pad key gets float32 min, as the padded full pass gives it
    logits = jnp.where(key_mask.astype(bool)[:, None, None, None, :], logits,
                       jnp.finfo(jnp.float32).min)
  if kind == "bd3":  # sampling: the noisy block against the cached clean blocks
    kind = "block_causal"
  if kind != "bidirectional":
    i = q_offset + jnp.arange(w, dtype=jnp.int32)[:, None]
    j = jnp.arange(kv_len := k.shape[2], dtype=jnp.int32)[None, :]
    seen = j <= i if kind == "causal" else (j // block_size) <= (i // block_size)
    logits = jnp.where(seen, logits, jnp.finfo(jnp.float32).min)
    del kv_len
  p = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgwl,bklh->bkgwh", p, v)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, w, n, h)


# --- splash (Pallas TPU) ---

def _on_tpu() -> bool:
  return parallel.platform() == "tpu"


def splash_block(kind: str, length: int) -> int:
  """The splash tile: 512 where it divides, else 128; for ``bd3`` a tile must also divide the
  x_t half (n = length / 2), so that the x_0 -> x_t quarter (never attended) is whole tiles
  the kernel skips."""
  span = length // 2 if kind == "bd3" else length
  return min(length, next((b for b in (512, 256) if span % b == 0), SPLASH_BLOCK))


@functools.lru_cache(maxsize=64)
def _splash_kernel(kind: str, block_size: int, length: int, heads: int, mqa: bool,
                   interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  if kind == "bidirectional":
    one = sm.FullMask((length, length))
  elif kind == "causal":
    one = sm.CausalMask((length, length))
  else:
    one = sm.NumpyMask(kind_mask(kind, block_size, length, length))
  blk = splash_block(kind, length)
  sizes = sk.BlockSizes(block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk,
                        block_kv_dkv=blk, block_kv_dkv_compute=blk, block_q_dq=blk,
                        block_kv_dq=blk)
  make = sk.make_splash_mqa if mqa else sk.make_splash_mha
  with jax.ensure_compile_time_eval():  # the block-sparsity tables are constants, not tracers
    return make(sm.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1,
                q_seq_shards=1, interpret=interpret)


def _splash(q: Array, k: Array, v: Array, kind: str, block_size: int,
            segment_ids: Array | None, attention_mask: Array | None) -> Array:
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  b, length, n, h = q.shape
  kvh = k.shape[2]
  if length % SPLASH_BLOCK:
    raise ValueError(f"model.attention='splash' needs a sequence length that is a multiple of"
                     f" {SPLASH_BLOCK}, got {length}; change data.seq_len or use attention='xla'")
  seg = (jnp.zeros((b, length), jnp.int32) if segment_ids is None
         else segment_ids.astype(jnp.int32) + 1)
  if attention_mask is not None:  # a pad key is its own segment 0: no real query sees it
    seg = jnp.where(attention_mask.astype(bool), jnp.maximum(seg, 1), 0)
  interpret = not _on_tpu()
  q = q * jnp.asarray(1.0 / math.sqrt(h), q.dtype)  # the kernel does not scale

  def local(q: Array, k: Array, v: Array, seg: Array) -> Array:
    """One shard: q [b, L, n, H], k/v [b, L, kv, H] with n / kv the same group size."""
    heads_here, kv_here = q.shape[2], k.shape[2]
    group = heads_here // kv_here
    qh = jnp.swapaxes(q, 1, 2)  # [b, n, L, H]
    kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # [b, kv, L, H]
    if group == 1:
      kern = _splash_kernel(kind, block_size, length, heads_here, False, interpret)
      out = jax.vmap(lambda q1, k1, v1, s1: kern(q1, k1, v1, segment_ids=sk.SegmentIds(s1, s1)))(
          qh, kh, vh, seg)
    else:  # GQA: each kv head serves its group of query heads (MQA kernel per kv head)
      kern = _splash_kernel(kind, block_size, length, group, True, interpret)
      qg = qh.reshape(qh.shape[0], kv_here, group, length, h)
      per_kv = jax.vmap(lambda q1, k1, v1, s1: kern(q1, k1, v1, segment_ids=sk.SegmentIds(s1, s1)),
                        in_axes=(0, 0, 0, None))
      out = jax.vmap(per_kv)(qg, kh, vh, seg).reshape(qh.shape)
    return jnp.swapaxes(out, 1, 2)

  active = parallel.active_mesh()
  if active is None:
    return local(q, k, v, seg)
  mesh, rules = active
  qspec = parallel.logical_to_spec(("batch", "length", "heads", "kv"), rules, mesh)
  kv_heads_axis = qspec[2]
  if kv_heads_axis is not None:  # kv heads shard like query heads only if they divide
    size = math.prod(mesh.shape[a] for a in ((kv_heads_axis,) if isinstance(kv_heads_axis, str)
                                              else kv_heads_axis))
    if kvh % size:
      raise ValueError(f"model.attention='splash': {kvh} kv heads do not split over the"
                       f" {size}-way heads mesh axis; change mesh.tensor or model.num_kv_heads")
  seg_spec = P(qspec[0], None)
  return jax.shard_map(local, mesh=mesh, in_specs=(qspec, qspec, qspec, seg_spec),
                       out_specs=qspec, check_vma=False)(q, k, v, seg)
