"""Text in, text out: prompts, infilling templates, batching, decoding."""

from __future__ import annotations

import math
import re
import sys
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from dlm.errors import UserError

GAP = re.compile(r"<gap(?::(\d+))?>")
GAP_START = re.compile(r"<gap(?![A-Za-z_])")  # a marker begins here ("<gaps>" is plain text)
GAP_HELP = "mark each span to generate with <gap> (default length) or <gap:N> (N tokens)"
MAX_GAP_DIGITS = 18


def check_count(where: str, value: Any, fix: str) -> int:
  """``value`` as an integer >= 1, else one line naming ``where`` (flag or config key), ``fix``."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise UserError(f"{where}={value!r}: need an integer >= 1; {fix}")
  return int(value)


def pick_count(name: str, flag: int | None, default: Any) -> int:
  """``--name`` when given, else the config's ``default``; either must be >= 1."""
  if flag is not None:
    return check_count(f"--{name}", flag, f"pass --{name}=1 or more, or leave it out")
  return check_count(f"config.sample.{name}", default, f"pass --{name}=N")


def check_real(where: str, value: Any, *, low: float = 0.0, high: float = math.inf,
               low_open: bool = False) -> float:
  """``value`` as a finite float in [low, high] ((low, high] with ``low_open``), or one line."""
  ok = isinstance(value, (int, float)) and math.isfinite(value) and value <= high and (
      value > low if low_open else value >= low)
  if not ok:
    span = f"{'(' if low_open else '['}{low:g}, {high:g}{']' if math.isfinite(high) else ')'}"
    raise UserError(f"{where}={value!r}: need a finite number in {span}")
  return float(value)


def check_text(where: str, text: str | None) -> str | None:
  """``text`` if it is valid UTF-8 (bytes that are not reach Python as surrogate escapes)."""
  if text is None:
    return None
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    code = ord(text[e.start])
    what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
    raise UserError(f"{where} is not UTF-8 text ({what} at character {e.start}): convert it to"
                    " UTF-8 (e.g. with iconv)") from None
  return text


def parse_template(infill: str, *, gap_length: int = 16) -> list[str | int]:
  """The template's literal texts (str) and gap lengths (int), in order.

  Every ``<gap`` marker must be exactly ``<gap>`` or ``<gap:N>`` with N >= 1.
  """
  if gap_length < 1:
    raise UserError(f"--gap_length={gap_length}: need 1 or more tokens per <gap>")
  parts: list[str | int] = []
  pos = 0
  for start in GAP_START.finditer(infill):
    m = GAP.match(infill, start.start())
    digits = m.group(1) if m else None
    if m is None or (digits is not None and (len(digits) > MAX_GAP_DIGITS or int(digits) < 1)):
      raise UserError(f"--infill marker {_marker_at(infill, start.start())!r} is not <gap> or"
                      f" <gap:N> with N >= 1: {GAP_HELP}")
    parts += [infill[pos:m.start()], int(digits) if digits else gap_length]
    pos = m.end()
  if not parts:
    raise UserError(f"--infill has no gap marker: {GAP_HELP}")
  return parts + [infill[pos:]]


def _marker_at(text: str, start: int) -> str:
  end = text.find(">", start, start + 24)
  return text[start:end + 1] if end >= 0 else text[start:start + 12] + "..."


