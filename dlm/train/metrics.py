"""Metrics to ``metrics.jsonl`` and TensorBoard event files (tensorboardX, no TensorFlow)."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax


class MetricsWriter:
  """Appends one JSON object per logged step; mirrors scalars to TensorBoard.  Process 0 writes."""

  def __init__(self, workdir: str | pathlib.Path):
    self.active = jax.process_index() == 0
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self._tb = None
    if self.active:
      from tensorboardX import SummaryWriter  # deferred: import costs ~1 s
      self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

  def write(self, step: int, metrics: dict[str, Any], prefix: str = "") -> None:
    if not self.active:
      return
    record = {"step": int(step)}
    record.update({prefix + k: float(v) for k, v in metrics.items()})
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    for k, v in record.items():
      if k != "step":
        self._tb.add_scalar(k, v, int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
  """The records of ``metrics.jsonl``, skipping a line garbled by a kill in mid-write."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return records
