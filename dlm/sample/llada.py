"""LLaDA's semi-autoregressive confidence remasking (Nie et al. 2025, Alg. 5), one jitted loop.

The generated span is cut into ``gen_length / block_length`` blocks, each given
``steps / num_blocks`` denoiser calls.  At each call every masked position of
the current block gets its argmax prediction and a confidence (its softmax
probability for ``low_confidence``, a uniform draw for ``random``); the
``quota`` most confident are committed, where a block with n masks commits
n // k per step and one more on its first n % k steps.  ``cfg_scale`` > 0 adds
classifier-free guidance against the prompt-masked sequence.  Batched rows are
left-padded with an attention mask.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dlm.errors import UserError
from dlm.sample import categorical as cat
from dlm.sample import engine

Array = jax.Array


def quota_of(n: jax.Array, i: jax.Array, steps: int) -> jax.Array:
  """LLaDA's schedule: tokens committed at step i of ``steps`` for n masks, n // steps and one
  more on the first n % steps steps (they sum to n)."""
  return n // steps + (i < n % steps).astype(jnp.int32)


def check_knobs(steps: int, gen_length: int, block_length: int, remasking: str) -> int:
  """Returns the number of blocks; one-line errors for knobs the algorithm cannot take."""
  if gen_length < 1 or block_length < 1 or steps < 1:
    raise UserError(f"need steps, gen_length, block_length >= 1, got {steps}, {gen_length},"
                    f" {block_length}")
  if gen_length % block_length:
    raise UserError(f"block_length={block_length} does not divide gen_length={gen_length};"
                    " pick a divisor")
  blocks = gen_length // block_length
  if steps % blocks:
    raise UserError(f"steps={steps} is not divisible by the {blocks} blocks"
                    f" (gen_length / block_length); use a multiple of {blocks}")
  if remasking not in ("low_confidence", "random"):
    raise UserError(f"remasking={remasking!r} unknown; use 'low_confidence' or 'random'")
  return blocks


def descending_rank(conf: Array) -> Array:
  """rank[b, i] = #{j: conf[b, j] > conf[b, i]} + #{j < i: conf[b, j] == conf[b, i]}.

  The position of i in a stable descending sort, by pairwise comparison: O(L^2)
  but fused and branch-free, much faster on CPU than two sorts for L ~ 100s.
  """
  a, b = conf[:, None, :], conf[:, :, None]  # [B, i, j]: a = conf_j, b = conf_i
  j_lt_i = jnp.arange(conf.shape[1])[None, :] < jnp.arange(conf.shape[1])[:, None]
  before = (a > b) | ((a == b) & j_lt_i[None])
  return jnp.sum(before, axis=-1).astype(jnp.int32)


KNOBS = {
    "steps": engine.Knob(128, "denoiser calls in all (a multiple of the number of blocks)"),
    "gen_length": engine.Knob(128, "tokens generated after the prompt"),
    "block_length": engine.Knob(None, "semi-autoregressive block (None: one block of gen_length)"),
    "temperature": engine.Knob(0.0, "Gumbel noise on logits / temperature; 0 = argmax"),
    "cfg_scale": engine.Knob(0.0, "classifier-free guidance against the prompt-masked sequence"),
    "remasking": engine.Knob("low_confidence", "commit order: low_confidence (softmax) or random"),
    "logits_eos_inf": engine.Knob(False, "EOS logit -inf before the argmax"),
    "confidence_eos_eot_inf": engine.Knob(False, "EOS/EoT logits -inf before the confidence"),
    "gumbel_bits": engine.Knob(64, cat.BITS_DOC),
}


@engine.register("llada", knobs=KNOBS, kinds=("absorbing",))
def make(denoiser: engine.Denoiser, process: Any = None, *, steps: int, gen_length: int,
         block_length: int | None, temperature: float, cfg_scale: float, remasking: str,
         logits_eos_inf: bool, confidence_eos_eot_inf: bool,
         gumbel_bits: int = 64) -> engine.Sampler:
  """LLaDA ``generate`` (Nie et al. 2025, Alg. 5) on a prompt followed by ``gen_length`` masks."""
  del process  # LLaDA's sampler is the masked process' own, by construction
  block_length = block_length or gen_length
  blocks = check_knobs(steps, gen_length, block_length, remasking)
  per_block = steps // blocks
  bits = cat.check_bits(gumbel_bits)
  mask_id, eos_id, eot_id = denoiser.mask_id, denoiser.eos_id, denoiser.eot_id

  def init(rng: Array, given: Array, fixed: Array, am: Array | None) -> engine.State:
    b, length = given.shape
    x = jnp.where(fixed, given, mask_id)
    return engine.initial_state(rng, given, fixed, x, quota=jnp.zeros((b,), jnp.int32),
                                step=jnp.zeros((), jnp.int32), am=am,
                                prompt_index=x != mask_id)  # what the CFG branch masks (pads too)

  def step_fn(state: engine.State) -> engine.State:
    b, length = state.x.shape
    p = length - gen_length
    pos = jnp.arange(length)
    step, am = state.aux["step"], state.aux["am"]
    blk = step // per_block
    start = p + blk * block_length
    end = start + block_length
    i = step % per_block
    in_block = (pos >= start) & (pos < end)
    n = jnp.sum((state.x == mask_id) & in_block, axis=1).astype(jnp.int32)
    quota = jnp.where(i == 0, n, state.aux["quota"])
    k = quota_of(quota, i, per_block)  # [B]
    if cfg_scale > 0:
      un = jnp.where(state.aux["prompt_index"], mask_id, state.x)
      both, _ = denoiser(jnp.concatenate([state.x, un], 0), None,
                         attention_mask=None if am is None else jnp.concatenate([am, am], 0))
      cond, uncond = both[:b], both[b:]
      logits = uncond + (cfg_scale + 1.0) * (cond - uncond)
    else:
      logits, _ = denoiser(state.x, None, attention_mask=am)
    logits = logits.astype(jnp.float32)
    if logits_eos_inf and eos_id is not None:
      logits = logits.at[..., eos_id].set(-jnp.inf)
    rng, noise_rng, rand_rng = jax.random.split(state.rng, 3)
    if temperature > 0:  # Gumbel-max on logits / temperature, 64-bit uniforms
      x0 = jnp.argmax(logits / temperature + cat.gumbel(noise_rng, logits.shape, bits), axis=-1)
    else:
      x0 = jnp.argmax(logits, axis=-1)
    if confidence_eos_eot_inf:
      for tok in (eos_id, eot_id):
        if tok is not None:
          logits = logits.at[..., tok].set(-jnp.inf)
    if remasking == "low_confidence":
      probs = jax.nn.softmax(logits, axis=-1)
      conf = jnp.take_along_axis(probs, x0[..., None], axis=-1)[..., 0]
    else:
      conf = cat.uniform_64bit(rand_rng, x0.shape)
    masked = (state.x == mask_id) & ~state.fixed  # given tokens never change, even a mask id
    conf = jnp.where(masked & (pos < end), conf, -jnp.inf)
    rank = descending_rank(conf)
    transfer = (rank < k[:, None]) & masked & (pos < end)
    x = jnp.where(transfer, x0.astype(jnp.int32), state.x)
    committed = jnp.where(transfer, state.nfe, state.committed_at)
    return state.replace(x=x, committed_at=committed, nfe=state.nfe + 1, rng=rng,
                         aux=dict(state.aux, quota=quota, step=step + 1))

  def done(state: engine.State) -> Array:
    return state.aux["step"] >= steps

  return engine.Sampler(init, step_fn, done)


def unmasked_per_step(committed_at: Any, steps: int) -> list[list[list[int]]]:
  """For each call in order, per row, the positions it committed (the fixtures' format)."""
  import numpy as np
  at = np.asarray(committed_at)
  return [[np.flatnonzero(row == s).tolist() for row in at] for s in range(steps)]
