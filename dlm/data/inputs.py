"""What the trainer asks of the data side: a tokenizer, a checkpointable batch iterator, eval rows.

Two paths, chosen by ``config.data.source``:
  - ``stdlib`` (the embedded corpus, ~12 MB): tokenized once, cached in the
    workdir and cut into rows in memory (``pipeline.py``); global batches are
    the same for any number of processes.
  - ``tfds`` / ``files`` / ``mixture``: documents stream from their source
    (``sources.py``), are tokenized and packed on the fly (``packing.py``), and
    each process reads only its own documents; nothing is held in memory, and
    a long document (a long line) is read and tokenized in chunks of
    ``data.tokenize_chunk_chars`` characters.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
from typing import Any

import numpy as np

from dlm.data import pipeline
from dlm.data import tokenizer as tokenizer_lib

IN_MEMORY_SOURCES = ("stdlib", "sft", "grpo")


@dataclasses.dataclass
class TrainInput:
  tokenizer: tokenizer_lib.Tokenizer
  iterator: Any  # next() -> dict of numpy [B, L]; get_state() / set_state(dict)
  val_rows: np.ndarray | dict[str, np.ndarray]  # int32 [M, L], or SFT rows (sft.KEYS)
  meta: dict[str, Any]
  batch_keys: tuple[str, ...]
  prompts: Any = None  # GRPO: the (train, validation) prompt sets the rollouts read


def _tokenizer(data_cfg: Any, workdir: pathlib.Path, docs: Any, seed: int) -> tokenizer_lib.Tokenizer:
  """The workdir's tokenizer; else a given model file copied in; else one trained on a sample."""
  from dlm.data import packing
  path = workdir / pipeline.TOKENIZER_FILE
  if path.exists():
    return tokenizer_lib.load_tokenizer(path)
  given = data_cfg.get("tokenizer", None)
  if given:
    if not os.path.isfile(given):
      raise FileNotFoundError(f"config.data.tokenizer={given!r} not found; train one with"
                              " `dlm tokenizer train --config=... --out=FILE`")
    tmp = path.with_suffix(".model.tmp")
    shutil.copyfile(given, tmp)
    os.replace(tmp, path)
    return tokenizer_lib.load_tokenizer(path)
  return packing.train_tokenizer_from_docs(docs, path, vocab_size=int(data_cfg.vocab_size),
                                           max_chars=int(data_cfg.tokenizer_max_chars), seed=seed,
                                           model_type=data_cfg.get("tokenizer_type", "bpe"))


def batch_keys(data_cfg: Any) -> tuple[str, ...]:
  """The arrays of each training batch (all [B, L]) for this data config."""
  if data_cfg.source == "sft":
    from dlm.data import sft
    return sft.KEYS
  if data_cfg.source == "grpo":
    raise ValueError("GRPO batches come from its rollout stage: dlm.train.grpo.batch_keys")
  if data_cfg.source in IN_MEMORY_SOURCES:
    return ("tokens",)
  segments = bool(data_cfg.get("segment_ids", True))
  return ("tokens", "loss_mask") + (("segment_ids", "positions") if segments else ())


