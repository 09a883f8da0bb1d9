"""Continuous batching: requests packed into the slots of compiled sampler programs.

A *pool* is one compiled program (``engine.slot_programs``): ``slots`` independent copies of a
sampler with one set of knobs, on a canvas of one prompt width (a bucket: powers of two from
``prompt_bucket``; the exact prompt length for samplers that take no padding) and one
generation length (``max_tokens`` rounded up to a power of two from ``gen_bucket``, and to
whole blocks).  One thread runs the pools: it admits waiting requests into free slots (a slot
is refilled at the next step after its request ends: slots are independent, so block-wise
samplers need not wait for a block boundary), advances every busy pool one denoising step,
and reports what each step made final.  A request's tokens are those of
``model.generate(prompt, prompt_bucket=width, seed=seed, **knobs)`` cut to ``max_tokens``.

Faults stay with their request: a bad request is refused before it queues, a full queue is
429, a request past its deadline or whose client went away frees its slot at the next step,
and an error in a pool's program fails that pool's requests (500) and drops the pool; the
thread keeps serving.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import sys
import threading
import time
from typing import Any, Callable

import jax
import numpy as np

from dlm.errors import UserError
from dlm.processes import base
from dlm.sample import engine
from dlm.serve.protocol import BadRequest, cut_at_stop, held_back

STEP_DEFAULT = ("llada", "fast_dllm", "dream", "ancestral")  # steps = generated tokens
MASK_GLYPH = "\u2591"  # how a still-masked position shows in a provisional canvas


def power_bucket(n: int, smallest: int) -> int:
  """The smallest ``smallest * 2^k >= n``."""
  b = max(int(smallest), 1)
  while b < n:
    b *= 2
  return b


@dataclasses.dataclass
class Job:
  """One request in the scheduler: what to run, where its events go, how far it got."""
  id: str
  prompt_ids: list[int]
  sampler: str
  knobs: dict[str, Any]  # the sampler's full knobs (length knob = the bucketed length)
  max_tokens: int
  seed: int
  stop: list[str]
  stream: bool
  stream_steps: bool
  deadline: float
  emit: Callable[[dict[str, Any]], None]  # thread-safe: events to the HTTP side
  created: float = dataclasses.field(default_factory=time.monotonic)
  cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
  sent: str = ""  # text streamed so far
  pool_key: Any = None
  width: int = 0
  offset: int = 0  # left padding inside the canvas' prompt width
  started: float | None = None


@dataclasses.dataclass
class Pool:
  key: Any
  make: Any
  width: int
  gen: int
  padded: bool
  programs: tuple[Any, Any, Any]
  states: Any
  jobs: list[Job | None]
  last_used: float = 0.0

  @property
  def active(self) -> np.ndarray:
    return np.array([j is not None for j in self.jobs])


class Scheduler:
  """The serving loop over one loaded model (``DiffusionLM``), in its own thread."""

  def __init__(self, model: Any, *, slots: int = 8, max_queue: int = 64, prompt_bucket: int = 32,
               gen_bucket: int = 16, timeout: float = 600.0, max_pools: int = 4,
               metrics: Any = None, sampler: str | None = None):
    for name, v in (("slots", slots), ("max_queue", max_queue), ("prompt_bucket", prompt_bucket),
                    ("gen_bucket", gen_bucket), ("max_pools", max_pools)):
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise UserError(f"--{name}={v!r} must be an integer >= 1")
    if not timeout > 0:
      raise UserError(f"--request_timeout={timeout!r} must be > 0 seconds")
    self.model = model
    self.tok = model.tokenizer
    if self.tok is None:
      raise UserError("this model has no tokenizer; dlm serve needs one to read prompts")
    self.slots, self.max_queue = slots, max_queue
    self.prompt_bucket, self.gen_bucket = prompt_bucket, gen_bucket
    self.timeout, self.max_pools = timeout, max_pools
    self.context = engine.model_context(model)
    self.default_sampler = sampler or engine.default_sampler(model)
    make = engine.resolve(self.default_sampler)  # the operator's own name: module:function too
    engine.check_sampler(model, self.default_sampler, make)
    self.metrics = metrics
    self.mask_id = model.ids.get("mask")
    self.eos_id = self.tok.eos_id
    absorbing = base.describe(engine._process(model))[0] == "absorbing"
    # tokens are final once set for absorbing (masked) processes and AR decoding
    self.final_once_set = absorbing or model.model_cfg.mask_kind == "causal"
    self.pools: dict[Any, Pool] = {}
    self.waiting: collections.deque[Job] = collections.deque()
    self.cond = threading.Condition()
    self.thread = threading.Thread(target=self._loop, name="dlm-serve-scheduler", daemon=True)
    self.stopping = False
    self.params = model.sampling_params()
    self.busy = 0  # slots running a request (updated by the scheduler thread)

  # ------------------------------------------------------------------ requests --

  def plan(self, prompt: str, *, sampler: str | None, knobs: dict[str, Any],
           max_tokens: int) -> tuple[str, dict[str, Any], list[int]]:
    """(sampler, full knobs, prompt ids) of a request, or ``BadRequest`` (one line)."""
    name = sampler or self.default_sampler
    if sampler is not None and name not in engine.names():
      raise BadRequest(f"unknown sampler {name!r}; registered: {', '.join(engine.names())}")
    make = engine.resolve(name)
    if make.length is None:
      raise BadRequest(f"sampler {name!r} fills templates; use one that continues a prompt")
    try:
      engine.check_sampler(self.model, name, make)
      for k, v in knobs.items():
        if k in make.knobs:
          _check_type(name, k, v, make.knobs[k].default)
      given = dict(knobs)
      if make.length in given:
        raise BadRequest(f"give the length as max_tokens, not dlm.{make.length}")
      if name == "dream" and given.get("top_p") == 1.0:
        given["top_p"] = None  # Dream filters only below 1
      if "temperature" in given and "do_sample" in make.knobs:  # ar: temperature > 0 samples
        given.setdefault("do_sample", given["temperature"] > 0)
      block = given.get("block_length") or 0
      gen = power_bucket(max_tokens, self.gen_bucket)
      if isinstance(block, int) and block > 0 and gen % block:
        gen = -(-gen // block) * block
      given[make.length] = gen
      if name in STEP_DEFAULT and "steps" not in knobs:
        given["steps"] = gen
      full = engine.check_knobs(name, make, given)
      make(engine.Denoiser(fn=None, **engine._ids(self.model)), engine._process(self.model),
           **full)  # the sampler's own checks (e.g. steps per block), before anything queues
    except UserError as e:
      if isinstance(e, BadRequest):
        raise
      raise BadRequest(str(e)) from None
    except (TypeError, ValueError) as e:
      raise BadRequest(f"sampler {name!r}: {e}") from None
    ids = self.tok.encode(prompt) or [
        self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id]
    if self.context and len(ids) + gen > self.context:
      raise BadRequest(f"the prompt is {len(ids)} tokens and max_tokens {max_tokens} runs as"
                       f" {gen}: more than the model's context of {self.context}; shorten the"
                       " prompt or lower max_tokens")
    return name, full, ids

  def width(self, n: int, make: Any, gen: int) -> int:
    """The prompt canvas of an n-token prompt: bucket x 2^k, within the context."""
    if not make.pads:
      return n
    w = power_bucket(n, self.prompt_bucket)
    return min(w, max(n, self.context - gen)) if self.context else w

  def submit(self, job: Job) -> None:
    """Queues ``job``; ``BadRequest`` (429) when the queue is full."""
    with self.cond:
      if len(self.waiting) >= self.max_queue:
        raise BadRequest(f"the server's queue is full ({self.max_queue} waiting); retry later",
                         status=429, kind="rate_limit_error")
      self.waiting.append(job)
      self._gauge()
      self.cond.notify()

  def cancel(self, job: Job) -> None:
    job.cancelled.set()
    with self.cond:
      self.cond.notify()

  # ------------------------------------------------------------------ the loop --

  def start(self) -> None:
    self.thread.start()

  def stop(self) -> None:
    with self.cond:
      self.stopping = True
      self.cond.notify()
    self.thread.join(timeout=30)

  def warm(self, max_tokens: int, widths: int = 0) -> list[tuple[int, float]]:
    """Compiles the default sampler's pools at ``max_tokens`` for every prompt canvas a request
    can get (bucket, 2x bucket, ... within the context; the first ``widths`` if > 0):
    (width, seconds) each.  Samplers without padding warm a 1-token prompt's pool only."""
    name, full, _ = self.plan("", sampler=None, knobs={}, max_tokens=max_tokens)
    make = engine.resolve(name)
    gen = int(full[make.length])
    room = self.context - gen if self.context else 1 << 30
    out: list[tuple[int, float]] = []
    n = 1
    while n <= room and (not widths or len(out) < widths):
      width = self.width(n, make, gen)
      t0 = time.perf_counter()
      pool = self._pool(name, make, full, width)
      jax.block_until_ready(pool.programs[2](self.params, pool.states, pool.active)[1])
      out.append((width, time.perf_counter() - t0))
      if not make.pads:
        break
      n = width + 1
    return out

  def _loop(self) -> None:
    while not self.stopping:
      try:
        self._once()
      except Exception as e:  # noqa: BLE001  never expected; the loop must outlive it
        print(f"dlm serve: scheduler error, its requests failed: {_line(e)}", file=sys.stderr)
        for pool in list(self.pools.values()):
          for i, job in enumerate(pool.jobs):
            if job is not None:
              pool.jobs[i] = None
              self._fail(job, 500, f"the scheduler failed: {_line(e)}", "error")
        self.pools.clear()

  def _once(self) -> None:
    with self.cond:
      if self.stopping:
        return
      busy = [p for p in self.pools.values() if any(j is not None for j in p.jobs)]
      if not busy and not self.waiting:
        self.cond.wait(timeout=0.5)
        return
    self._expire_waiting()
    self._admit()
    for pool in [p for p in self.pools.values() if any(j is not None for j in p.jobs)]:
      self._tick(pool)
    with self.cond:  # nothing could start (every slot busy elsewhere): do not spin
      if not any(any(j is not None for j in p.jobs) for p in self.pools.values()):
        self.cond.wait(timeout=0.01)

  def _expire_waiting(self) -> None:
    now = time.monotonic()
    with self.cond:
      keep = collections.deque()
      for job in self.waiting:
        if job.cancelled.is_set():
          self._count("cancelled")
        elif now > job.deadline:
          self._fail(job, 408, f"request timed out after {now - job.created:.1f} s in the queue;"
                     " raise dlm.timeout or retry when the server is less busy", "timeout")
        else:
          keep.append(job)
      self.waiting = keep
      self._gauge()

  def _admit(self) -> None:
    with self.cond:
      pending = list(self.waiting)
    for job in pending:
      try:
        pool = self._pool_for(job)
      except Exception as e:  # noqa: BLE001  a program that cannot be built fails its request
        self._remove_waiting(job)
        self._fail(job, 500, f"could not build the sampler program: {_line(e)}", "error")
        continue
      if pool is None:
        continue
      free = [i for i, j in enumerate(pool.jobs) if j is None]
      if not free:
        continue
      self._remove_waiting(job)
      self._start(pool, free[0], job)

  def _remove_waiting(self, job: Job) -> None:
    with self.cond:
      try:
        self.waiting.remove(job)
      except ValueError:
        pass
      self._gauge()

  def _pool_for(self, job: Job) -> Pool | None:
    make = engine.resolve(job.sampler)
    width = self.width(len(job.prompt_ids), make, int(job.knobs[make.length]))
    key = (job.sampler, repr(sorted(job.knobs.items())), width)
    pool = self.pools.get(key)
    if pool is not None:
      return pool
    if len(self.pools) >= self.max_pools:
      idle = [p for p in self.pools.values() if all(j is None for j in p.jobs)]
      if not idle:
        return None  # waits for a pool to empty
      del self.pools[min(idle, key=lambda p: p.last_used).key]
    return self._pool(job.sampler, make, job.knobs, width)

  def _pool(self, name: str, make: Any, full: dict[str, Any], width: int) -> Pool:
    key = (name, repr(sorted(full.items())), width)
    if key in self.pools:
      return self.pools[key]
    gen = int(full[make.length])
    padded = bool(make.pads)
    programs = engine.slot_programs(self.model, name, make, full, slots=self.slots, width=width,
                                    padded=padded)
    total = width + gen
    blank = engine.blank_id(self.model)
    states = programs[0](self.params, np.full((self.slots, total), blank, np.int32),
                         np.zeros((self.slots, total), bool),
                         np.ones((self.slots, total), np.int32))
    pool = Pool(key=key, make=make, width=width, gen=gen, padded=padded, programs=programs,
                states=states, jobs=[None] * self.slots, last_used=time.monotonic())
    self.pools[key] = pool
    return pool

  def _start(self, pool: Pool, slot: int, job: Job) -> None:
    ids = np.asarray([job.prompt_ids], np.int32)
    am = None
    if pool.padded and ids.shape[1] < pool.width:
      ids, am, job.offset = engine.bucket_prompts(ids, None, pool.width, engine.pad_id(self.model))
    given, fixed, am = engine.prompt_template(ids, am, pool.gen, engine.blank_id(self.model))
    if am is None:
      am = np.ones_like(given)
    try:
      pool.states = pool.programs[1](self.params, pool.states, np.int32(slot),
                                     jax.random.key(job.seed), given[0], fixed[0], am[0])
    except Exception as e:  # noqa: BLE001
      self._fail(job, 500, f"could not start the request: {_line(e)}", "error")
      return
    job.pool_key, job.width, job.started = pool.key, pool.width, time.monotonic()
    pool.jobs[slot] = job
    pool.last_used = time.monotonic()
    if self.metrics is not None:
      self.metrics.queue_seconds.observe(job.started - job.created)
    self._gauge()

  def _tick(self, pool: Pool) -> None:
    active = pool.active
    t0 = time.perf_counter()
    try:
      pool.states, x, committed, done, nfe = pool.programs[2](self.params, pool.states, active)
      x, committed, done, nfe = (np.asarray(a) for a in (x, committed, done, nfe))
    except Exception as e:  # noqa: BLE001  the pool's program failed: its requests, not the server
      for i, job in enumerate(pool.jobs):
        if job is not None:
          self._fail(job, 500, f"sampling failed: {_line(e)}", "error")
      self.pools.pop(pool.key, None)
      return
    if self.metrics is not None:
      self.metrics.step_seconds.observe(time.perf_counter() - t0)
    now = time.monotonic()
    for i, job in enumerate(pool.jobs):
      if job is None:
        continue
      if job.cancelled.is_set():
        self._free(pool, i, "cancelled")
        continue
      if now > job.deadline:
        self._free(pool, i, None)
        self._fail(job, 408, f"request timed out after {now - job.created:.1f} s; raise"
                   " dlm.timeout or lower max_tokens / steps", "timeout")
        continue
      try:
        self._progress(pool, i, job, x[i], committed[i], bool(done[i]), int(nfe[i]))
      except Exception as e:  # noqa: BLE001  e.g. a decoding error: this request only
        self._free(pool, i, None)
        self._fail(job, 500, f"could not finish the request: {_line(e)}", "error")

  def _progress(self, pool: Pool, i: int, job: Job, x: np.ndarray, committed: np.ndarray,
                done: bool, nfe: int) -> None:
    gen = x[pool.width:pool.width + job.max_tokens]
    set_ = committed[pool.width:pool.width + job.max_tokens] >= 0
    if self.mask_id is not None and self.final_once_set:
      set_ &= gen != self.mask_id
    if self.final_once_set:
      k = int(np.argmin(set_)) if not set_.all() else len(gen)
    else:
      k = len(gen) if done else 0
    final = gen[:k].tolist()
    eos = self.eos_id is not None and self.eos_id in final
    if eos:
      final = final[:final.index(self.eos_id)]
    text, stopped = cut_at_stop(self.tok.decode(final), job.stop)
    complete = done or eos or stopped or k == len(gen)
    if job.stream_steps and not complete:
      _send(job, {"type": "canvas", "step": nfe, "text": self._canvas(gen),
                "token_ids": [int(t) if s else -1 for t, s in zip(gen, set_)]})
    if complete:
      self._free(pool, i, None)
      reason = "stop" if eos or stopped else "length"
      if not text.startswith(job.sent):  # never expected: a decode that is not prefix-stable
        text = job.sent + text[len(job.sent):]
      _send(job, {"type": "done", "text": text, "finish_reason": reason, "nfe": nfe,
                "completion_tokens": len(self.tok.encode(text)) if stopped else len(final),
                "prompt_tokens": len(job.prompt_ids), "seed": job.seed,
                "token_ids": final})
      self._count("ok", tokens=len(final), latency=time.monotonic() - job.created)
      return
    if job.stream:
      ready = text[:len(text) - held_back(text, job.stop)]
      if len(ready) > len(job.sent) and ready.startswith(job.sent):
        _send(job, {"type": "delta", "text": ready[len(job.sent):]})
        job.sent = ready

  def _canvas(self, gen: np.ndarray) -> str:
    out, run = [], []
    for t in gen.tolist():
      if t == self.mask_id:
        if run:
          out.append(self.tok.decode(run))
          run = []
        out.append(MASK_GLYPH)
      else:
        run.append(t)
    if run:
      out.append(self.tok.decode(run))
    return "".join(out)

  def _free(self, pool: Pool, slot: int, outcome: str | None) -> None:
    pool.jobs[slot] = None
    pool.last_used = time.monotonic()
    if outcome:
      self._count(outcome)
    self._gauge()

  def _fail(self, job: Job, status: int, message: str, outcome: str) -> None:
    _send(job, {"type": "error", "status": status, "message": message})
    self._count(outcome)

  def _count(self, outcome: str, tokens: int = 0, latency: float | None = None) -> None:
    if self.metrics is None:
      return
    self.metrics.finished.labels(outcome=outcome).inc()
    if tokens:
      self.metrics.tokens.inc(tokens)
    if latency is not None:
      self.metrics.latency.observe(latency)

  def _gauge(self) -> None:
    self.busy = sum(j is not None for p in list(self.pools.values()) for j in p.jobs)
    if self.metrics is None:
      return
    self.metrics.waiting.set(len(self.waiting))
    self.metrics.busy.set(self.busy)

  def new_seed(self) -> int:
    return int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF


def _check_type(sampler: str, knob: str, value: Any, default: Any) -> None:
  """A request's knob value has its default's type (JSON: numbers, strings, true/false)."""
  if isinstance(default, bool):
    ok = isinstance(value, bool)
  elif isinstance(default, int):
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif isinstance(default, float):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
  elif isinstance(default, str):
    ok = isinstance(value, str)
  else:  # None defaults: a number, a string or null
    ok = value is None or (isinstance(value, (int, float, str)) and not isinstance(value, bool))
  if not ok:
    kind = type(default).__name__ if default is not None else "number or string"
    raise BadRequest(f"dlm.{knob}={value!r}: sampler {sampler!r} takes a {kind} (default"
                     f" {default!r})")


def _send(job: Job, event: dict[str, Any]) -> None:
  """``job.emit(event)``; a client whose event loop is gone is cancelled, not an error here."""
  try:
    job.emit(event)
  except Exception:  # noqa: BLE001  e.g. RuntimeError: the event loop is closed
    job.cancelled.set()


def _line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f"{type(e).__name__}: {text[0] if text else ''}"[:500]
