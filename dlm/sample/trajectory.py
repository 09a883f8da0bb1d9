"""The denoising trajectory as a picture: one row per model call, newly revealed tokens highlighted.

Built from a sampler's ``committed_at`` [L] (the call that revealed each
position, -1 for prompt/fixed tokens): row s shows every token revealed by
call s, the ones revealed at s highlighted, and the rest still masked.
"""

from __future__ import annotations

import html
import os
import pathlib
from typing import Any

import numpy as np

from dlm.errors import UserError

MASK = "░"


def _pieces(tokenizer: Any, tokens: np.ndarray) -> list[str]:
  return [tokenizer.decode([int(t)]) or "·" for t in tokens]


def render_html(tokenizer: Any, tokens: np.ndarray, committed_at: np.ndarray, nfe: int) -> str:
  pieces = _pieces(tokenizer, tokens)
  rows = []
  for s in range(nfe):
    cells = []
    for piece, at in zip(pieces, committed_at):
      text = html.escape(piece).replace("\n", "⏎")
      if at < 0:
        cells.append(f'<span class="p">{text}</span>')
      elif at < s:
        cells.append(f"<span>{text}</span>")
      elif at == s:
        cells.append(f'<span class="n">{text}</span>')
      else:
        cells.append(f'<span class="m">{MASK}</span>')
    rows.append(f'<div><b>{s + 1:>4}</b> {"".join(cells)}</div>')
  style = ("body{font-family:monospace;white-space:pre}.p{color:#555}.n{background:#ffd54f}"
           ".m{color:#bbb}b{color:#888;margin-right:1em}")
  return (f"<!doctype html><meta charset=utf-8><title>denoising trajectory</title>"
          f"<style>{style}</style><p>{nfe} model calls; highlighted: revealed at that call</p>"
          + "\n".join(rows))


def render_png(committed_at: np.ndarray, nfe: int, path: pathlib.Path) -> None:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.colors import ListedColormap
  from matplotlib.figure import Figure
  steps = np.arange(nfe)[:, None]
  at = committed_at[None, :]
  grid = np.where(at < 0, 3, np.where(at < steps, 1, np.where(at == steps, 2, 0)))
  fig = Figure(figsize=(max(4.0, len(committed_at) / 16), max(2.0, nfe / 8)), dpi=120)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  cmap = ListedColormap(["#e0e0e0", "#4c72b0", "#ffb300", "#555555"])
  ax.imshow(grid, aspect="auto", interpolation="nearest", cmap=cmap, vmin=0, vmax=3)
  ax.set_xlabel("position")
  ax.set_ylabel("model call")
  ax.set_title("grey prompt, light masked, blue revealed, amber revealed now", fontsize=8)
  fig.tight_layout()
  fig.savefig(path)


def write(path: str | os.PathLike, tokenizer: Any, tokens: np.ndarray, committed_at: np.ndarray,
          nfe: int) -> pathlib.Path:
  """Writes ``path`` (.html or .png) for one sample."""
  path = pathlib.Path(path)
  if path.suffix not in (".html", ".png"):
    raise UserError(f"--trajectory={path}: use a .html or .png file name")
  tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
  if path.suffix == ".html":
    tmp.write_text(render_html(tokenizer, tokens, committed_at, nfe))
  else:
    render_png(committed_at, nfe, tmp)
  os.replace(tmp, path)
  return path
