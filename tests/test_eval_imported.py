"""`dlm eval` on imported models: an HF folder and a converted workdir, with their own tokenizer."""

from __future__ import annotations

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dlm.convert import workdir as convert_workdir
from dlm.data.hf_tokenizer import HFTokenizer
from dlm.errors import UserError
from dlm.eval import run_eval

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
WORDS = ("the model fills masked tokens in parallel and the sampler commits the most"
         " confident ones first while the cache keeps the prompt").split()


def _text(n: int = 400) -> str:
  rng = np.random.default_rng(0)
  return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n)) + "\n"


def _bpe_folder(tmp_path: pathlib.Path, family: str) -> pathlib.Path:
  """The fixture plus a BPE tokenizer.json trained on English words: 250 pieces, then the
  family's special tokens at ids 250 (mask), 251 (end of text), 252; id 0 is unknown."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  d = tmp_path / f"{family}-bpe"
  shutil.copytree(FIXTURES / f"{family}-tiny", d)
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  tok.train_from_iterator([_text(2000)], trainers.BpeTrainer(vocab_size=250, show_progress=False,
                                                            special_tokens=["<unk>"]))
  assert tok.get_vocab_size() <= 250
  pad = [f"<unused{i}>" for i in range(250 - tok.get_vocab_size())]
  tok.add_tokens(pad)
  tok.add_special_tokens(["<|mdm_mask|>", "<|endoftext|>", "<|eot_id|>"])
  assert tok.token_to_id("<|mdm_mask|>") == 250 and tok.token_to_id("<|endoftext|>") == 251
  tok.save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
  return d


def _dlm(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "dlm.main", *args], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=300)


def test_piece_bytes_count_the_text_exactly(tmp_path):
  """Byte-level BPE (as LLaDA and Dream ship): the pieces' bytes sum to the text's UTF-8 bytes."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(["héllo wörld, naïve café €5 " * 20, "def f(x):\n  return x"],
                          trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                              initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                              special_tokens=["<|endoftext|>", "<|mask|>"]))
  tok.save(str(tmp_path / "tokenizer.json"))
  h = HFTokenizer(tmp_path, eos_id=0, mask_id=1)
  pb = h.piece_bytes()
  for text in ("héllo wörld, naïve café €5\n  return x", "zzz ü → ∑ 漢字", "x"):
    assert pb[h.encode(text)].sum() == len(text.encode("utf-8")), text
  assert pb[0] == pb[1] == 0  # special tokens stand for no text


def test_eval_hf_folder_and_converted_workdir(tmp_path):
  d = _bpe_folder(tmp_path, "dream")
  pb = HFTokenizer(d, eos_id=251, mask_id=250).piece_bytes()
  text = tmp_path / "words.txt"
  text.write_text(_text())
  # the HF folder, from the CLI, on --text
  r = _dlm("eval", f"--hf={d}", f"--text={text}", "--seq_len=32", "--max_rows=4")
  assert r.returncode == 0, r.stderr
  out = json.loads(r.stdout.strip().splitlines()[-1])
  assert out["family"] == "dream" and out["rows"] == 4 and out["seq_len"] == 32
  # the figures are the NELBO over the bytes the rows stand for
  tok = HFTokenizer(d, eos_id=251, mask_id=250)
  ids = tok.encode(text.read_text())
  rows = np.array(ids[:4 * 32]).reshape(4, 32)
  assert out["num_bytes"] == pb[rows].sum() > 0
  assert math.isclose(out["bits_per_byte"], out["nelbo_per_token"] * out["num_tokens"]
                      / (math.log(2) * out["num_bytes"]), rel_tol=1e-6)
  assert 0 < out["bits_per_byte"] < 50 and out["unigram_bits_per_byte"] > 0
  # a converted workdir, from Python, on the stdlib corpus (the default text)
  work = tmp_path / "work"
  convert_workdir.convert(d, work, expected="dream")
  res = run_eval.evaluate_workdir(work, max_rows=2, seq_len=16, num_passes=2)
  assert res["rows"] == 2 and res["num_passes"] == 2 and "stdlib" in res["text"]
  assert math.isfinite(res["bits_per_byte"]) and res["bits_per_byte"] > 0
  # the same text gives the same figures through either path
  same = run_eval.evaluate_workdir(work, text=str(text), seq_len=32, max_rows=4)
  assert math.isclose(same["bits_per_byte"], out["bits_per_byte"], rel_tol=1e-5)


def test_eval_bad_input_is_one_line(tmp_path):
  d = _bpe_folder(tmp_path, "llada")
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"ok \x96 no")
  with pytest.raises(UserError, match="is not UTF-8"):
    run_eval.evaluate_workdir(d, text=str(bad))
  short = tmp_path / "short.txt"
  short.write_text("the model")
  with pytest.raises(UserError, match="less than one row"):
    run_eval.evaluate_workdir(d, text=str(short), seq_len=64)
  with pytest.raises(UserError, match="no tokenizer"):
    run_eval.evaluate_workdir(FIXTURES / "llada-tiny")
