"""Autoregressive decoding with a KV cache: Hugging Face ``generate`` (greedy or sampled).

x_l ~ p(x_l | x_<l), one token per model call (the chain rule).  The first call
(prefill) runs the prompt and caches every layer's keys and values; each later call
feeds only the newest token at its position and attends to the cache under the causal
mask (``use_cache=False`` recomputes the whole prefix every call instead: the same
tokens).  As in ``transformers`` 4.49 ``GenerationMixin._sample``: a row finishes once a
newly generated token is in ``eos_token_id`` (the EOS itself is kept); a finished row's
later tokens are ``pad_token_id``; decoding stops after ``max_new_tokens`` or as soon as
every row has finished (the engine then cuts the columns no row reached).  Sampling
(``do_sample=True``, temperature > 0) applies temperature, then top-k, then top-p (HF's
warper order) and draws through the 64-bit Gumbel (categorical.py).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dlm.errors import UserError
from dlm.models import cache as cache_lib
from dlm.sample import categorical as cat
from dlm.sample import engine

Array = jax.Array

KNOBS = {
    "max_new_tokens": engine.Knob(20, "tokens generated after the prompt (at most)"),
    "do_sample": engine.Knob(False, "draw tokens (False: greedy argmax, as HF's default)"),
    "temperature": engine.Knob(1.0, "softmax temperature when sampling; 0 = greedy"),
    "top_k": engine.Knob(50, "sample among the k largest logits (0 or None: all)"),
    "top_p": engine.Knob(1.0, "sample within this nucleus mass (1: all)"),
    "eos_token_id": engine.Knob(None, "an id or a list of ids that finish a row (None: the"
                                      " model's EOS)"),
    "pad_token_id": engine.Knob(None, "fills a finished row (None: the model's pad, else EOS)"),
    "use_cache": engine.Knob(True, "KV cache (False: recompute the whole prefix each call)"),
    "gumbel_bits": engine.Knob(64, cat.BITS_DOC),
}


def _ids(value: Any, name: str, vocab: int) -> tuple[int, ...]:
  items = value if isinstance(value, (list, tuple)) else [value]
  for v in items:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v < vocab:
      raise UserError(f"{name}={value!r}: need token ids in [0, {vocab})")
  return tuple(int(v) for v in items)


def next_token(logits: Array, rng: Array, *, greedy: bool, temperature: float,
               top_k: int | None, top_p: float, gumbel_bits: int = 64) -> Array:
  """The next token of each row from its logits [B, V]: argmax, or a draw after the warpers."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k:
    kth = jax.lax.top_k(logits, min(int(top_k), logits.shape[-1]))[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    logits = cat.top_p_filter(logits, top_p)
  return cat.categorical(rng, logits, gumbel_bits)


@engine.register("ar", knobs=KNOBS, length="max_new_tokens", causal=True, kinds=("identity",))
def make(denoiser: engine.Denoiser, process: Any = None, *, max_new_tokens: int,
         do_sample: bool, temperature: float, top_k: int | None, top_p: float,
         eos_token_id: Any, pad_token_id: int | None, use_cache: bool,
         gumbel_bits: int = 64) -> engine.Sampler:
  """HF ``generate(do_sample, temperature, top_k, top_p, eos_token_id, pad_token_id)``."""
  del process
  if not denoiser.causal:
    raise UserError("sampler 'ar' needs an autoregressive model (causal attention); this one is"
                    " a diffusion model: use its own sampler (e.g. 'llada', 'fast_dllm')")
  if not isinstance(temperature, (int, float)) or temperature < 0:
    raise UserError(f"temperature={temperature!r} must be >= 0")
  if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
    raise UserError(f"top_k={top_k!r} must be an integer >= 0 (0 or None: no top-k)")
  if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
    raise UserError(f"top_p={top_p!r} must be in (0, 1]")
  vocab = denoiser.vocab_size
  if eos_token_id is None:
    eos_token_id = denoiser.eos_id
  eos = () if eos_token_id is None else _ids(eos_token_id, "eos_token_id", vocab)
  if pad_token_id is None:
    pad_token_id = denoiser.pad_id if denoiser.pad_id is not None else (eos[0] if eos else 0)
  pad = _ids(pad_token_id, "pad_token_id", vocab)[0]
  greedy = not do_sample or temperature == 0
  warp = dict(greedy=greedy, temperature=float(temperature), top_k=top_k, top_p=float(top_p),
              gumbel_bits=cat.check_bits(gumbel_bits))

  def init(rng: Array, given: Array, fixed: Array, am: Array | None) -> engine.State:
    b, length = given.shape
    if length <= max_new_tokens:
      raise UserError("sampler 'ar' needs a prompt of at least one token")
    x = jnp.where(fixed, given, pad)
    aux = dict(pos=jnp.int32(length - max_new_tokens), finished=jnp.zeros((b,), bool), am=am)
    state = engine.initial_state(rng, given, fixed, x, **aux)
    if not use_cache:
      return state
    # The prefill runs here, before the loop: a ``cond`` between prefill and decode in the
    # loop's step would copy the whole cache on every step (XLA gives a conditional's result
    # its own buffer), which costs as much as the step's matmuls at batch 8.
    logits, c = prefill(state)
    return commit(state.replace(aux=dict(state.aux, cache=c)), logits)

  def prefill(state: engine.State) -> tuple[Array, Any]:
    """The prompt's pass: logits of its last position, and the cache of its keys/values."""
    p = state.x.shape[1] - max_new_tokens
    am = state.aux["am"]
    logits, c = denoiser(state.x[:, :p], None, raw_logits=True, fill_cache=True,
                         attention_mask=None if am is None else am[:, :p])
    grow = lambda a, axis: jnp.pad(a, [(0, max_new_tokens) if d == axis else (0, 0)
                                       for d in range(a.ndim)])
    c = cache_lib.positions_map(c, grow)
    return logits[:, -1], c

  def decode(state: engine.State) -> tuple[Array, Any]:
    """The newest token (at pos - 1) against the cache: the logits of position pos, and the
    cache with that token's keys/values written in."""
    pos = state.aux["pos"]
    c = state.aux["cache"]
    last = jax.lax.dynamic_slice_in_dim(state.x, pos - 1, 1, axis=1)
    logits, c = denoiser(last, None, raw_logits=True, attention_mask=state.aux["am"], cache=c,
                         cache_start=pos - 1, fill_cache=True)
    return logits[:, 0], c

  def commit(state: engine.State, logits: Array) -> engine.State:
    """The token at ``pos`` from the logits of position pos, written in (pad once finished)."""
    rng, draw_rng = jax.random.split(state.rng)
    pos = state.aux["pos"]
    tok = next_token(logits, draw_rng, **warp)
    finished = state.aux["finished"]
    tok = jnp.where(finished, pad, tok)
    if eos:
      finished = finished | jnp.isin(tok, jnp.asarray(eos, jnp.int32))
    col = jax.lax.dynamic_update_slice_in_dim
    x = col(state.x, tok[:, None], pos, axis=1)
    at = col(state.committed_at, jnp.broadcast_to(state.nfe, (x.shape[0], 1)), pos, axis=1)
    aux = dict(state.aux, pos=pos + 1, finished=finished)
    return state.replace(x=x, committed_at=at, nfe=state.nfe + 1, rng=rng, aux=aux)

  def step(state: engine.State) -> engine.State:
    if use_cache:  # the cache comes back with this call's keys written in
      logits, c = decode(state)
      return commit(state.replace(aux=dict(state.aux, cache=c)), logits)
    # the whole prefix again; the causal mask hides what follows pos
    logits, _ = denoiser(state.x, None, raw_logits=True, attention_mask=state.aux["am"])
    pos = state.aux["pos"]
    return commit(state, jax.lax.dynamic_slice_in_dim(logits, pos - 1, 1, axis=1)[:, 0])

  def done(state: engine.State) -> Array:
    return (state.aux["pos"] >= state.x.shape[1]) | jnp.all(state.aux["finished"])

  return engine.Sampler(init, step, done)

