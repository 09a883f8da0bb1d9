"""dlm serve (dlm/serve/): the official openai client against a server on 127.0.0.1 started
here, streamed == not streamed == model.generate, continuous batching, faults one line each."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import openai
import pytest

from dlm import api
from dlm.data import chat

ROOT = pathlib.Path(__file__).resolve().parents[1]
KNOBS = {"steps": 16, "block_length": 16}  # one pool per prompt width: 16 tokens, one block
SEED = 3


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(smoke_base):
  port = _free_port()
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  log = open(smoke_base.parent / f"serve_{port}.log", "w")
  proc = subprocess.Popen(
      [sys.executable, "-m", "dlm.main", "serve", f"--workdir={smoke_base}", f"--port={port}",
       "--sampler=llada", "--slots=4", "--max_queue=4", "--prompt_bucket=16",
       "--gen_bucket=16", "--served_model_name=smoke"],
      cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  deadline = time.monotonic() + 240
  while True:
    try:
      if httpx.get(f"{url}/health", timeout=2).status_code == 200:
        break
    except httpx.HTTPError:
      pass
    if proc.poll() is not None or time.monotonic() > deadline:
      proc.kill()
      raise AssertionError(pathlib.Path(log.name).read_text()[-3000:])
    time.sleep(0.5)
  yield url
  proc.terminate()
  try:
    proc.wait(timeout=30)
  except subprocess.TimeoutExpired:
    proc.kill()
  log.close()


@pytest.fixture(scope="module")
def client(server):
  return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(smoke_base):
  return api.from_pretrained(smoke_base)


def _metric(server: str, name: str) -> float:
  for line in httpx.get(f"{server}/metrics").text.splitlines():
    if line.startswith(name + " "):
      return float(line.split()[-1])
  return 0.0


def _direct(model, prompt: str, max_tokens: int, temperature: float) -> list[int]:
  """model.generate with the server's canvas: prompt bucket 16, generation bucket 16."""
  ids = model.tokenizer.encode(prompt)
  out = model.generate(np.asarray([ids]), sampler="llada", seed=SEED, prompt_bucket=16,
                       gen_length=16, temperature=temperature, **KNOBS)
  return out.token_ids[0][:max_tokens]


def test_completions_streamed_equal_whole_equal_generate(client, model):
  kw = dict(model="smoke", prompt="def add(a, b):", max_tokens=12, temperature=0.8, seed=SEED,
            extra_body={"dlm": KNOBS})
  whole = client.completions.create(**kw)
  parts = list(client.completions.create(stream=True, **kw))
  streamed = "".join(c.choices[0].text for c in parts if c.choices)
  assert streamed == whole.choices[0].text
  assert parts[-1].choices[0].finish_reason == whole.choices[0].finish_reason
  want = _direct(model, kw["prompt"], 12, 0.8)
  got = whole.model_extra["dlm"]["token_ids"]
  assert got == want  # generate's tokens, cut at EOS and to max_tokens
  assert whole.choices[0].text == model.tokenizer.decode(want)
  assert whole.usage.completion_tokens == len(want)
  assert whole.model_extra["dlm"]["knobs"]["gen_length"] == 16


def test_chat_streamed_equal_whole_and_canvases(client, model):
  messages = [{"role": "user", "content": "Write a loop."}]
  kw = dict(model="smoke", messages=messages, max_tokens=16, temperature=0.8, seed=SEED)
  whole = client.chat.completions.create(extra_body={"dlm": KNOBS}, **kw)
  text = whole.choices[0].message.content
  prompt = chat.render(chat.plain, messages, True, model.tokenizer)
  assert text == model.tokenizer.decode(_direct(model, prompt, 16, 0.8))
  canvases, pieces = [], []
  for c in client.chat.completions.create(stream=True, extra_body={
      "dlm": dict(KNOBS, stream_steps=True)}, **kw):
    extra = (c.model_extra or {}).get("dlm") or {}
    if "canvas" in extra:
      canvases.append(extra["token_ids"])
    if c.choices and c.choices[0].delta.content:
      pieces.append(c.choices[0].delta.content)
  assert "".join(pieces) == text
  assert len(canvases) >= 2  # one provisional canvas a denoising step
  for before, after in zip(canvases, canvases[1:]):  # a committed token never changes
    assert all(a == b for a, b in zip(before, after) if a >= 0)
  assert sum(t >= 0 for t in canvases[-1]) > sum(t >= 0 for t in canvases[0])


def test_models_health_metrics(server):
  models = httpx.get(f"{server}/v1/models").json()
  assert [m["id"] for m in models["data"]] == ["smoke"]
  assert httpx.get(f"{server}/health").json()["status"] == "ok"
  text = httpx.get(f"{server}/metrics").text
  assert "dlm_requests_finished_total" in text and "dlm_step_seconds_bucket" in text


