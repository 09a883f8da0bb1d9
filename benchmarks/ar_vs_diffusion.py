"""AR vs block diffusion vs masked diffusion at the same wall-clock training budget.

  python benchmarks/ar_vs_diffusion.py [--budget_s=300] [--out=runs/ar_vs_diffusion]
                                       [--recipes=ar,bd3_4,bd3_16,mdlm] [--max_rows=512]

Each recipe is ``configs/quickstart.py`` (same data, tokenizer, model size and optimizer)
as the autoregressive baseline (``:ar``), BD3-LM with blocks of 4 and 16 (``:bd3,block=N``)
and MDLM (the default recipe), trained through ``dlm train`` for ``--budget_s`` seconds of
training each: a 50-step calibration run measures each recipe's steps per second, so that
its learning-rate schedule ends inside the budget (``train.time_limit_s`` caps it).  Then
``dlm eval`` scores the same validation rows (bits per byte: the exact NLL for AR, the
NELBO bounds for the diffusion models) and ``dlm sample`` continues ``def `` with each
model's own sampler.  The papers' order on LM1B is AR 22.83 < BD3-4 28.23 < MDLM 31.78
perplexity.  Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
RECIPES = {"ar": "ar", "bd3_4": "bd3,block=4", "bd3_16": "bd3,block=16", "mdlm": ""}


def dlm(*args: str) -> str:
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-m", "dlm.main", *args], capture_output=True, text=True,
                     env=env, cwd=ROOT)
  if r.returncode:
    raise SystemExit(f"dlm {' '.join(args)} failed:\n{r.stderr[-3000:]}")
  return r.stdout


def steps_per_s(config: str, workdir: pathlib.Path) -> float:
  """Steady training speed of a recipe: the 25-step window after the compiled first steps."""
  shutil.rmtree(workdir, ignore_errors=True)
  dlm("train", f"--config={config}", f"--workdir={workdir}", "--config.train.steps=50",
      "--config.train.eval_every=1000", "--config.train.checkpoint_every=1000",
      "--config.train.log_every=25")
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()
          if '"tokens_per_s"' in line]
  cfg = json.loads((workdir / "config.json").read_text())
  tokens_per_step = cfg["train"]["batch_size"] * cfg["data"]["seq_len"]
  return rows[-1]["tokens_per_s"] / tokens_per_step


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--budget_s", type=float, default=300.0)
  ap.add_argument("--out", default="runs/ar_vs_diffusion")
  ap.add_argument("--recipes", default=",".join(RECIPES))
  ap.add_argument("--max_rows", type=int, default=512)
  ap.add_argument("--prompt", default="def ")
  args = ap.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  result = {"budget_s": args.budget_s, "max_rows": args.max_rows, "rows": {}}
  for name in args.recipes.split(","):
    config = f"configs/quickstart.py:{RECIPES[name]}".rstrip(":")
    workdir = out / name
    if workdir.exists():
      raise SystemExit(f"{workdir} exists: runs are never overwritten; pick another --out")
    rate = steps_per_s(config, out / f"{name}.calibrate")
    steps = max(100, int(rate * args.budget_s))
    t0 = time.time()
    train = json.loads(dlm("train", f"--config={config}", f"--workdir={workdir}",
                           f"--config.train.steps={steps}",
                           f"--config.train.time_limit_s={args.budget_s}",
                           f"--config.train.eval_every={steps}",
                           f"--config.train.checkpoint_every={steps}").strip().splitlines()[-1])
    wall = time.time() - t0
    ev = json.loads(dlm("eval", f"--workdir={workdir}",
                        f"--max_rows={args.max_rows}").strip().splitlines()[-1])
    sample = dlm("sample", f"--workdir={workdir}", f"--prompt={args.prompt}", "--num_samples=1",
                 "--seed=0")
    text = sample.split("=====\n", 1)[1].split("\n===== ", 1)[0] if "=====\n" in sample else sample
    row = {"steps": train["step"], "train_seconds": round(train["train_seconds"], 1),
           "wall_seconds": round(wall, 1), "bits_per_byte": round(ev["bits_per_byte"], 4),
           "ppl_bound": round(ev.get("ppl_bound", float("nan")), 2), "sample": text[:400]}
    result["rows"][name] = row
    print(f"{name:7s} {row['steps']:5d} steps {row['train_seconds']:7.1f} s  bits/byte"
          f" {row['bits_per_byte']:.4f}  ppl {row['ppl_bound']:.2f}", flush=True)
    print("  sample: " + text[:200].replace("\n", "\\n"), flush=True)
    shutil.rmtree(out / f"{name}.calibrate", ignore_errors=True)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
