"""LLaDA / Dream import: logits equal the reference PyTorch code's; export round trips exactly."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

import dlm
from dlm.convert import workdir as convert_workdir
from dlm.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
FAMILIES = ["llada", "dream"]


def _fixture(family: str) -> pathlib.Path:
  return FIXTURES / f"{family}-tiny"


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
  return request.param


@pytest.fixture(scope="module")
def model(family):
  return dlm.from_pretrained(_fixture(family))


def test_logits_match_reference_padded_rows_included(family, model):
  ref = np.load(_fixture(family) / "logits.npz")
  out = model.logits(ref["input_ids"], ref["attention_mask"])
  valid = ref["logits_valid"] if "logits_valid" in ref else np.ones(ref["input_ids"].shape, bool)
  assert out.shape == ref["logits"].shape and out.dtype == np.float32
  err = np.abs(out - ref["logits"])[valid]
  assert err.max() < 2e-4, err.max()
  assert float(np.std(ref["logits"])) > 1.0  # a real test: logits are far from zero
  # without a mask (rows 0 and 1 have none) the same
  out2 = model.logits(ref["input_ids"][:2])
  np.testing.assert_allclose(out2, ref["logits"][:2], atol=2e-4, rtol=0)


def test_dream_is_a_shifted_configuration(model, family):
  cfg = model.model_cfg
  if family == "dream":
    assert cfg.shift_logits and cfg.qkv_bias and cfg.num_kv_heads == 2 and cfg.rope_theta == 1e6
  else:
    assert not cfg.shift_logits and not cfg.qkv_bias and cfg.rope_theta == 5e5


def test_import_export_import_is_bit_identical(family, tmp_path):
  work = convert_workdir.convert(_fixture(family), tmp_path / "work", expected=family)
  out = convert_workdir.export(work, tmp_path / "hf", max_shard_bytes=100_000)
  assert len(list(out.glob("*.safetensors"))) > 1 and (out / "model.safetensors.index.json").exists()
  again = convert_workdir.convert(out, tmp_path / "work2", expected=family)
  a, b = dlm.from_pretrained(work, dtype=None), dlm.from_pretrained(again, dtype=None)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    assert x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y))
  ref = np.load(_fixture(family) / "logits.npz")
  np.testing.assert_array_equal(a.logits(ref["input_ids"]), dlm.from_pretrained(out).logits(ref["input_ids"]))
  hf_cfg = json.loads((out / "config.json").read_text())
  orig = json.loads((_fixture(family) / "config.json").read_text())
  assert {k: hf_cfg.get(k) for k in orig} == orig


def _dlm(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "dlm.main", *args], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=300)


def _broken(tmp_path: pathlib.Path, family: str, name: str) -> pathlib.Path:
  d = tmp_path / name
  shutil.copytree(_fixture(family), d)
  return d


def test_bad_checkpoints_get_one_line_errors(tmp_path):
  cases = []
  d = _broken(tmp_path, "llada", "noconfig")
  (d / "config.json").unlink()
  cases.append((d, "no config.json"))
  d = _broken(tmp_path, "llada", "noweights")
  (d / "model.safetensors").unlink()
  cases.append((d, "safetensors"))
  d = _broken(tmp_path, "dream", "badtype")
  cfg = json.loads((d / "config.json").read_text())
  (d / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
  cases.append((d, "model_type='gpt2'"))
  d = _broken(tmp_path, "llada", "badshape")
  cfg = json.loads((d / "config.json").read_text())
  (d / "config.json").write_text(json.dumps(dict(cfg, mlp_hidden_size=96)))
  cases.append((d, "the weights do not match config.json"))
  d = _broken(tmp_path, "dream", "truncated")
  raw = (d / "model.safetensors").read_bytes()
  (d / "model.safetensors").write_bytes(raw[: len(raw) - 1000])
  cases.append((d, "truncated"))
  for src, needle in cases:
    with pytest.raises(UserError) as e:
      dlm.from_pretrained(src)
    assert needle in str(e.value) and "\n" not in str(e.value), (src.name, str(e.value))
  r = _dlm("convert", "--from=llada", f"--src={cases[-1][0]}", f"--workdir={tmp_path / 'w'}")
  assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "truncated" in r.stderr
  assert not (tmp_path / "w").exists()
  r = _dlm("convert", "--from=dream", f"--src={_fixture('llada')}", f"--workdir={tmp_path / 'w'}")
  assert r.returncode == 1 and "--from=llada" in r.stderr


def test_cli_convert_export_and_sample(tmp_path):
  work, out = tmp_path / "work", tmp_path / "hf"
  r = _dlm("convert", "--from=dream", f"--src={_fixture('dream')}", f"--workdir={work}")
  assert r.returncode == 0, r.stderr
  r = _dlm("export", f"--workdir={work}", f"--out={out}")
  assert r.returncode == 0, r.stderr
  assert (out / "config.json").exists() and list(out.glob("*.safetensors"))
  r = _dlm("export", f"--workdir={work}", f"--out={out}")  # never overwrites
  assert r.returncode == 1 and "not empty" in r.stderr


def _with_tokenizer(tmp_path: pathlib.Path, family: str) -> pathlib.Path:
  """The fixture plus a word-level tokenizer.json over its 256 ids and a chat template."""
  from tokenizers import Tokenizer, models, pre_tokenizers, decoders
  d = tmp_path / f"{family}-tok"
  shutil.copytree(_fixture(family), d)
  vocab = {f"w{i}": i for i in range(250)}
  vocab.update({"<|mdm_mask|>": 250, "<|endoftext|>": 251, "<|eot_id|>": 252})
  vocab.update({f"x{i}": i for i in range(253, 256)})
  tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.decoder = decoders.WordPiece()  # joins words with spaces
  tok.save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(json.dumps({
      "chat_template": "{% for m in messages %}w1 {{ m['content'] }} w2 {% endfor %}"
                       "{% if add_generation_prompt %}w3{% endif %}",
      "eos_token": "<|endoftext|>"}))
  return d


def test_hf_tokenizer_and_chat_template(tmp_path):
  d = _with_tokenizer(tmp_path, "llada")
  m = dlm.from_pretrained(d)
  assert m.tokenizer.encode("w5 w7 w9") == [5, 7, 9]
  assert m.tokenizer.decode([5, 250, 7]) == "w5 w7"  # the mask id is dropped
  chat = m.tokenizer.apply_chat_template([{"role": "user", "content": "w4 w5"}])
  assert chat == "w1 w4 w5 w2 w3"
  (d / "tokenizer.json").write_text("{not json")
  with pytest.raises(UserError, match="is not a tokenizers file"):
    dlm.from_pretrained(d)


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_hf_folder_directly(tmp_path, family):
  d = _with_tokenizer(tmp_path, family)
  r = _dlm("sample", f"--hf={d}", "--chat", "--prompt=w4 w5", "--steps=4", "--length=16",
           "--num_samples=1")
  assert r.returncode == 0, r.stderr
  body = r.stdout.split("=====\n", 1)[1]
  assert body.startswith("w1 w4 w5 w2 w3")  # the chat-formatted prompt, then generated words
  out = dlm.from_pretrained(d).generate(np.array([[4, 5, 6]]), sampler="ancestral", steps=4,
                                        gen_length=8)
  assert out.sequences.shape == (1, 11) and out.nfe <= 4
  assert (out.sequences[0, :3] == [4, 5, 6]).all() and 250 not in out.sequences


def test_sharded_conversion_peak_memory_stays_near_the_checkpoint_size():
  """benchmarks/convert_memory.py at 0.27 GB (5 shards): conversion peak < 1.3x the checkpoint."""
  proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "convert_memory.py"),
                         "--gib=0.25", "--shards=5"], capture_output=True, text=True, check=True)
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["shards"] == 5
  assert result["peak_rss_over_size"] < 1.3, result