def make_train_input(data_cfg: Any, workdir: str | os.PathLike, *, batch_size: int, seed: int,
                     process_index: int = 0, process_count: int = 1,
                     max_val_rows: int = 0, ids: dict[str, Any] | None = None,
                     group_size: int = 1) -> TrainInput:
  """``batch_size`` is per process; ``max_val_rows`` bounds a streamed validation set (0 = 4096).
  ``ids``: the special ids of an imported model (config.hf.ids), whose tokenizer is a
  tokenizer.json that does not name them.  ``group_size``: GRPO's completions per prompt (its
  iterator yields batch_size / group_size prompt indices)."""
  workdir = pathlib.Path(workdir)
  if data_cfg.source == "grpo":
    return _grpo_input(data_cfg, workdir, prompts=batch_size // group_size, seed=seed,
                       process_index=process_index, process_count=process_count, ids=ids)
  if data_cfg.source == "sft":
    return _sft_input(data_cfg, workdir, batch_size=batch_size, seed=seed,
                      process_index=process_index, process_count=process_count, ids=ids)
  if data_cfg.source in IN_MEMORY_SOURCES:
    # an imported model (ids given) keeps its tokenizer.json; a dlm run trains or loads its own
    given = workdir_tokenizer(workdir, data_cfg, ids) if ids else None
    data = pipeline.prepare(data_cfg, workdir, given)
    it = pipeline.train_iterator(data.train_rows, batch_size=batch_size, seed=seed,
                                 process_index=process_index, process_count=process_count)
    meta = dict(data.meta, train_rows=len(data.train_rows))
    return TrainInput(data.tokenizer, it, data.val_rows, meta, batch_keys(data_cfg))

  from dlm.data import packing, sources
  train_docs = sources.make_source(data_cfg, "train")
  val_docs = sources.make_source(data_cfg, "validation")
  tok = _tokenizer(data_cfg, workdir, train_docs, seed)
  seq_len = int(data_cfg.seq_len)
  mode = data_cfg.get("packing", "concat")
  segments = bool(data_cfg.get("segment_ids", True))
  it = packing.stream_batches(
      train_docs, tok, seq_len=seq_len, batch_size=batch_size, seed=seed, packing=mode,
      segment_ids=segments, truncate_fraction=float(data_cfg.get("truncate_fraction", 0.0)),
      process_index=process_index, process_count=process_count,
      worker_count=int(data_cfg.get("worker_count", 0)),
      chunk_chars=sources.chunk_chars_of(data_cfg))
  rows = _streamed_val_rows(data_cfg, val_docs, tok, max_val_rows)
  meta = {"source": data_cfg.source, "val_rows": len(rows), "streaming": True}
  return TrainInput(tok, it, rows, meta, batch_keys(data_cfg))


def workdir_tokenizer(workdir: pathlib.Path, data_cfg: Any,
                      ids: dict[str, Any] | None = None) -> Any:
  """The workdir's tokenizer (tokenizer.model, or an imported model's tokenizer.json), or None."""
  from dlm.data import hf_tokenizer
  ids = ids or {}
  return hf_tokenizer.load_any_tokenizer(
      workdir, vocab_size=int(data_cfg.vocab_size) if ids else None,
      **{f"{k}_id": ids.get(k) for k in ("mask", "eos", "pad", "bos")})


def _sft_input(data_cfg: Any, workdir: pathlib.Path, *, batch_size: int, seed: int,
               process_index: int, process_count: int,
               ids: dict[str, Any] | None) -> TrainInput:
  """Conversations (``sft.py``) with the workdir's tokenizer; without one (no --init_from)
  a tokenizer is trained on the conversations' text."""
  from dlm.data import sft
  tok = workdir_tokenizer(workdir, data_cfg, ids)
  if tok is None:
    tok = pipeline.load_or_train_tokenizer(
        workdir / pipeline.TOKENIZER_FILE, list(sft.texts_for_tokenizer(data_cfg)),
        vocab_size=int(data_cfg.vocab_size), max_chars=int(data_cfg.tokenizer_max_chars))
  eos = tok.eos_id
  if eos is None:
    raise ValueError(f"the tokenizer of {workdir} names no EOS id; SFT pads responses with it")
  data = sft.prepare(data_cfg, tok, int(eos))
  it = pipeline.train_iterator(data.train_rows, batch_size=batch_size, seed=seed,
                               process_index=process_index, process_count=process_count)
  return TrainInput(tok, it, data.val_rows, dict(data.meta), sft.KEYS)


