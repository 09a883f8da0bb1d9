"""Input pipeline throughput beside the train step's consumption, at the quickstart config.

  python benchmarks/input_pipeline.py [--config=configs/quickstart.py] [--seconds=10]

Measures, in one run: (1) the streaming pipeline used for TFDS / file sources
(documents -> sentencepiece -> concat packing with segment ids -> batches of
the recipe's shape) over the standard-library corpus, (2) the in-memory path
the quickstart uses, and (3) the train step's tokens/s.  The pipeline must
outpace the step by >= 5x.  Last line: one JSON object with
pipeline_tokens_per_s, step_tokens_per_s and ratio (streaming / step).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import train_step  # noqa: E402  (benchmarks/train_step.py)

from dlm.data import corpora, packing, pipeline, sources  # noqa: E402
from dlm.data import tokenizer as tokenizer_lib  # noqa: E402


def tokens_per_s(it, tokens_per_batch: int, seconds: float) -> float:
  next(it)  # warm-up
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    next(it)
    n += 1
  return n * tokens_per_batch / (time.perf_counter() - t0)


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", default="configs/quickstart.py")
  ap.add_argument("--seconds", type=float, default=10.0)
  ap.add_argument("--steps", type=int, default=20)
  args = ap.parse_args()
  cfg = train_step.load_config(args.config)
  b, l = int(cfg.train.batch_size), int(cfg.data.seq_len)
  with tempfile.TemporaryDirectory() as tmp:
    corpus = corpora.load_corpus("stdlib")
    tok = tokenizer_lib.train_tokenizer(corpus.train, pathlib.Path(tmp) / "tok.model",
                                        vocab_size=int(cfg.data.vocab_size),
                                        max_chars=int(cfg.data.tokenizer_max_chars))
    docs = sources.make_source({"source": "stdlib"}, "train")
    stream = packing.stream_batches(docs, tok, seq_len=l, batch_size=b, seed=0, packing="concat",
                                    segment_ids=True)
    streaming = tokens_per_s(stream, b * l, args.seconds)
    rows = pipeline.to_rows(pipeline.pack_stream(tok.encode_batch(corpus.train), tok.eos_id), l)
    in_memory = tokens_per_s(pipeline.train_iterator(rows, batch_size=b, seed=0), b * l,
                             args.seconds)
  step = train_step.measure(cfg, args.steps)["tokens_per_s"]
  result = {"config": args.config, "batch": b, "seq_len": l,
            "pipeline_tokens_per_s": streaming, "in_memory_tokens_per_s": in_memory,
            "step_tokens_per_s": step, "ratio": streaming / step,
            "in_memory_ratio": in_memory / step}
  print(f"streaming pipeline {streaming:,.0f} tokens/s, in-memory {in_memory:,.0f} tokens/s,"
        f" train step {step:,.0f} tokens/s: {result['ratio']:.0f}x"
        f" ({'ok' if result['ratio'] >= 5 else 'TOO SLOW'}: must be >= 5x)")
  print(json.dumps(result))


if __name__ == "__main__":
  main()
