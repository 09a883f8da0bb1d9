"""Peak memory of the data pipeline on a training file that is one long line.

  python benchmarks/long_line.py [--mb=200] [--paths=files,root,train] [--chunk_chars=N]

Writes a ``--mb`` MB file of Python source on a single line (newlines turned
into spaces) in a temp dir, then for each path runs the pipeline's real code over it in a fresh
subprocess and reads that subprocess's peak RSS (``ru_maxrss``):

* ``files``: ``data.source="files"`` with the file as ``train_glob``, through
  ``inputs.make_train_input`` (scan, tokenizer trained on a sample, val rows,
  first batches), then one whole epoch of ``packing.stream_batches`` over it:
  every token of the line is tokenized and packed.
* ``root``: ``data.source="stdlib"`` with ``data.root`` a folder holding the
  file (as a ``.py``) and a small validation file, through ``pipeline.prepare``
  (tokenizer, token cache, rows in memory), then the first training batch.
* ``train``: the whole command, ``dlm train --config=configs/quickstart.py`` with
  ``data.source="files"`` and the file as ``data.files.train_glob``, for
  ``--train_steps`` steps (JAX, the model, its compile, the data pipeline and
  checkpoints: what a user's machine needs); its baseline is the same command on
  a one-line file of 1 MB.

Each row gives the peak, the baseline (the same process after its imports)
and their difference per MB of file; the issue's bound is a peak under 1 GB
for 200 MB.  Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import zlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
VOCAB_SIZE = 512
VAL_PERMILLE = 50


def write_long_line(path: pathlib.Path, num_bytes: int) -> int:
  """Writes ``num_bytes`` of Python stdlib source on one line (newlines as spaces, ASCII only).

  The stdlib's files are repeated as needed; returns the size written.
  """
  from dlm.data import corpora  # pylint: disable=g-import-not-at-top
  written = 0
  with open(path, "wb") as f:
    while written < num_bytes:
      for src in corpora.stdlib_files():
        block = src.read_bytes().decode("ascii", "replace").replace("\ufffd", "?")
        block = block.replace("\r", " ").replace("\n", " ").encode("ascii")
        block = block[:num_bytes - written]
        f.write(block)
        written += len(block)
        if written >= num_bytes:
          break
  return written


def _val_name(prefix: str, want_val: bool) -> str:
  """A file name the corpus split rule puts in validation (or in training)."""
  for i in range(100_000):
    name = f"{prefix}{i}.py"
    if (zlib.crc32(name.encode()) % 1000 < VAL_PERMILLE) == want_val:
      return name
  raise AssertionError("no file name found")


def make_root(tmp: pathlib.Path, line: pathlib.Path) -> pathlib.Path:
  """A data.root folder: the long line as a training .py, and a small validation .py."""
  root = tmp / "root"
  root.mkdir()
  os.link(line, root / _val_name("big", False))
  (root / _val_name("val", True)).write_text("def f(x):\n  return x + 1\n" * 2000)
  return root


# ------------------------------------------------------------------ worker --

def _peak_mb() -> float:
  import resource  # pylint: disable=g-import-not-at-top
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _data_cfg(args: argparse.Namespace):
  import ml_collections  # pylint: disable=g-import-not-at-top
  cfg = {"source": "files", "root": None, "vocab_size": VOCAB_SIZE, "seq_len": 128,
         "val_permille": VAL_PERMILLE, "tokenizer_max_chars": args.tokenizer_max_chars,
         "invalid_utf8": "fail", "scan": None, "packing": "concat", "segment_ids": True,
         "files": {"train_glob": args.file, "val_glob": args.val}}
  if args.chunk_chars:
    cfg["tokenize_chunk_chars"] = args.chunk_chars
  return ml_collections.ConfigDict(cfg)


def _files_worker(args: argparse.Namespace) -> dict:
  from dlm.data import inputs, packing, sources  # pylint: disable=g-import-not-at-top
  base = _peak_mb()
  cfg = _data_cfg(args)
  train = inputs.make_train_input(cfg, args.workdir, batch_size=8, seed=0)
  for _ in range(4):
    next(train.iterator)
  docs = sources.make_source(cfg, "train")
  tokens = 0
  for batch in packing.stream_batches(docs, train.tokenizer, seq_len=cfg.seq_len, batch_size=64,
                                      seed=0, num_epochs=1,
                                      chunk_chars=sources.chunk_chars_of(cfg)):
    tokens += int(batch["loss_mask"].sum())
  return {"baseline_mb": base, "tokens": tokens}


def _root_worker(args: argparse.Namespace) -> dict:
  from dlm.data import inputs  # pylint: disable=g-import-not-at-top
  base = _peak_mb()
  cfg = _data_cfg(args)
  cfg.source, cfg.root = "stdlib", args.root
  train = inputs.make_train_input(cfg, args.workdir, batch_size=8, seed=0)
  next(train.iterator)
  return {"baseline_mb": base, "tokens": int(train.meta["train_tokens"])}


def _train_peak(args: argparse.Namespace, train_file: str, workdir: str) -> float:
  """Peak RSS (MB) of one ``dlm train`` child on ``train_file``."""
  import resource  # pylint: disable=g-import-not-at-top
  cmd = [sys.executable, "-m", "dlm.main", "train", f"--config={ROOT}/configs/quickstart.py",
         f"--workdir={workdir}", "--config.data.source=files",
         f"--config.data.files.train_glob={train_file}", f"--config.data.files.val_glob={args.val}",
         f"--config.train.steps={args.train_steps}", f"--config.train.log_every={args.train_steps}",
         f"--config.train.eval_every={args.train_steps}",
         f"--config.train.checkpoint_every={args.train_steps}"]
  if args.chunk_chars:
    cmd.append(f"--config.data.tokenize_chunk_chars={args.chunk_chars}")
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
  if proc.returncode != 0:
    raise SystemExit(f"dlm train failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
  return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def _train_worker(args: argparse.Namespace) -> dict:
  """``dlm train`` on a 1 MB one-line file (baseline), then, in a new worker, on the big one."""
  if args.which == "small":  # the baseline: children's peak is a running maximum, so one per worker
    small = pathlib.Path(args.workdir) / "small.txt"
    with open(args.file, "rb") as src:
      small.write_bytes(src.read(2**20))
    return {"peak_mb": _train_peak(args, str(small), f"{args.workdir}/small"), "tokens": 0}
  return {"peak_mb": _train_peak(args, args.file, f"{args.workdir}/big"), "tokens": 0}


def worker(args: argparse.Namespace) -> None:
  """Runs one path in this process; prints one JSON line with its peak RSS."""
  if args.worker == "train":
    start = time.time()
    row = _train_worker(args)
    row.update(path="train", seconds=round(time.time() - start, 1))
    row["peak_mb"] = round(row["peak_mb"], 1)
    print(json.dumps(row))
    return
  import numpy as np  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  import grain  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  import sentencepiece  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  start = time.time()
  row = (_files_worker if args.worker == "files" else _root_worker)(args)
  row.update(path=args.worker, peak_mb=round(_peak_mb(), 1), seconds=round(time.time() - start, 1))
  row["baseline_mb"] = round(row["baseline_mb"], 1)
  print(json.dumps(row))


# ------------------------------------------------------------------ parent --

def run_path(path: str, tmp: pathlib.Path, line: pathlib.Path, args: argparse.Namespace) -> dict:
  """One worker subprocess for ``path``; its JSON row plus MB of growth per MB of file."""
  workdir = tmp / f"work-{path}"
  workdir.mkdir()
  val = tmp / "val.txt"
  if not val.exists():
    val.write_text("def f(x):\n  return x + 1\n" * 2000)
  cmd = [sys.executable, __file__, f"--worker={path}", f"--file={line}", f"--val={val}",
         f"--workdir={workdir}", f"--tokenizer_max_chars={args.tokenizer_max_chars}",
         f"--chunk_chars={args.chunk_chars}", f"--train_steps={args.train_steps}"]
  if path == "root":
    cmd.append(f"--root={make_root(tmp, line)}")
  env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")

  def one(extra: list[str]) -> dict:
    proc = subprocess.run(cmd + extra, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
      raise SystemExit(f"{path} worker failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])

  row = one(["--which=big"] if path == "train" else [])
  if path == "train":
    row["baseline_mb"] = one(["--which=small"])["peak_mb"]
  file_mb = line.stat().st_size / 2**20
  row["file_mb"] = round(file_mb, 1)
  row["growth_mb_per_file_mb"] = round((row["peak_mb"] - row["baseline_mb"]) / file_mb, 3)
  return row


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--mb", type=float, default=200.0, help="size of the one-line file, MB")
  ap.add_argument("--paths", default="files,root", help="comma list of: files, root, train")
  ap.add_argument("--train_steps", type=int, default=20, help="steps of the train path")
  ap.add_argument("--chunk_chars", type=int, default=0, help="data.tokenize_chunk_chars (0: default)")
  ap.add_argument("--tokenizer_max_chars", type=int, default=3_000_000)
  ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
  ap.add_argument("--file", default="", help=argparse.SUPPRESS)
  ap.add_argument("--val", default="", help=argparse.SUPPRESS)
  ap.add_argument("--root", default="", help=argparse.SUPPRESS)
  ap.add_argument("--which", default="big", help=argparse.SUPPRESS)
  ap.add_argument("--workdir", default="", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.worker:
    worker(args)
    return
  rows = []
  with tempfile.TemporaryDirectory(prefix="dlm-long-line-") as tmp:
    tmp = pathlib.Path(tmp)
    line = tmp / "line.txt"
    write_long_line(line, int(args.mb * 2**20))
    for path in args.paths.split(","):
      row = run_path(path, tmp, line, args)
      print(f"{path:6s} file {row['file_mb']:7.1f} MB  peak {row['peak_mb']:7.1f} MB  baseline"
            f" {row['baseline_mb']:6.1f} MB  growth {row['growth_mb_per_file_mb']:.3f} MB/MB"
            f"  {row['tokens']} tokens  {row['seconds']} s", flush=True)
      rows.append(row)
  print(json.dumps({"mb": args.mb, "rows": rows}))


if __name__ == "__main__":
  main()
