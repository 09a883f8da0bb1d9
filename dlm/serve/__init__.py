"""``dlm serve``: an OpenAI-compatible server with continuous batching (optional extra
``serve``: FastAPI, uvicorn, prometheus-client).

``build(model, ...)`` makes the app and its scheduler for a loaded ``DiffusionLM`` (from Python:
run it with any ASGI server); ``serve(model, host=..., port=...)`` runs it on uvicorn.
"""

from __future__ import annotations

import sys
from typing import Any


def build(model: Any, *, model_name: str, slots: int = 8, max_queue: int = 64,
          prompt_bucket: int = 32, gen_bucket: int = 16, request_timeout: float = 600.0,
          max_pools: int = 4, warm: bool = True, sampler: str | None = None) -> tuple[Any, Any]:
  """(app, scheduler) for ``model``; the scheduler's thread is started, its default pools
  compiled when ``warm``."""
  try:
    import fastapi  # noqa: F401
    import prometheus_client  # noqa: F401
  except ImportError as e:
    from dlm.errors import UserError
    raise UserError(f"dlm serve needs the 'serve' extra ({e.name} is missing): pip install"
                    " -e '.[serve]'") from None
  from dlm.data import chat
  from dlm.serve import app as app_lib, metrics as metrics_lib, protocol
  from dlm.serve.scheduler import Scheduler
  metrics = metrics_lib.make(slots, max_pools)
  scheduler = Scheduler(model, slots=slots, max_queue=max_queue, prompt_bucket=prompt_bucket,
                        gen_bucket=gen_bucket, timeout=request_timeout, max_pools=max_pools,
                        metrics=metrics, sampler=sampler)
  template = chat.for_model(model.config, model.tokenizer) or chat.plain
  render = lambda messages: chat.render(template, messages, True, model.tokenizer)  # noqa: E731
  if warm:
    for width, secs in scheduler.warm(protocol.DEFAULT_MAX_TOKENS, widths=max_pools):
      print(f"dlm serve: compiled the {width}-token prompt pool in {secs:.1f} s", file=sys.stderr)
  scheduler.start()
  return app_lib.create_app(scheduler, model_name=model_name, render=render,
                            metrics=metrics), scheduler


def serve(model: Any, *, host: str = "127.0.0.1", port: int = 8000, **kw: Any) -> None:
  """Builds the app and serves it on uvicorn until interrupted."""
  import uvicorn
  app, scheduler = build(model, **kw)
  print(f"dlm serve: http://{host}:{port}/v1 ({kw['model_name']}, sampler"
        f" {scheduler.default_sampler}, {scheduler.slots} slots a pool)", file=sys.stderr,
        flush=True)
  try:
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
  finally:
    scheduler.stop()
