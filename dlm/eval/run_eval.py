"""``dlm eval``: validation bits/byte of a trained run beside the unigram baseline."""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import jax
from tqdm.auto import tqdm

from dlm.data import inputs, pipeline
from dlm.eval import elbo
from dlm.train import step as step_lib
from dlm.workdir import load_run


def evaluate_workdir(workdir: str | pathlib.Path, *, max_rows: int | None = None,
                     num_passes: int | None = None,
                     trust_config_code: bool = False) -> dict[str, Any]:
  run = load_run(workdir, trust_config_code=trust_config_code)
  ec = run.config.eval
  max_rows = int(ec.max_rows) if max_rows is None else max_rows
  rows, meta = inputs.validation_rows(run.config.data, workdir, max_rows)
  passes = int(ec.num_passes) if num_passes is None else num_passes
  piece_bytes = run.tokenizer.piece_bytes()
  eval_fn = jax.jit(functools.partial(step_lib.eval_step, model=run.apply, process=run.process))
  batch_size = int(ec.batch_size)
  with tqdm(total=passes * -(-len(rows) // batch_size), desc="eval", unit="batch",
            disable=jax.process_index() != 0) as bar:
    result = elbo.evaluate(eval_fn, run.params, rows, batch_size=batch_size,
                           piece_bytes=piece_bytes, num_passes=passes, seed=int(ec.seed),
                           progress=bar.update)
  result["unigram_bits_per_byte"] = pipeline.unigram_bits_per_byte(rows, piece_bytes)
  result["improvement_over_unigram"] = 1.0 - result["bits_per_byte"] / result["unigram_bits_per_byte"]
  result["step"] = run.step
  result["weights"] = run.weights
  if "python_version" in meta:
    result["corpus_python_version"] = meta["python_version"]
  result["process"] = run.config.process.name
  return result
