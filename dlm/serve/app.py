"""The OpenAI-compatible HTTP API (FastAPI on uvicorn) over the scheduler.

``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (streamed as server-sent events
with ``stream: true``), ``/health`` and Prometheus ``/metrics``.  Errors are OpenAI's shape,
``{"error": {"message", "type", "code"}}``, one line each.  Streams carry committed text as it
becomes final, in order; with ``dlm.stream_steps`` each step's provisional canvas rides along
as a chunk with empty choices and a ``dlm`` field (``step``, ``canvas``, ``token_ids`` with -1
for still-masked positions).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from dlm.errors import UserError
from dlm.serve import protocol
from dlm.serve.protocol import BadRequest
from dlm.serve.scheduler import Job, Scheduler


def error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
  return JSONResponse({"error": {"message": message, "type": kind, "param": None,
                                 "code": status}}, status_code=status)


def create_app(scheduler: Scheduler, *, model_name: str, render: Any, metrics: Any) -> FastAPI:
  """The app; ``render(messages) -> prompt text`` is the model's chat template."""
  app = FastAPI(title="dlm serve", docs_url=None, redoc_url=None, openapi_url=None)
  created = int(time.time())

  @app.middleware("http")
  async def count(request: Request, call_next):
    response = await call_next(request)
    metrics.requests.labels(endpoint=request.url.path, status=str(response.status_code)).inc()
    return response

  @app.get("/health")
  async def health() -> Response:
    if not scheduler.thread.is_alive():
      return error(503, "the scheduler thread is not running; restart the server", "server_error")
    return JSONResponse({"status": "ok", "waiting": len(scheduler.waiting),
                         "slots_busy": scheduler.busy})

  @app.get("/metrics")
  async def prometheus() -> Response:
    return Response(metrics.text(), media_type="text/plain; version=0.0.4")

  @app.get("/v1/models")
  async def models() -> Response:
    return JSONResponse({"object": "list", "data": [{
        "id": model_name, "object": "model", "created": created, "owned_by": "dlm",
        "dlm": {"sampler": scheduler.default_sampler, "context": scheduler.context,
                "slots": scheduler.slots, "max_queue": scheduler.max_queue}}]})

  @app.post("/v1/completions")
  async def completions(request: Request) -> Response:
    return await _generate(request, chat=False)

  @app.post("/v1/chat/completions")
  async def chat_completions(request: Request) -> Response:
    return await _generate(request, chat=True)

  def _render(messages: list[dict[str, str]]) -> str:
    try:
      return render(messages)
    except UserError as e:
      raise BadRequest(str(e)) from None
    except Exception as e:  # noqa: BLE001  a template that fails on these messages
      raise BadRequest(f"the chat template could not render these messages: {e}") from None

  async def _generate(request: Request, *, chat: bool) -> Response:
    try:
      body = protocol.loads(await request.body())
      if body.get("model") not in (None, model_name):
        raise BadRequest(f"model {body['model']!r} is not served here; this server serves"
                         f" {model_name!r} (GET /v1/models)", 404, "not_found_error")
      parsed = protocol.parse(body, chat=chat, render=_render, max_context=scheduler.context)
      name, full, ids = scheduler.plan(parsed.prompt, sampler=parsed.sampler, knobs=parsed.knobs,
                                       max_tokens=parsed.max_tokens)
    except BadRequest as e:
      return error(e.status, str(e), e.kind)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    job = Job(id=rid, prompt_ids=ids, sampler=name, knobs=full, max_tokens=parsed.max_tokens,
              seed=parsed.seed if parsed.seed is not None else scheduler.new_seed(),
              stop=parsed.stop, stream=parsed.stream, stream_steps=parsed.stream_steps,
              deadline=time.monotonic() + min(parsed.timeout or scheduler.timeout,
                                              scheduler.timeout),
              emit=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
    try:
      scheduler.submit(job)
    except BadRequest as e:
      return error(e.status, str(e), e.kind)
    shape = _Shape(rid, model_name, chat, name, full)
    if parsed.stream:
      return StreamingResponse(_stream(job, events, shape, parsed.include_usage),
                               media_type="text/event-stream",
                               headers={"Cache-Control": "no-cache"})
    finished = False
    try:
      while True:
        try:
          ev = await asyncio.wait_for(events.get(), 0.2)
        except asyncio.TimeoutError:
          if await request.is_disconnected():
            return Response(status_code=499)
          continue
        if ev["type"] == "done":
          finished = True
          return JSONResponse(shape.whole(ev))
        if ev["type"] == "error":
          finished = True
          return error(ev["status"], ev["message"], _kind(ev["status"]))
    finally:
      if not finished:
        scheduler.cancel(job)

  async def _stream(job: Job, events: asyncio.Queue, shape: "_Shape",
                    usage: bool) -> AsyncIterator[str]:
    finished, sent = False, ""
    try:
      if shape.chat:
        yield shape.sse(shape.chunk({"role": "assistant", "content": ""}))
      while True:
        ev = await events.get()
        if ev["type"] == "delta":
          sent += ev["text"]
          yield shape.sse(shape.chunk(ev["text"]))
        elif ev["type"] == "canvas":
          yield shape.sse(shape.chunk(None, extra={"step": ev["step"], "canvas": ev["text"],
                                                   "token_ids": ev["token_ids"]}))
        elif ev["type"] == "done":
          rest = ev["text"][len(sent):]
          if rest:
            yield shape.sse(shape.chunk(rest))
          yield shape.sse(shape.chunk("", finish=ev["finish_reason"], extra=shape.info(ev)))
          if usage:
            yield shape.sse(dict(shape.head(), choices=[], usage=shape.usage(ev)))
          yield "data: [DONE]\n\n"
          finished = True
          return
        elif ev["type"] == "error":
          finished = True
          yield shape.sse({"error": {"message": ev["message"], "type": _kind(ev["status"]),
                                     "param": None, "code": ev["status"]}})
          return
    finally:
      if not finished:
        scheduler.cancel(job)

  return app


def _kind(status: int) -> str:
  return {400: "invalid_request_error", 408: "timeout", 429: "rate_limit_error"}.get(
      status, "server_error")


class _Shape:
  """OpenAI's response and chunk bodies for one request."""

  def __init__(self, rid: str, model: str, chat: bool, sampler: str, knobs: dict[str, Any]):
    self.rid, self.model, self.chat = rid, model, chat
    self.sampler, self.knobs = sampler, knobs
    self.created = int(time.time())

  def head(self) -> dict[str, Any]:
    kind = ("chat.completion.chunk" if self.chat else "text_completion")
    return {"id": self.rid, "object": kind, "created": self.created, "model": self.model}

  def chunk(self, delta: Any, finish: str | None = None,
            extra: dict[str, Any] | None = None) -> dict[str, Any]:
    out = self.head()
    if delta is None:  # a provisional canvas: no choice changes
      out["choices"] = []
    elif self.chat:
      d = delta if isinstance(delta, dict) else ({"content": delta} if delta else {})
      out["choices"] = [{"index": 0, "delta": d, "finish_reason": finish, "logprobs": None}]
    else:
      out["choices"] = [{"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}]
    if extra:
      out["dlm"] = extra
    return out

  @staticmethod
  def sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

  def info(self, ev: dict[str, Any]) -> dict[str, Any]:
    return {"sampler": self.sampler, "knobs": self.knobs, "seed": ev["seed"], "nfe": ev["nfe"],
            "token_ids": ev["token_ids"]}

  @staticmethod
  def usage(ev: dict[str, Any]) -> dict[str, int]:
    return {"prompt_tokens": ev["prompt_tokens"], "completion_tokens": ev["completion_tokens"],
            "total_tokens": ev["prompt_tokens"] + ev["completion_tokens"]}

  def whole(self, ev: dict[str, Any]) -> dict[str, Any]:
    out = self.head()
    if self.chat:
      out["object"] = "chat.completion"
      out["choices"] = [{"index": 0, "message": {"role": "assistant", "content": ev["text"]},
                         "finish_reason": ev["finish_reason"], "logprobs": None}]
    else:
      out["choices"] = [{"index": 0, "text": ev["text"], "finish_reason": ev["finish_reason"],
                         "logprobs": None}]
    out["usage"] = self.usage(ev)
    out["dlm"] = self.info(ev)
    return out
