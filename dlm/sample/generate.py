"""Text in, text out: prompts, infilling templates, batching, decoding."""

from __future__ import annotations

import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from dlm.errors import UserError
from dlm.sample import samplers

GAP = re.compile(r"<gap(?::(\d+))?>")
GAP_HELP = "mark each span to generate with <gap> (default length) or <gap:N> (N tokens)"


def build_template(tokenizer: Any, *, length: int, prompt: str | None = None,
                   infill: str | None = None, gap_length: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """(given int32 [L], fixed bool [L]): what the sampler must keep and where.

  ``prompt``: fixed prefix, the rest of the row is generated.  ``infill``: a
  template whose ``<gap>``/``<gap:N>`` markers become generated spans; text
  after the template (to ``length``) is generated too.
  """
  if prompt and infill:
    raise UserError("give --prompt or --infill, not both")
  given: list[int] = []
  fixed: list[bool] = []
  if infill:
    pos = 0
    gaps = list(GAP.finditer(infill))
    if not gaps:
      raise UserError(f"--infill has no gap marker: {GAP_HELP}")
    for m in gaps:
      ids = tokenizer.encode(infill[pos:m.start()])
      given += ids
      fixed += [True] * len(ids)
      n = int(m.group(1) or gap_length)
      given += [tokenizer.mask_id] * n
      fixed += [False] * n
      pos = m.end()
    ids = tokenizer.encode(infill[pos:])
    given += ids
    fixed += [True] * len(ids)
  elif prompt:
    given = tokenizer.encode(prompt)
    fixed = [True] * len(given)
  if len(given) > length:
    what = "--prompt" if prompt else "--infill template"
    raise UserError(
        f"{what} is {len(given)} tokens but the sequence is {length}; shorten it or raise --length")
  pad = length - len(given)
  return (np.array(given + [tokenizer.mask_id] * pad, np.int32),
          np.array(fixed + [False] * pad, bool))


def sample_tokens(denoise: Callable[..., jax.Array], process: Any,
                  given: np.ndarray, fixed: np.ndarray, *, num_samples: int, seed: int,
                  sampler: str = "ancestral", params: Any = None,
                  prepare: Callable[[Any], Any] | None = None,
                  **knobs: Any) -> tuple[np.ndarray, int]:
  """Runs the sampler on ``num_samples`` copies of the template: (tokens [N, L], nfe).

  ``denoise(x_t, t)``, or with ``params`` ``denoise(params, x_t, t)``: the weights are then
  an argument of the jitted loop (not constants baked into it), first passed through
  ``prepare`` inside the jit (the decode layout, dlm/models/decode.py).
  """
  g = jnp.broadcast_to(jnp.asarray(given), (num_samples, given.shape[-1]))
  f = jnp.broadcast_to(jnp.asarray(fixed), (num_samples, fixed.shape[-1]))

  def fn(params: Any, rng: jax.Array, g: jax.Array, f: jax.Array) -> samplers.SamplerState:
    if params is None:
      model = denoise
    else:
      params = prepare(params) if prepare is not None else params
      model = lambda x_t, t: denoise(params, x_t, t)
    return samplers.run(samplers.make_sampler(sampler, model, process, **knobs), rng, g, f)

  final = jax.jit(fn)(params, jax.random.key(seed), g, f)
  return np.asarray(final.x), int(final.nfe)


def decode_samples(tokenizer: Any, tokens: np.ndarray, *, stop_at_eos: bool = True) -> list[str]:
  out = []
  for row in tokens.tolist():
    if stop_at_eos and tokenizer.eos_id in row:
      row = row[:row.index(tokenizer.eos_id)]
    out.append(tokenizer.decode(row))
  return out