@pytest.mark.parametrize("body, status, message", [
    (b"{not json", 400, "not valid JSON"),
    (json.dumps({"prompt": "x", "dlm": {"sampler": "nope"}}).encode(), 400, "unknown sampler"),
    (json.dumps({"prompt": "x", "dlm": {"sampler": "os:system"}}).encode(), 400,
     "cannot import code"),
    (json.dumps({"prompt": "x " * 200}).encode(), 400, "more than the model's context"),
    (json.dumps({"prompt": "x", "dlm": {"stepz": 3}}).encode(), 400, "takes no knob 'stepz'"),
    (json.dumps({"prompt": "x", "dlm": {"steps": 5, "block_length": 8}}).encode(), 400,
     "not divisible"),
    (json.dumps({"prompt": "x", "temperature": "hot"}).encode(), 400, "temperature"),
    (json.dumps({"prompt": "x", "model": "gpt-4"}).encode(), 404, "is not served here"),
])
def test_bad_requests_are_one_line(server, body, status, message):
  r = httpx.post(f"{server}/v1/completions", content=body,
                 headers={"Content-Type": "application/json"})
  assert r.status_code == status, r.text
  msg = r.json()["error"]["message"]
  assert message in msg and "\n" not in msg


def test_cancel_and_timeout_free_their_slots(server, client):
  # ancestral steps commit tokens all along the 4,096 steps (llada's quota would finish
  # the 16 tokens in the first 16 steps)
  slow = {"prompt": "x", "max_tokens": 16, "dlm": {"sampler": "ancestral", "steps": 4096}}
  with httpx.stream("POST", f"{server}/v1/completions",
                    json=dict(slow, stream=True, dlm=dict(slow["dlm"], stream_steps=True)),
                    timeout=60) as r:
    for line in r.iter_lines():
      if line.startswith("data:"):
        break  # the client goes away after its first chunk
  r = httpx.post(f"{server}/v1/completions", json=dict(slow, dlm=dict(slow["dlm"], timeout=0.5)),
                 timeout=60)
  assert r.status_code == 408 and "timed out" in r.json()["error"]["message"]
  deadline = time.monotonic() + 30
  while httpx.get(f"{server}/health").json()["slots_busy"] and time.monotonic() < deadline:
    time.sleep(0.2)
  assert httpx.get(f"{server}/health").json() == {"status": "ok", "waiting": 0, "slots_busy": 0}
  assert _metric(server, 'dlm_requests_finished_total{outcome="cancelled"}') == 1
  assert _metric(server, 'dlm_requests_finished_total{outcome="timeout"}') == 1
  # and it keeps serving
  ok = client.completions.create(model="smoke", prompt="x", max_tokens=4, seed=1,
                                 extra_body={"dlm": KNOBS})
  assert ok.choices[0].finish_reason in ("stop", "length")


def test_load_benchmark_bounded(server):
  """benchmarks/serve_load.py against this server: continuous batching beats batch-1
  sequential requests, no failures below the queue limit, 429s above it."""
  r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_load.py"), f"--url={server}",
                      "--requests=8", "--concurrency=4", "--overload=12", "--max_tokens=16",
                      "--steps=16", "--duration=120"],
                     capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-2000:]
  got = json.loads(r.stdout.strip().splitlines()[-1])
  assert got["failed"] == 0 and got["completed"] == 8
  assert got["overload"]["rejected_429"] > 0 and got["overload"]["other_errors"] == 0
  assert got["throughput_ratio"] > 1.0  # 4 slots at once vs one request at a time
  assert got["latency_s"]["p50"] <= got["latency_s"]["p99"]


def test_an_operator_sampler_from_a_test_local_file_through_python(model, monkeypatch):
  """dlm.serve.build from Python with the operator's module:function sampler (trusted, like the
  CLI's --sampler); requests still cannot name one."""
  from fastapi.testclient import TestClient

  from dlm import serve
  monkeypatch.syspath_prepend(str(ROOT / "tests" / "plugins"))
  app, scheduler = serve.build(model, model_name="m", sampler="greedy_schedule:make", slots=2,
                               warm=False)
  try:
    with TestClient(app) as c:
      body = {"prompt": "def f(", "max_tokens": 8, "seed": 0, "dlm": {"t0": 0.0, "t1": 0.0}}
      r = c.post("/v1/completions", json=body)
      assert r.status_code == 200, r.text
      ids = model.tokenizer.encode("def f(")
      want = model.generate(np.asarray([ids]), sampler="greedy_schedule:make", seed=0,
                            prompt_bucket=32, gen_length=16, steps=8, t0=0.0, t1=0.0)
      assert r.json()["dlm"]["token_ids"] == want.token_ids[0][:8]
      r = c.post("/v1/completions", json=dict(body, dlm={"sampler": "greedy_schedule:make"}))
      assert r.status_code == 400 and "cannot import code" in r.json()["error"]["message"]
  finally:
    scheduler.stop()