def build_template(tokenizer: Any, *, length: int, prompt: str | None = None,
                   infill: str | None = None, gap_length: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """(given int32 [L], fixed bool [L]): what the sampler must keep and where.

  ``prompt``: fixed prefix, the rest of the row is generated.  ``infill``: a
  template whose ``<gap>``/``<gap:N>`` markers become generated spans; text
  after the template (to ``length``) is generated too.  The template's size is
  checked against ``length`` before any array is built.
  """
  if prompt and infill:
    raise UserError("give --prompt or --infill, not both")
  if length < 1:
    raise UserError(f"--length={length}: need 1 or more tokens per sample")
  what = "--prompt" if prompt else "--infill template"
  parts: list[list[int] | int] = []
  if infill:
    spans = parse_template(infill, gap_length=gap_length)
    gaps = sum(p for p in spans if isinstance(p, int))
    if gaps > length:
      raise UserError(f"--infill gaps ask for {gaps} tokens but the sequence is {length};"
                      " shorten the gaps or raise --length")
    parts = [p if isinstance(p, int) else tokenizer.encode(p) for p in spans]
  elif prompt:
    parts = [tokenizer.encode(prompt)]
  size = sum(p if isinstance(p, int) else len(p) for p in parts)
  if size > length:
    raise UserError(
        f"{what} is {size} tokens but the sequence is {length}; shorten it or raise --length")
  given = np.full(length, tokenizer.mask_id, np.int32)
  fixed = np.zeros(length, bool)
  pos = 0
  for p in parts:
    if isinstance(p, int):  # a gap: stays masked, generated
      pos += p
    else:
      given[pos:pos + len(p)] = p
      fixed[pos:pos + len(p)] = True
      pos += len(p)
  return given, fixed


def batch_seed(seed: int, index: int) -> int:
  """The seed of batch ``index`` of a run seeded ``seed`` (batch 0: ``seed`` itself)."""
  if index == 0:
    return seed
  state = np.random.SeedSequence([abs(seed), int(seed < 0), index]).generate_state(1)[0]
  return int(state) & 0x7FFFFFFF


def progress_batches(num_samples: int, batch_size: int,
                     desc: str = "sample") -> Iterator[tuple[int, int, int]]:
  """(index, first sample, rows kept) of each batch; a progress bar on stderr past one batch.

  The bar counts a batch once the caller asks for the next one (after it printed its
  samples); it appears after half a second, so an error in the first batch stays one line.
  """
  if num_samples < 1 or batch_size < 1:
    raise UserError(f"need --num_samples >= 1 and --batch_size >= 1, got {num_samples},"
                    f" {batch_size}")
  size = min(batch_size, num_samples)
  count = -(-num_samples // size)
  with tqdm(total=num_samples, desc=desc, unit="sample", file=sys.stderr, delay=0.5,
            disable=count < 2, dynamic_ncols=True) as bar:
    for i in range(count):
      start = i * size
      yield i, start, min(size, num_samples - start)
      bar.update(min(size, num_samples - start))


def emit(text: str) -> None:
  """Prints a line of output to stdout (around any progress bar), at once."""
  tqdm.write(text, file=sys.stdout)
  sys.stdout.flush()


def sample_tokens(logits_fn: Callable[[jax.Array, jax.Array], jax.Array], process: Any,
                  given: np.ndarray, fixed: np.ndarray, *, num_samples: int, seed: int,
                  sampler: str = "ancestral", batch_size: int | None = None,
                  uses_t: bool = True, **knobs: Any) -> tuple[np.ndarray, int]:
  """A sampler of the engine on ``num_samples`` copies of a template, over a plain
  ``logits_fn(x_t, t)`` (an exact test denoiser, research code): (tokens [N, L], nfe).

  ``uses_t=False`` declares the denoiser time-independent (MDLM's denoiser cache).
  Batches of at most ``batch_size`` share one compiled program; nfe is the largest.
  """
  from dlm.sample import engine
  make = engine.resolve(sampler)
  full = engine.check_knobs(sampler, make, knobs)
  den = engine.denoiser_of_logits(logits_fn, mask_id=int(getattr(process, "mask_id", -1)),
                                  vocab_size=int(process.vocab_size), uses_t=uses_t)
  size = min(batch_size or num_samples, num_samples)
  g = jnp.broadcast_to(jnp.asarray(given, jnp.int32), (size, given.shape[-1]))
  f = jnp.broadcast_to(jnp.asarray(fixed, bool), (size, fixed.shape[-1]))
  jitted = jax.jit(lambda rng, g, f: engine.run(make(den, process, **full), rng, g, f))
  out, nfe = [], 0
  for i, _, rows in progress_batches(num_samples, size):
    final = jitted(jax.random.key(batch_seed(seed, i)), g, f)
    out.append(np.asarray(final.x)[:rows])
    nfe = max(nfe, int(final.nfe))
  return np.concatenate(out), nfe


def decode_samples(tokenizer: Any, tokens: np.ndarray, *, stop_at_eos: bool = True) -> list[str]:
  out = []
  for row in tokens.tolist():
    if stop_at_eos and tokenizer.eos_id in row:
      row = row[:row.index(tokenizer.eos_id)]
    out.append(tokenizer.decode(row))
  return out
