"""``dlm plot``: a PNG of a run's training and validation curves from ``metrics.jsonl``."""

from __future__ import annotations

import math
import os
import pathlib
from typing import Any, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dlm.errors import UserError
from dlm.train import metrics

FIGSIZE = (10, 4)
DPI = 120
SMOOTH_MIN_POINTS = 20


def series(records: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
  """Steps and values of ``key``: the last value written per step, finite only, by step.

  A resumed run re-logs the steps after its last checkpoint, so later records win.
  """
  last: dict[int, Any] = {}
  for r in records:
    if key in r and "step" in r:
      last[int(r["step"])] = r[key]
  steps, values = [], []
  for step in sorted(last):
    v = last[step]
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
      steps.append(step)
      values.append(float(v))
  return steps, values


def ema(values: Sequence[float], span: int) -> list[float]:
  """Bias-corrected exponential moving average (as TensorBoard's smoothing)."""
  alpha = 2.0 / (span + 1)
  out, acc, weight = [], 0.0, 0.0
  for v in values:
    acc = (1 - alpha) * acc + alpha * v
    weight = (1 - alpha) * weight + alpha
    out.append(acc / weight)
  return out


def _read(workdir: pathlib.Path) -> list[dict[str, Any]]:
  hint = f"train first with `dlm train --config=... --workdir={workdir}`"
  if not (workdir / "metrics.jsonl").is_file():
    raise UserError(f"no metrics in {workdir}/metrics.jsonl; {hint}")
  records = metrics.read_metrics(workdir)
  if not any("loss" in r for r in records):
    raise UserError(f"no training records in {workdir}/metrics.jsonl; {hint}")
  return records


def _curve(ax: Any, records: list[dict[str, Any]], key: str, label: str, color: str) -> None:
  """A noisy training series, with its EMA when long enough."""
  steps, values = series(records, key)
  smooth = len(values) > SMOOTH_MIN_POINTS
  ax.plot(steps, values, lw=0.8, alpha=0.4 if smooth else 1.0, color=color, label=label)
  if smooth:
    ax.plot(steps, ema(values, max(5, len(values) // 20)), lw=1.8, color=color,
            label=f"{label} (EMA)")


def _draw_rl(fig: Figure, records: list[dict[str, Any]], title: str) -> None:
  """Reinforcement learning (GRPO): the surrogate loss, the rewards, the KL to the reference."""
  ax_loss, ax_reward, ax_kl = fig.subplots(1, 3)
  _curve(ax_loss, records, "loss", "train", "C0")
  ax_loss.set(title="GRPO loss", xlabel="step", ylabel="loss")
  _curve(ax_reward, records, "reward", "rollouts (sampled)", "C0")
  vsteps, vreward = series(records, "val_reward")
  if vsteps:
    ax_reward.plot(vsteps, vreward, "o-", ms=4, color="C1", label="validation (greedy)")
  ax_reward.set(title="mean reward", xlabel="step", ylabel="reward")
  _curve(ax_kl, records, "kl", "KL to the reference", "C2")
  ax_kl.set(title="KL (k3 estimate, per token)", xlabel="step", ylabel="nats")
  for ax in (ax_loss, ax_reward, ax_kl):
    ax.grid(True, alpha=0.3)
    if ax.get_lines():
      ax.legend(loc="best")
  fig.suptitle(title)
  fig.tight_layout()


def _draw(fig: Figure, records: list[dict[str, Any]], title: str) -> None:
  if any("reward" in r for r in records):
    return _draw_rl(fig, records, title)
  ax_loss, ax_right = fig.subplots(1, 2)
  steps, loss = series(records, "loss")
  smooth = len(loss) > SMOOTH_MIN_POINTS
  ax_loss.plot(steps, loss, lw=0.8, alpha=0.4 if smooth else 1.0, color="C0", label="train")
  if smooth:
    ax_loss.plot(steps, ema(loss, max(5, len(loss) // 20)), lw=1.8, color="C0",
                 label="train (EMA)")
  vsteps, vnelbo = series(records, "val_nelbo_per_token")
  if vsteps:
    ax_loss.plot(vsteps, vnelbo, "o-", ms=4, color="C1", label="validation")
  ax_loss.set(title="loss (nats/token)", xlabel="step", ylabel="NELBO (nats/token)")

  bsteps, bpb = series(records, "val_bits_per_byte")
  if bsteps:
    ax_right.plot(bsteps, bpb, "o-", ms=4, color="C1", label="validation")
    ax_right.set(title="validation bits/byte", xlabel="step", ylabel="bits/byte")
  else:
    lsteps, lr = series(records, "lr")
    ax_right.plot(lsteps, lr, color="C2", label="learning rate")
    ax_right.set(title="learning rate (no validation records)", xlabel="step",
                 ylabel="learning rate")
    ax_right.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
  for ax in (ax_loss, ax_right):
    ax.grid(True, alpha=0.3)
    if ax.get_lines():
      ax.legend(loc="best")
  fig.suptitle(title)
  fig.tight_layout()


def plot_curves(workdir: str | os.PathLike, out: str | os.PathLike | None = None
                ) -> pathlib.Path:
  """Writes the loss and validation curves of ``workdir`` to ``out`` (``workdir/curves.png``).

  Returns:
    The path written.

  Raises:
    UserError: the workdir has no training metrics, or ``out``'s directory is missing.
  """
  workdir = pathlib.Path(workdir)
  records = _read(workdir)
  out = workdir / "curves.png" if out is None else pathlib.Path(out)
  if not out.parent.is_dir():
    raise UserError(f"directory {out.parent} of --out={out} does not exist; create it first")
  last_step = max((int(r["step"]) for r in records if "step" in r), default=0)
  rl = any("reward" in r for r in records)
  fig = Figure(figsize=(14, 4) if rl else FIGSIZE, dpi=DPI)
  FigureCanvasAgg(fig)
  _draw(fig, records, f"{workdir.resolve().name}: step {last_step}")
  tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
  try:
    fig.savefig(tmp, format="png", dpi=DPI)
    os.replace(tmp, out)
  finally:
    tmp.unlink(missing_ok=True)
  return out
