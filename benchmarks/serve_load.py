"""Load on one `dlm serve`: concurrent clients against batch-1 sequential requests.

Three phases against one server (``--url``, or ``--workdir`` to start one here on 127.0.0.1):

1. sequential: ``--sequential`` requests one at a time (batch 1);
2. concurrent: ``--requests`` requests from ``--concurrency`` clients (at most the server's
   slots + queue, so none may fail): throughput, p50/p99 latency, failures;
3. overload: ``--overload`` requests at once, more than slots + queue: the excess must be 429s
   (and nothing else fails).

Every request has the same knobs (one compiled pool, warmed by one request first); the whole
run is bounded by ``--duration`` seconds.  Prints one line per phase, the last line one JSON
object: ``throughput_ratio`` is concurrent over sequential requests/s.

  python benchmarks/serve_load.py --workdir=runs/quickstart --requests=64 --concurrency=8
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _args() -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
  p.add_argument("--workdir", help="start `dlm serve` on this model instead (127.0.0.1)")
  p.add_argument("--slots", type=int, default=8, help="with --workdir: slots a pool")
  p.add_argument("--max_queue", type=int, default=8, help="with --workdir: queue bound")
  p.add_argument("--requests", type=int, default=32, help="concurrent phase: requests")
  p.add_argument("--concurrency", type=int, default=8, help="concurrent phase: clients")
  p.add_argument("--sequential", type=int, default=4, help="batch-1 phase: requests")
  p.add_argument("--overload", type=int, default=0,
                 help="overload phase: requests at once (0: 2 x (slots + queue))")
  p.add_argument("--max_tokens", type=int, default=32)
  p.add_argument("--steps", type=int, default=32, help="dlm.steps of every request")
  p.add_argument("--sampler", default=None, help="dlm.sampler (default: the server's)")
  p.add_argument("--duration", type=float, default=300, help="bound on the whole run, seconds")
  return p.parse_args()


def _start(workdir: str, slots: int, max_queue: int) -> tuple[subprocess.Popen, str]:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  proc = subprocess.Popen([sys.executable, "-m", "dlm.main", "serve", f"--workdir={workdir}",
                           f"--port={port}", f"--slots={slots}", f"--max_queue={max_queue}"],
                          cwd=ROOT, env=dict(os.environ), stderr=subprocess.DEVNULL)
  url = f"http://127.0.0.1:{port}"
  for _ in range(600):
    try:
      if httpx.get(f"{url}/health", timeout=2).status_code == 200:
        return proc, url
    except httpx.HTTPError:
      time.sleep(0.5)
    if proc.poll() is not None:
      break
  proc.kill()
  sys.exit("the server did not start; run `dlm serve` by hand to see why")


def main() -> None:
  a = _args()
  if not (a.url or a.workdir) or (a.url and a.workdir):
    sys.exit("give --url (a running server) or --workdir (start one)")
  proc = None
  if a.workdir:
    proc, url = _start(a.workdir, a.slots, a.max_queue)
  else:
    url = a.url.rstrip("/")
  t_end = time.monotonic() + a.duration
  try:
    info = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]
    model, slots, queue = info["id"], info["dlm"]["slots"], info["dlm"]["max_queue"]
    ext = {"steps": a.steps}
    if a.sampler:
      ext["sampler"] = a.sampler

    def body(i: int, steps: int | None = None) -> dict:
      return {"model": model, "prompt": f"def f{i}(x):", "max_tokens": a.max_tokens, "seed": i,
              "temperature": 0.8, "dlm": dict(ext, steps=steps or a.steps,
                                              timeout=max(t_end - time.monotonic(), 1.0))}

    client = httpx.Client(timeout=max(a.duration, 10), limits=httpx.Limits(max_connections=256))

    def one(b: dict) -> tuple[int, float, int]:
      t0 = time.perf_counter()
      r = client.post(f"{url}/v1/completions", json=b)
      tokens = r.json().get("usage", {}).get("completion_tokens", 0) if r.status_code == 200 else 0
      return r.status_code, time.perf_counter() - t0, tokens

    slow = max(a.steps, 8 * a.steps)  # overload requests: long enough to pile up
    for warm in (body(-1), body(-2, steps=slow)):  # compiles (or finds) both phases' pools
      status, _, _ = one(warm)
      if status != 200:
        sys.exit(f"warm-up request failed with HTTP {status}")

    t0 = time.perf_counter()
    seq = [one(body(i)) for i in range(a.sequential)]
    seq_s = time.perf_counter() - t0
    seq_rps = a.sequential / seq_s
    if any(c != 200 for c, _, _ in seq):
      sys.exit(f"a sequential request failed: HTTP {[c for c, _, _ in seq if c != 200][0]}")
    print(f"sequential: {a.sequential} requests in {seq_s:.2f} s ({seq_rps:.2f} req/s)",
          file=sys.stderr)

    conc = min(a.concurrency, slots + queue)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(conc) as pool:
      got = list(pool.map(one, [body(1000 + i) for i in range(a.requests)]))
    conc_s = time.perf_counter() - t0
    lat = np.array([s for c, s, _ in got if c == 200])
    failed = sum(c != 200 for c, _, _ in got)
    conc_rps = a.requests / conc_s
    print(f"concurrent: {a.requests} requests from {conc} clients in {conc_s:.2f} s"
          f" ({conc_rps:.2f} req/s), {failed} failed", file=sys.stderr)

    burst = a.overload or 2 * (slots + queue)
    gate = threading.Barrier(burst)

    def at_once(i: int) -> int:
      gate.wait()
      return one(body(5000 + i, steps=slow))[0]

    with ThreadPoolExecutor(burst) as pool:
      codes = list(pool.map(at_once, range(burst)))
    over = {"sent": burst, "ok": codes.count(200), "rejected_429": codes.count(429),
            "other_errors": sum(c not in (200, 429) for c in codes),
            "capacity": slots + queue}
    print(f"overload: {burst} at once against {slots} slots + {queue} queued:"
          f" {over['ok']} served, {over['rejected_429']} rejected (429)", file=sys.stderr)
    tokens = sum(t for _, _, t in got)
    print(json.dumps({
        "url": url, "model": model, "slots": slots, "max_queue": queue,
        "sequential": {"requests": a.sequential, "seconds": round(seq_s, 3),
                       "requests_per_s": round(seq_rps, 3)},
        "concurrent": {"requests": a.requests, "clients": conc, "seconds": round(conc_s, 3),
                       "requests_per_s": round(conc_rps, 3),
                       "tokens_per_s": round(tokens / conc_s, 1)},
        "throughput_ratio": round(conc_rps / seq_rps, 3),
        "latency_s": {"p50": round(float(np.percentile(lat, 50)), 4) if lat.size else None,
                      "p99": round(float(np.percentile(lat, 99)), 4) if lat.size else None},
        "completed": int(lat.size), "failed": failed, "overload": over,
        "max_tokens": a.max_tokens, "steps": a.steps}))
  finally:
    if proc is not None:
      proc.terminate()
      proc.wait(timeout=30)


if __name__ == "__main__":
  main()
