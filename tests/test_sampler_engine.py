"""One sampling engine: registered factories with declared knobs, one loop, one entry point.

A sampler from a test-local file (tests/plugins/greedy_schedule.py) runs through
``model.generate`` and ``dlm sample`` by its ``module:function`` name.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import dlm
from dlm.errors import UserError
from dlm.sample import engine

ROOT = pathlib.Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "tests" / "plugins"
LLADA = ROOT / "tests" / "fixtures" / "llada-tiny"
PROMPT = np.array([[11, 12, 13, 14]], np.int32)


@pytest.fixture(scope="module")
def model():
  sys.path.insert(0, str(PLUGINS))
  yield dlm.from_pretrained(LLADA)
  sys.path.remove(str(PLUGINS))


def test_every_builtin_declares_its_knobs():
  for name in ("ancestral", "llada", "dream", "fast_dllm"):
    make = engine.resolve(name)
    assert make.knobs and all(isinstance(k, engine.Knob) and k.doc for k in make.knobs.values())
    assert make.length is None or make.length in make.knobs
  assert engine.resolve("fast_dllm").knobs["remasking"].default == "low_confidence"
  assert engine.resolve("fast_dllm").knobs["temperature"].default == 0.0


def test_a_sampler_from_a_test_local_file_runs_through_generate(model):
  out = model.generate(PROMPT, sampler="greedy_schedule:make", steps=8, gen_length=8, t0=0.0,
                       t1=0.0)
  # at temperature 0 with one token per call it is LLaDA's low-confidence remasking
  want = model.generate(PROMPT, sampler="llada", steps=8, gen_length=8, block_length=8,
                        temperature=0.0, remasking="low_confidence")
  np.testing.assert_array_equal(out.sequences, want.sequences)
  np.testing.assert_array_equal(out.committed_at, want.committed_at)
  assert out.nfe == want.nfe == 8
  hot = model.generate(PROMPT, sampler="greedy_schedule:make", steps=4, gen_length=8, t0=5.0,
                       seed=1)
  assert hot.nfe == 4 and not np.any(hot.sequences == model.ids["mask"])
  np.testing.assert_array_equal(hot.sequences[:, :4], PROMPT)
  assert sorted(np.unique(hot.committed_at[0, 4:]).tolist()) == [0, 1, 2, 3]


def test_model_default_sampler_is_its_family(model):
  assert engine.default_sampler(model) == "llada"
  a = model.generate(PROMPT, steps=4, gen_length=8)
  b = model.generate(PROMPT, sampler="llada", steps=4, gen_length=8)
  np.testing.assert_array_equal(a.sequences, b.sequences)


@pytest.mark.parametrize("call,needle", [
    (dict(sampler="magic"), "unknown sampler 'magic'"),
    (dict(sampler="llada", steps=4, gen_length=8, alg="entropy"),
     "sampler 'llada' takes no knob 'alg'; its knobs: steps=128, gen_length=128"),
    (dict(sampler="fast_dllm", steps=4, gen_length=8, top_k=3), "takes no knob 'top_k'"),
    (dict(sampler="os:getcwd"), "is not a dlm sampler factory"),
    (dict(sampler="llada", steps=4, gen_length=0), "gen_length=0 must be an integer >= 1"),
])
def test_bad_sampler_input_is_one_line(model, call, needle):
  with pytest.raises(UserError, match=needle) as e:
    model.generate(PROMPT, **call)
  assert "\n" not in str(e.value)


def test_a_padded_batch_with_a_sampler_that_cannot_pad_is_one_line(model):
  batch = np.array([[5, 6, 7], [251, 8, 9]])
  mask = np.array([[1, 1, 1], [0, 1, 1]])
  with pytest.raises(UserError, match="takes prompts of one length"):
    model.generate(batch, mask, sampler="ancestral", steps=4, gen_length=4)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> pathlib.Path:
  """llada-tiny with a word-level tokenizer.json (w0..w255)."""
  import shutil
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  folder = tmp_path_factory.mktemp("engine") / "llada"
  shutil.copytree(LLADA, folder)
  tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(256)}, unk_token="w0"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.decoder = decoders.WordPiece()
  tok.save(str(folder / "tokenizer.json"))
  return folder


def _dlm(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONPATH=str(PLUGINS))
  return subprocess.run([sys.executable, "-m", "dlm.main", *args], capture_output=True,
                        text=True, env=env, cwd=ROOT, timeout=300)


def test_prompts_file_in_padded_batches_to_a_jsonl_output(folder, tmp_path):
  """`--prompts` of mixed lengths share left-padded batches; each row is the prompt run alone."""
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text('{"prompt": "w11 w12 w13 w14"}\n{"prompt": "w21"}\n\n{"prompt": "w31 w32"}\n')
  out = tmp_path / "out.jsonl"
  knobs = ["--sampler=llada", "--steps=4", "--max_new_tokens=8", "--block_length=4"]
  r = _dlm("sample", f"--hf={folder}", f"--prompts={prompts}", "--num_samples=1",
           "--batch_size=3", f"--output={out}", *knobs)
  assert r.returncode == 0, r.stderr
  records = [json.loads(l) for l in out.read_text().splitlines()]
  assert [(x["prompt_index"], x["prompt"]) for x in records] == [
      (0, "w11 w12 w13 w14"), (1, "w21"), (2, "w31 w32")]
  assert all(x["nfe"] == 4 and len(x["token_ids"]) <= 8 and x["seconds"] > 0 for x in records)
  alone = _dlm("sample", f"--hf={folder}", "--prompt=w21", "--num_samples=1", *knobs)
  assert alone.stdout.split("=====\n", 1)[1].strip() == ("w21 " + records[1]["text"]).strip()
  bucketed = _dlm("sample", f"--hf={folder}", "--prompt=w21", "--num_samples=1",
                  "--prompt_bucket=16", *knobs)  # left-padded to 16 tokens: the same greedy text
  assert bucketed.returncode == 0 and bucketed.stdout == alone.stdout, bucketed.stderr
  before = out.read_bytes()
  again = _dlm("sample", f"--hf={folder}", f"--prompts={prompts}", f"--output={out}", *knobs)
  assert again.returncode == 1 and "exists; samples are never written over" in again.stderr
  assert out.read_bytes() == before
  prompts.write_text('{"prompt": "w1"}\n{"text": 3}\n')
  bad = _dlm("sample", f"--hf={folder}", f"--prompts={prompts}", *knobs)
  assert bad.returncode == 1 and f"{prompts}:2 has neither" in bad.stderr.strip().splitlines()[-1]


def test_the_cli_runs_a_test_local_sampler_with_its_knobs(folder, tmp_path):
  """`dlm sample --sampler=module:function --knob=NAME=VALUE` on an HF folder, with a trajectory."""
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", PYTHONPATH=str(PLUGINS))
  base = [sys.executable, "-m", "dlm.main", "sample", f"--hf={folder}", "--prompt=w11 w12 w13",
          "--sampler=greedy_schedule:make"]
  traj = tmp_path / "t.html"
  r = subprocess.run(base + ["--steps=4", "--max_new_tokens=8", "--knob=t0=0.0", "--num_samples=2",
                             f"--trajectory={traj}"], capture_output=True, text=True, env=env,
                     cwd=ROOT, timeout=300)
  assert r.returncode == 0, r.stderr
  heads = [l for l in r.stdout.splitlines() if l.startswith("===== sample ")]
  assert heads == [f"===== sample {i} (greedy_schedule:make, nfe 4, step 0) =====" for i in (0, 1)]
  assert traj.read_text().count("<div><b>") == 4
  for bad, needle in ((["--knob=t9=1"], "--knob='t9=1': sampler 'greedy_schedule:make' takes"),
                      (["--top_k=3"], "--top_k is not a knob of sampler 'greedy_schedule:make'")):
    r = subprocess.run(base + bad, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and needle in r.stderr.strip().splitlines()[-1], r.stderr


def test_the_persistent_compile_cache_is_on_by_default_and_off_by_flag(folder, tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env.update(XLA_FLAGS="", JAX_PLATFORMS="cpu", XDG_CACHE_HOME=str(tmp_path / "xdg"))
  base = [sys.executable, "-m", "dlm.main", "sample", f"--hf={folder}", "--prompt=w11 w12",
          "--sampler=llada", "--steps=2", "--max_new_tokens=4", "--num_samples=1"]
  r = subprocess.run(base, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
  assert r.returncode == 0, r.stderr
  assert list((tmp_path / "xdg" / "dlm" / "jax").iterdir())  # the default: ~/.cache/dlm/jax
  r = subprocess.run(base + [f"--compile_cache={tmp_path / 'mine'}"], capture_output=True,
                     text=True, env=env, cwd=ROOT, timeout=300)
  assert r.returncode == 0 and list((tmp_path / "mine").iterdir()), r.stderr
  env["XDG_CACHE_HOME"] = str(tmp_path / "other")
  r = subprocess.run(base + ["--compile_cache=off"], capture_output=True, text=True, env=env,
                     cwd=ROOT, timeout=300)
  assert r.returncode == 0 and not (tmp_path / "other").exists(), r.stderr


def test_a_change_of_the_model_ids_compiles_a_new_program(model):
  kw = dict(sampler="llada", steps=2, gen_length=4, confidence_eos_eot_inf=True)
  model.generate(PROMPT, **kw)
  before = len(model.__dict__["_jitted"])
  model.ids["eot"] = 252  # LLaDA's EoT in the fixtures: now part of the EOS/EoT flag
  try:
    model.generate(PROMPT, **kw)
    assert len(model.__dict__["_jitted"]) == before + 1
  finally:
    del model.ids["eot"]


@pytest.mark.parametrize("sampler,knobs", [
    ("llada", dict(steps=4, gen_length=8, block_length=4, temperature=0.0)),
    ("fast_dllm", dict(steps=4, gen_length=8, block_length=4, use_cache="dual", threshold=0.9)),
])
def test_prompt_buckets_share_one_program_and_keep_greedy_tokens(model, sampler, knobs):
  """prompt_bucket=8: prompts of 3 and 5 tokens run in one compiled loop, each row's tokens
  those of the prompt run unbucketed."""
  outs = []
  for p in (np.array([[11, 12, 13]]), np.array([[21, 22, 23, 24, 25]])):
    want = model.generate(p, sampler=sampler, **knobs)
    got = model.generate(p, sampler=sampler, prompt_bucket=8, **knobs)
    np.testing.assert_array_equal(got.sequences, want.sequences)
    np.testing.assert_array_equal(got.committed_at, want.committed_at)
    assert got.nfe == want.nfe and got.sequences.shape == (1, p.shape[1] + 8)
    outs.append(got)
  fn = engine.program(model, sampler, engine.resolve(sampler),
                      engine.check_knobs(sampler, engine.resolve(sampler), knobs), batch=1,
                      padded=True)
  sizes = {fn._cache_size()}
  model.generate(np.array([[1, 2, 3, 4, 5, 6, 7]]), sampler=sampler, prompt_bucket=8, **knobs)
  assert {fn._cache_size()} == sizes  # a third length in the same bucket: no new program
  with pytest.raises(UserError, match="prompt_bucket=-1 must be an integer >= 0"):
    model.generate(PROMPT, sampler=sampler, prompt_bucket=-1, **knobs)
