"""Speed/quality frontiers (``dlm eval --frontier``): what a faster sampler setting costs.

``--frontier=steps=8,16,32 --frontier=threshold=0.7,0.9`` sweeps the grid of those knob values
(every combination, the other knobs from ``--knob`` or the sampler's defaults); each point
draws the same number of samples with the same seed (``samples.evaluate``) and records
tokens/s, gen-ppl under the ``--evaluator``, entropy, repetition, NFE and its provenance.
The points go to a JSONL file and a PNG of tokens/s (log scale) against gen-ppl, the Pareto
frontier (no other point both faster and lower in gen-ppl) drawn through them.
"""

from __future__ import annotations

import itertools
import json
import pathlib
from typing import Any, Callable

from dlm.errors import UserError
from dlm.eval import samples


def parse_grid(specs: list[str], knobs: dict[str, Any], sampler: str,
               value: Callable[[str], Any]) -> list[dict[str, Any]]:
  """``["steps=8,16", "threshold=0.7,0.9"]`` -> every combination as knob dicts."""
  axes: list[tuple[str, list[Any]]] = []
  for spec in specs:
    key, sep, values = spec.partition("=")
    if not sep or not values:
      raise UserError(f"--frontier={spec!r}: write KNOB=V1,V2,... (e.g. steps=8,16,32)")
    if key not in knobs:
      raise UserError(f"--frontier={spec!r}: sampler {sampler!r} has no knob {key!r}; its"
                      f" knobs: {', '.join(knobs)}")
    if key in dict(axes):
      raise UserError(f"--frontier names {key!r} twice; give its values in one flag")
    axes.append((key, [value(v) for v in values.split(",")]))
  if not axes:
    raise UserError("--frontier needs at least one KNOB=V1,V2,...")
  return [dict(zip([k for k, _ in axes], combo))
          for combo in itertools.product(*[v for _, v in axes])]


def pareto(points: list[dict[str, Any]]) -> list[bool]:
  """For each point: no other point is at least as fast with a lower gen-ppl (or faster with
  an equal one)."""
  out = []
  for p in points:
    dominated = any(q is not p and q["tokens_per_s"] >= p["tokens_per_s"]
                    and q["gen_ppl"] <= p["gen_ppl"]
                    and (q["tokens_per_s"] > p["tokens_per_s"] or q["gen_ppl"] < p["gen_ppl"])
                    for q in points)
    out.append(not dominated)
  return out


def sweep(model: Any, evaluator: Any, grid: list[dict[str, Any]], *, sampler: str,
          knobs: dict[str, Any], num_samples: int, seed: int, batch_size: int,
          retokenize: bool, path: str | None, evaluator_path: str | None,
          progress: bool = True) -> list[dict[str, Any]]:
  """One point per grid entry (``knobs`` updated by it), Pareto flags added."""
  from tqdm import tqdm
  if evaluator is None:
    raise UserError("--frontier plots tokens/s against gen-ppl: give --evaluator=AR_MODEL")
  points = []
  for point in tqdm(grid, desc="frontier", unit="point", disable=not progress):
    summary, _ = samples.evaluate(model, num_samples, evaluator=evaluator, sampler=sampler,
                                  knobs=dict(knobs, **point), seed=seed, batch_size=batch_size,
                                  retokenize=retokenize, path=path, evaluator_path=evaluator_path)
    points.append(dict(summary, sweep=point))
  for p, best in zip(points, pareto(points)):
    p["pareto"] = best
  return points


def write(points: list[dict[str, Any]], jsonl: pathlib.Path, png: pathlib.Path,
          title: str) -> None:
  """The points (one JSON object a line) and the picture; neither file may exist yet."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  with open(jsonl, "x", encoding="utf-8") as f:
    for p in points:
      f.write(json.dumps(p) + "\n")
  fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
  xs, ys = [p["tokens_per_s"] for p in points], [p["gen_ppl"] for p in points]
  ax.scatter(xs, ys, c=["tab:blue" if p["pareto"] else "tab:gray" for p in points], zorder=3)
  for i, p in enumerate(points):  # labels alternate above and below their point
    label = " ".join(f"{v}" for v in p["sweep"].values())
    ax.annotate(f"{label} (nfe {p['nfe']:.0f})", (p["tokens_per_s"], p["gen_ppl"]), fontsize=7,
                xytext=(5, 6 if i % 2 == 0 else -11), textcoords="offset points")
  front = sorted((p for p in points if p["pareto"]), key=lambda p: p["tokens_per_s"])
  ax.plot([p["tokens_per_s"] for p in front], [p["gen_ppl"] for p in front], "-",
          color="tab:blue", alpha=0.6, label="Pareto frontier")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.margins(x=0.2, y=0.12)
  ax.set_xlabel("tokens / s (sampling, compile excluded)")
  ax.set_ylabel("gen-ppl under the evaluator (lower is better)")
  ax.set_title(f"{title}\nlabels: {', '.join(points[0]['sweep'])}", fontsize=8)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  with open(png, "xb") as f:
    fig.savefig(f, format="png")
  plt.close(fig)
