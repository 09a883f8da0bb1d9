"""Model FLOPs utilization: a step's model FLOPs over its time and the devices' peak.

MFU = model FLOPs per step / step seconds / peak FLOP/s (PaLM, Chowdhery et al. 2022,
App. B): 6 N per token for the matmul parameters (forward 2 N, backward 4 N; the embedding
lookup is not a matmul) plus attention's scores and values, 12 L d per layer per token. The peak
is ``train.peak_flops`` when given, on TPU the chips' published bf16 peak, else a float32
matmul measured once on this machine (what ``benchmarks/train_step.py`` measures in the same
run).
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from dlm.compile import topology
from dlm.models import transformer


def matmul_params(model_cfg: transformer.ModelConfig, n_params: int) -> int:
  """Parameters that multiply activations (the untied embedding table is only gathered)."""
  return n_params if model_cfg.tie_embeddings else n_params - model_cfg.vocab_size * model_cfg.d_model


def train_flops(model_cfg: transformer.ModelConfig, n_params: int, batch: int, seq_len: int) -> float:
  """6 N per token (forward + backward) + 12 n_layer L d_attn per token for attention scores.
  A BD3-LM pass runs over x_t (+) x_0: twice the tokens, each seeing twice the keys."""
  seq_len = 2 * seq_len if model_cfg.mask_kind == "bd3" else seq_len
  tokens = batch * seq_len
  d_attn = model_cfg.num_heads * model_cfg.hd
  return 6.0 * matmul_params(model_cfg, n_params) * tokens + (
      12.0 * model_cfg.num_layers * seq_len * d_attn * tokens)


def forward_flops(model_cfg: transformer.ModelConfig, n_params: int, batch: int, seq_len: int) -> float:
  """One forward pass: 2 N per token + 4 n_layer L d_attn per token."""
  tokens = batch * seq_len
  d_attn = model_cfg.num_heads * model_cfg.hd
  return 2.0 * matmul_params(model_cfg, n_params) * tokens + (
      4.0 * model_cfg.num_layers * seq_len * d_attn * tokens)


@functools.lru_cache(maxsize=None)
def matmul_peak(n: int = 2048, reps: int = 10) -> float:
  """FLOP/s of a square float32 matmul on the default device, best of ``reps`` (measured once
  per process: ``measure_matmul`` measures again)."""
  return measure_matmul(n, reps)


def measure_matmul(n: int = 2048, reps: int = 10) -> float:
  """FLOP/s of a square float32 matmul on the default device, best of ``reps``."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2.0 * n ** 3 / best


def tpu_chip_peak(device_kind: str) -> float | None:
  """A TPU chip's published peak bf16 FLOP/s from its ``device_kind`` ("TPU v5p",
  "TPU v5 lite", "TPU v6 lite", "TPU v4"), or None for another device."""
  kind = device_kind.lower().replace("tpu", "").replace(" ", "")
  name = {"v5": "v5p"}.get(kind) or topology.ALIASES.get(kind, kind)  # JAX: v5p is "TPU v5"
  chip = topology.CHIPS.get(name)
  return None if chip is None else chip.peak_bf16_flops


def peak_flops(configured: float = 0.0) -> float:
  """The peak FLOP/s MFU is taken against: ``configured`` (> 0); on TPU the chips' published
  bf16 peak; else one device's measured float32 matmul peak times the devices (CPU devices
  share the host's cores: one peak)."""
  if configured and configured > 0:
    return float(configured)
  chip = tpu_chip_peak(jax.devices()[0].device_kind)
  if jax.default_backend() == "tpu" and chip is not None:
    return chip * jax.device_count()
  devices = 1 if jax.default_backend() == "cpu" else jax.device_count()
  return matmul_peak() * devices