def _grpo_input(data_cfg: Any, workdir: pathlib.Path, *, prompts: int, seed: int,
                process_index: int, process_count: int, ids: dict[str, Any] | None) -> TrainInput:
  """Prompt indices for GRPO rollouts (``rl_prompts.py``), with the workdir's tokenizer; without
  one (no --init_from) a tokenizer is trained on the prompts' text."""
  from dlm.data import chat, rl_prompts
  tok = workdir_tokenizer(workdir, data_cfg, ids)
  if tok is None:
    from dlm.data import corpora
    corpus = corpora.load_corpus("stdlib", root=data_cfg.get("root"),
                                 val_permille=int(data_cfg.get("val_permille", 50)),
                                 invalid_utf8=data_cfg.get("invalid_utf8", "fail"))
    tok = pipeline.load_or_train_tokenizer(
        workdir / pipeline.TOKENIZER_FILE, corpus.train, vocab_size=int(data_cfg.vocab_size),
        max_chars=int(data_cfg.tokenizer_max_chars))
  pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
  template = chat.resolve(str(data_cfg.grpo.get("chat_template", "auto")), tok)
  train, val, meta = rl_prompts.load(data_cfg, tok, max_prompt_length=int(
      data_cfg.grpo.max_prompt_length), pad_id=int(pad), template=template)
  rows = {"tokens": train.ids, "index": np.arange(len(train.texts), dtype=np.int32)[:, None]}
  it = pipeline.train_iterator(rows, batch_size=prompts, seed=seed, process_index=process_index,
                               process_count=process_count)
  return TrainInput(tok, it, None, meta, (), prompts=(train, val))


def _streamed_val_rows(data_cfg: Any, val_docs: Any, tok: tokenizer_lib.Tokenizer,
                       max_rows: int) -> np.ndarray:
  """The first ``max_rows`` (0 = 4096) full concat-packed rows of the validation split (seed 0)."""
  from dlm.data import packing, sources
  seq_len = int(data_cfg.seq_len)
  it = packing.stream_batches(val_docs, tok, seq_len=seq_len, batch_size=1, seed=0,
                              packing="concat", segment_ids=False, num_epochs=1,
                              chunk_chars=sources.chunk_chars_of(data_cfg))
  rows = []
  for batch in it:
    if batch["loss_mask"].all():  # the split's last row is padded: leave it out
      rows.append(batch["tokens"][0])
    if len(rows) >= (max_rows or 4096):
      break
  if not rows:
    raise ValueError(f"the validation split of config.data.source={data_cfg.source!r} gives no"
                     f" row of {seq_len} tokens; add validation data or lower data.seq_len")
  return np.stack(rows).astype(np.int32)


def validation_rows(data_cfg: Any, workdir: str | os.PathLike,
                    max_rows: int = 0, ids: dict[str, Any] | None = None
                    ) -> tuple[np.ndarray | dict[str, np.ndarray], dict[str, Any]]:
  """(validation rows [M, L], meta) of a trained run, with the workdir's tokenizer; an SFT
  run's are a dict (``sft.KEYS``): its held-out conversations, responses counted."""
  workdir = pathlib.Path(workdir)
  if data_cfg.source == "sft":
    from dlm.data import sft
    tok = workdir_tokenizer(workdir, data_cfg, ids)
    if tok is None:
      raise ValueError(f"{workdir} has no tokenizer.model or tokenizer.json; copy the run's")
    data = sft.prepare(data_cfg, tok, int(tok.eos_id))
    rows = data.val_rows
    return ({k: v[:max_rows] for k, v in rows.items()} if max_rows else rows), data.meta
  if data_cfg.source in IN_MEMORY_SOURCES:
    data = pipeline.prepare(data_cfg, workdir, workdir_tokenizer(workdir, data_cfg, ids)
                            if ids else None)
    rows = data.val_rows[:max_rows] if max_rows else data.val_rows
    return rows, data.meta
  from dlm.data import sources
  tok = tokenizer_lib.load_tokenizer(workdir / pipeline.TOKENIZER_FILE)
  rows = _streamed_val_rows(data_cfg, sources.make_source(data_cfg, "validation"), tok, max_rows)
  return rows, {"source": data_cfg.source, "val_rows": len(rows), "streaming": True}
