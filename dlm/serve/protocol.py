"""OpenAI request bodies -> what the scheduler runs; every mistake one line (HTTP 400).

A request names registered things only (a sampler by its registered name, never
``module:function``: a request is untrusted data).  Fields map onto the sampler's knobs under
the reference code's names: ``max_tokens`` -> the length knob (``gen_length``,
``max_new_tokens``), ``temperature``, ``top_p``; the ``dlm`` object adds ``sampler``,
``steps``, ``block_length``, ``threshold`` or any other knob of that sampler, plus
``stream_steps`` (stream each denoising step's provisional canvas).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from dlm.errors import UserError

DEFAULT_MAX_TOKENS = 16  # OpenAI's completions default
KNOWN = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
         "top_p", "stop", "seed", "stream", "stream_options", "n", "user", "dlm", "echo",
         "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "logit_bias",
         "suffix", "best_of"}
DLM_FIELDS = ("sampler", "stream_steps", "timeout")


class BadRequest(UserError):
  """A request the server refuses: ``status`` (400, 404, 429, ...) and one line."""

  def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error"):
    super().__init__(message)
    self.status = status
    self.kind = kind


@dataclasses.dataclass
class Parsed:
  """One request, checked: the prompt (text) and how to sample it."""
  chat: bool
  prompt: str
  max_tokens: int
  sampler: str | None  # None: the model's own
  knobs: dict[str, Any]  # sampler knobs given (temperature, top_p, dlm.*)
  stop: list[str]
  seed: int | None
  stream: bool
  stream_steps: bool
  include_usage: bool
  timeout: float | None


def loads(body: bytes) -> dict[str, Any]:
  try:
    value = json.loads(body)
  except (ValueError, UnicodeDecodeError) as e:
    raise BadRequest(f"the request body is not valid JSON ({e}); send a JSON object") from None
  if not isinstance(value, dict):
    raise BadRequest(f"the request body must be a JSON object, got {type(value).__name__}")
  return value


def _number(body: dict, key: str, low: float, high: float, *, integer: bool = False,
            where: str = "") -> Any:
  v = body[key]
  ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and (
      low <= v <= high) and (not integer or float(v).is_integer())
  if not ok:
    what = "an integer" if integer else "a number"
    raise BadRequest(f"{where}{key}={v!r} must be {what} in [{low:g}, {high:g}]")
  return int(v) if integer else float(v)


def parse(body: dict[str, Any], *, chat: bool, render: Any, max_context: int) -> Parsed:
  """Checks ``body`` (a /v1/completions or /v1/chat/completions request)."""
  unknown = sorted(set(body) - KNOWN)
  if unknown:
    raise BadRequest(f"unknown field(s) {', '.join(map(repr, unknown))}; sampler settings go in"
                     " the \"dlm\" object (e.g. {\"dlm\": {\"steps\": 64}})")
  for key, allowed in (("n", (1,)), ("best_of", (1,)), ("echo", (False,)),
                       ("logprobs", (None, False)), ("suffix", (None,))):
    if key in body and body[key] not in allowed:
      raise BadRequest(f"{key}={body[key]!r} is not supported; leave it out")
  for key in ("presence_penalty", "frequency_penalty"):
    if body.get(key) not in (None, 0, 0.0):
      raise BadRequest(f"{key} is not supported by diffusion samplers; leave it out")
  if body.get("logit_bias"):
    raise BadRequest("logit_bias is not supported; leave it out")
  if chat:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(
            m.get("content"), str) for m in messages):
      raise BadRequest("\"messages\" must be a non-empty list of {\"role\": ..., \"content\":"
                       " \"text\"} objects")
    prompt = render([{"role": m["role"], "content": m["content"]} for m in messages])
  else:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
      prompt = prompt[0]
    if not isinstance(prompt, str):
      raise BadRequest("\"prompt\" must be one string (send one request per prompt)")
  limit = max_context if max_context > 0 else 1 << 20
  key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
  max_tokens = DEFAULT_MAX_TOKENS
  if body.get(key) is not None:
    max_tokens = _number(body, key, 1, limit, integer=True)
  knobs: dict[str, Any] = {}
  for k, high in (("temperature", 100.0), ("top_p", 1.0)):
    if body.get(k) is not None:
      knobs[k] = _number(body, k, 0.0, high)
  if "top_p" in knobs and knobs["top_p"] <= 0:
    raise BadRequest(f"top_p={knobs['top_p']} must be in (0, 1]")
  stop = body.get("stop")
  stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
  if not isinstance(stop, list) or len(stop) > 4 or not all(
      isinstance(s, str) and s for s in stop):
    raise BadRequest("\"stop\" must be a non-empty string or a list of up to 4 of them")
  seed = body.get("seed")
  if seed is not None:
    seed = _number(body, "seed", -(2 ** 63), 2 ** 63 - 1, integer=True)
  stream = body.get("stream", False)
  if not isinstance(stream, bool):
    raise BadRequest(f"stream={stream!r} must be true or false")
  opts = body.get("stream_options") or {}
  if not isinstance(opts, dict):
    raise BadRequest("\"stream_options\" must be an object, e.g. {\"include_usage\": true}")
  ext = body.get("dlm") or {}
  if not isinstance(ext, dict):
    raise BadRequest("\"dlm\" must be an object of sampler settings, e.g. {\"steps\": 64}")
  sampler = ext.get("sampler")
  if sampler is not None and (not isinstance(sampler, str) or ":" in sampler):
    raise BadRequest(f"dlm.sampler={sampler!r} must be a registered sampler name (a request"
                     " cannot import code)")
  stream_steps = ext.get("stream_steps", False)
  if not isinstance(stream_steps, bool):
    raise BadRequest(f"dlm.stream_steps={stream_steps!r} must be true or false")
  timeout = None
  if ext.get("timeout") is not None:
    timeout = _number(ext, "timeout", 0.001, 86400.0, where="dlm.")
  knobs.update({k: v for k, v in ext.items() if k not in DLM_FIELDS})
  return Parsed(chat=chat, prompt=prompt, max_tokens=max_tokens, sampler=sampler, knobs=knobs,
                stop=stop, seed=seed, stream=stream, stream_steps=stream_steps,
                include_usage=bool(opts.get("include_usage")), timeout=timeout)


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
  """(text before the first stop string, whether one was found)."""
  best = None
  for s in stop:
    i = text.find(s)
    if i >= 0 and (best is None or i < best):
      best = i
  return (text, False) if best is None else (text[:best], True)


def held_back(text: str, stop: list[str]) -> int:
  """How many trailing characters of ``text`` to hold back while streaming: an incomplete
  UTF-8 character (decoded as U+FFFD) or the start of a stop string."""
  keep = 0
  while keep < len(text) and text[len(text) - 1 - keep] == "\ufffd":
    keep += 1
  for s in stop:
    for n in range(min(len(s) - 1, len(text)), 0, -1):
      if text.endswith(s[:n]):
        keep = max(keep, n)
        break
  return keep
