"""Prometheus metrics of one server (``/metrics``), in their own registry."""

from __future__ import annotations

import dataclasses
from typing import Any

import prometheus_client as prom


@dataclasses.dataclass
class Metrics:
  registry: Any
  requests: Any  # by endpoint and HTTP status
  finished: Any  # by outcome: ok, cancelled, timeout, error
  tokens: Any
  waiting: Any
  busy: Any
  latency: Any
  queue_seconds: Any
  step_seconds: Any

  def text(self) -> bytes:
    return prom.generate_latest(self.registry)


def make(slots: int, pools: int) -> Metrics:
  reg = prom.CollectorRegistry()
  capacity = prom.Gauge("dlm_slot_capacity", "Slots per compiled pool x pools", registry=reg)
  capacity.set(slots * pools)
  return Metrics(
      registry=reg,
      requests=prom.Counter("dlm_http_requests", "HTTP requests by endpoint and status",
                            ["endpoint", "status"], registry=reg),
      finished=prom.Counter("dlm_requests_finished", "Generation requests by outcome",
                            ["outcome"], registry=reg),
      tokens=prom.Counter("dlm_generated_tokens", "Completion tokens returned", registry=reg),
      waiting=prom.Gauge("dlm_queue_waiting", "Requests waiting for a slot", registry=reg),
      busy=prom.Gauge("dlm_slots_busy", "Slots running a request", registry=reg),
      latency=prom.Histogram("dlm_request_seconds", "Arrival to last token",
                             buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300),
                             registry=reg),
      queue_seconds=prom.Histogram("dlm_queue_seconds", "Arrival to a slot",
                                   buckets=(.001, .01, .05, .1, .5, 1, 5, 30), registry=reg),
      step_seconds=prom.Histogram("dlm_step_seconds", "One denoising step of a pool",
                                  buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, 1),
                                  registry=reg))
