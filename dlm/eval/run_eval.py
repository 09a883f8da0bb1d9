"""``dlm eval``: bits per byte of a model (trained, converted or an HF folder) beside the unigram baseline.

A dlm run is scored on its own validation split; an imported model (converted
workdir or HF folder), or any model given ``text=``, on a text file or the
stdlib corpus's validation files, tokenized with the model's own tokenizer.
"""

from __future__ import annotations

import functools
import pathlib
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from dlm.data import corpora, inputs, pipeline
from dlm.errors import UserError
from dlm.eval import elbo
from dlm.models import loader

DEFAULT_IMPORTED_SEQ_LEN = 512  # rows for imported models: their 4096-token context is slow on CPU


def text_rows(tokenizer: Any, texts: list[str], seq_len: int, max_rows: int,
              where: str) -> np.ndarray:
  """Each text's ids then EOS, concatenated and cut into full [N, seq_len] rows."""
  eos = tokenizer.eos_id
  if eos is None:
    raise UserError("the model's tokenizer has no EOS id; give the model folder its"
                    " tokenizer_config.json (eos_token)")
  docs, total = [], 0
  for text in texts:
    docs.append(tokenizer.encode(text))
    total += len(docs[-1]) + 1
    if max_rows and total >= max_rows * seq_len:
      break
  rows = pipeline.to_rows(pipeline.pack_stream(docs, eos), seq_len)
  if not len(rows):
    raise UserError(f"{where} gives {total} tokens, less than one row of {seq_len}; give more"
                    " text or a smaller --seq_len")
  return rows[:max_rows] if max_rows else rows


def _texts(text: str | None) -> tuple[list[str], str]:
  if text is None:
    corpus = corpora.load_corpus("stdlib")
    return list(corpus.val), f"the stdlib corpus ({corpus.meta['root']}, validation files)"
  path = pathlib.Path(text)
  try:
    raw = path.read_bytes()
  except OSError as e:
    raise UserError(f"--text={text}: {e.strerror}; give a UTF-8 text file") from None
  try:
    return [raw.decode("utf-8")], f"--text={text}"
  except UnicodeDecodeError as e:
    raise UserError(f"--text={text} is not UTF-8 (byte {raw[e.start]:#04x} at offset"
                    f" {e.start}); save it as UTF-8") from None


def evaluate_workdir(workdir: str | pathlib.Path, *, max_rows: int | None = None,
                     num_passes: int | None = None, text: str | None = None,
                     seq_len: int | None = None,
                     trust_config_code: bool = False) -> dict[str, Any]:
  """The negative ELBO in bits per byte (and per token) of ``workdir``'s model."""
  model = loader.load(workdir, trust_config_code=trust_config_code)
  ec = model.config.get("eval", {})
  max_rows = int(ec.get("max_rows", 0)) if max_rows is None else max_rows
  tok = model.tokenizer
  sft_run = model.config.get("data", {}).get("source") == "sft"
  imported = "hf" in model.config and not sft_run  # a fine-tuned import has its own rows
  if tok is None or not callable(getattr(tok, "piece_bytes", None)):
    raise UserError(f"{workdir} has no tokenizer (tokenizer.model or tokenizer.json); bits per"
                    " byte need one: copy the model's tokenizer files there")
  meta: dict[str, Any] = {}
  if imported or text is not None:
    texts, where = _texts(text)
    seq_len = seq_len or int(ec.get("seq_len", 0) or 0) or (
        DEFAULT_IMPORTED_SEQ_LEN if imported else int(model.config.data.seq_len))
    rows = text_rows(tok, texts, seq_len, max_rows, where)
    meta["text"] = where
  else:
    if seq_len is not None:
      raise UserError("--seq_len applies to --text (or an imported model); a dlm run is scored"
                      " on its own validation rows of data.seq_len")
    rows, meta = inputs.validation_rows(model.config.data, workdir, max_rows,
                                        ids=dict(model.config.hf.ids) if "hf" in model.config
                                        else None)
  passes = int(ec.get("num_passes", 1)) if num_passes is None else num_passes
  piece_bytes = tok.piece_bytes()
  bd3 = model.model_cfg.block_size if model.model_cfg.mask_kind == "bd3" else 0
  eval_fn = jax.jit(functools.partial(elbo.eval_step, model=model.apply, process=model.process,
                                      bd3_block_size=bd3))
  tokens = rows["tokens"] if isinstance(rows, dict) else rows  # SFT: a dict, responses counted
  batch_size = min(int(ec.get("batch_size", 8)), len(tokens))
  with tqdm(total=passes * -(-len(tokens) // batch_size), desc="eval", unit="batch",
            disable=jax.process_index() != 0) as bar:
    result = elbo.evaluate(eval_fn, model.params, rows, batch_size=batch_size,
                           piece_bytes=piece_bytes, num_passes=passes,
                           seed=int(ec.get("seed", 1234)), progress=bar.update)
  counted = tokens if not isinstance(rows, dict) else tokens[rows["loss_mask"] > 0][None]
  result["unigram_bits_per_byte"] = pipeline.unigram_bits_per_byte(counted, piece_bytes)
  result["improvement_over_unigram"] = 1.0 - result["bits_per_byte"] / result["unigram_bits_per_byte"]
  result.update(step=model.step, weights=model.weights, rows=int(len(tokens)),
                seq_len=int(tokens.shape[1]), process=model.config.process.name)
  if imported:
    result["family"] = model.config.hf.family
  if "python_version" in meta:
    result["corpus_python_version"] = meta["python_version"]
  if "text" in meta:
    result["text"] = meta["text"]
  from dlm.eval import provenance
  result["dlm"] = provenance.record(model, seed=int(ec.get("seed", 1234)), path=str(workdir))
  return result
