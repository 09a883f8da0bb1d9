"""Autoregressive models: Llama / Qwen2 import, exact NLL, and `ar` decoding with a KV cache.

Every folder of tests/fixtures (and of $DLM_FIXTURES, colon-separated) whose config.json is
a Llama or Qwen2 model is checked: logits against `transformers` 4.49 and every greedy
`generate` case token for token (README-ar.md), with the reference's knobs passed.
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

ROOT = pathlib.Path(__file__).resolve().parents[1]
DIRS = [ROOT / "tests" / "fixtures"] + [pathlib.Path(p) for p in
                                        os.environ.get("DLM_FIXTURES", "").split(":") if p]


def _ar_folders() -> list[pathlib.Path]:
  out = []
  for d in DIRS:
    for f in sorted(d.glob("*/config.json")):
      if json.loads(f.read_text()).get("model_type") in ("llama", "qwen2"):
        out.append(f.parent)
  return out


FOLDERS = _ar_folders()
CASES = [(f, c["name"]) for f in FOLDERS
         for c in json.loads((f / "generate.json").read_text())["cases"]]


@pytest.fixture(scope="module")
def models():
  return {f: dlm.from_pretrained(f) for f in FOLDERS}


def _case(folder: pathlib.Path, name: str) -> dict:
  return next(c for c in json.loads((folder / "generate.json").read_text())["cases"]
              if c["name"] == name)


def test_both_families_are_here():
  assert {json.loads((f / "config.json").read_text())["model_type"] for f in FOLDERS} >= {
      "llama", "qwen2"}


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda f: f.name)
def test_logits_match_transformers(models, folder):
  ref = np.load(folder / "logits.npz")
  m = models[folder]
  assert m.model_cfg.mask_kind == "causal" and m.model_cfg.shift_logits
  got = m.logits(ref["input_ids"], ref["attention_mask"])
  valid = ref["logits_valid"]
  np.testing.assert_allclose(got[valid], ref["logits"][valid], atol=2e-4, rtol=0)


@pytest.mark.parametrize("folder,name", CASES, ids=lambda v: getattr(v, "name", v))
def test_greedy_generate_matches_transformers(models, folder, name):
  """model.generate(sampler="ar", temperature=0.0, max_new_tokens, eos_token_id, pad_token_id)
  returns `transformers`' sequences: finished rows padded, cut when every row is done."""
  case = _case(folder, name)
  m = models[folder]
  out = m.generate(np.array(case["prompt"]), case["attention_mask"], sampler="ar",
                   temperature=0.0, max_new_tokens=case["max_new_tokens"],
                   eos_token_id=case["eos_token_id"], pad_token_id=case["pad_token_id"])
  np.testing.assert_array_equal(out.sequences, np.array(case["expected"]))
  assert out.nfe == case["n_generated"]


@pytest.mark.parametrize("name", ["batch_left_padded", "eos_some_rows"])
def test_without_cache_and_in_stacked_layout_the_same_tokens(models, name):
  """use_cache=False recomputes the whole prefix each call; the stacked (GPU/TPU) layout."""
  import dataclasses
  folder = FOLDERS[0]
  case = _case(folder, name)
  kw = dict(sampler="ar", temperature=0.0, max_new_tokens=case["max_new_tokens"],
            eos_token_id=case["eos_token_id"], pad_token_id=case["pad_token_id"])
  m = models[folder]
  for model, extra in ((m, dict(use_cache=False)),
                       (dataclasses.replace(m, decode_layout=False), {})):
    out = model.generate(np.array(case["prompt"]), case["attention_mask"], **kw, **extra)
    np.testing.assert_array_equal(out.sequences, np.array(case["expected"]))


def test_sampling_with_cache_draws_what_recomputing_draws(models):
  """do_sample with temperature, top-k and top-p: the cache changes no draw (same keys)."""
  m = models[FOLDERS[0]]
  case = _case(FOLDERS[0], "batch_left_padded")
  kw = dict(sampler="ar", do_sample=True, temperature=0.8, top_k=20, top_p=0.9,
            max_new_tokens=12, eos_token_id=[], pad_token_id=251, seed=3)
  a = m.generate(np.array(case["prompt"]), case["attention_mask"], use_cache=True, **kw)
  b = m.generate(np.array(case["prompt"]), case["attention_mask"], use_cache=False, **kw)
  np.testing.assert_array_equal(a.sequences, b.sequences)
  c = m.generate(np.array(case["prompt"]), case["attention_mask"], use_cache=True,
                 **dict(kw, seed=4))
  assert not np.array_equal(a.sequences, c.sequences)
  greedy = m.generate(np.array(case["prompt"]), case["attention_mask"], sampler="ar",
                      max_new_tokens=12, eos_token_id=[], pad_token_id=251)
  assert not np.array_equal(a.sequences, greedy.sequences)


def test_the_nll_is_exact_on_the_reference_logits(models):
  """The autoregressive process's nelbo = sum_{l>=1} -log p(x_l | x_<l) from HF's logits."""
  import jax.numpy as jnp
  folder = FOLDERS[0]
  ref = np.load(folder / "logits.npz")
  m = models[folder]
  x = ref["input_ids"][:2]  # unpadded rows
  shifted = np.concatenate([ref["logits"][:2, :1], ref["logits"][:2, :-1]], axis=1)
  logp = ref["logits"][:2, :-1] - np.log(np.exp(ref["logits"][:2, :-1].astype(np.float64)).sum(
      -1, keepdims=True))
  want = -np.take_along_axis(logp, x[:, 1:, None], -1)[..., 0].sum(-1)
  t = jnp.full((2,), 0.5)
  got = m.process.nelbo(jnp.asarray(shifted), jnp.asarray(x), m.process.corrupt(None, jnp.asarray(x), t), t)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
  ours = m.process.nelbo(jnp.asarray(np.asarray(m.apply(m.params, jnp.asarray(x), None)[0])),
                         jnp.asarray(x), jnp.asarray(x), t)
  np.testing.assert_allclose(np.asarray(ours), want, rtol=1e-4)


def test_default_sampler_and_wrong_kinds_are_one_line(models):
  m = models[FOLDERS[0]]
  from dlm.sample import engine
  assert engine.default_sampler(m) == "ar"
  prompt = np.array([[5, 6, 7]])
  default = m.generate(prompt, max_new_tokens=4)
  np.testing.assert_array_equal(default.sequences,
                                m.generate(prompt, sampler="ar", max_new_tokens=4).sequences)
  with pytest.raises(UserError, match="this model is autoregressive .*use sampler='ar'") as e:
    m.generate(prompt, sampler="llada", steps=4, gen_length=4)
  assert "\n" not in str(e.value)
  llada = dlm.from_pretrained(ROOT / "tests" / "fixtures" / "llada-tiny")
  with pytest.raises(UserError, match="sampler 'ar' decodes autoregressive models"):
    llada.generate(prompt, sampler="ar", max_new_tokens=4)
  with pytest.raises(UserError, match="sampler 'ar' takes no knob 'steps'"):
    m.generate(prompt, sampler="ar", steps=4)
  with pytest.raises(UserError, match="eos_token_id=\\[999\\]"):
    m.generate(prompt, sampler="ar", eos_token_id=[999])


def test_convert_export_round_trip_and_the_wrong_family(tmp_path):
  """dlm convert --from=qwen2 makes a workdir that loads to the same logits; export writes
  a folder transformers' names read back bit-identically; --from=llada is one line."""
  from dlm.convert import workdir as convert_workdir
  folder = next(f for f in FOLDERS if json.loads((f / "config.json").read_text())[
      "model_type"] == "qwen2")
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-m", "dlm.main", "convert", "--from=llada",
                      f"--src={folder}", f"--workdir={tmp_path / 'w'}"], capture_output=True,
                     text=True, env=env, cwd=ROOT, timeout=300)
  assert r.returncode != 0 and "holds a qwen2 model; use --from=qwen2" in r.stderr.strip(
      ).splitlines()[-1], r.stderr
  assert not (tmp_path / "w").exists()
  convert_workdir.convert(folder, tmp_path / "w", expected="qwen2")
  ref = np.load(folder / "logits.npz")
  a = dlm.from_pretrained(folder)
  b = dlm.from_pretrained(tmp_path / "w")
  np.testing.assert_array_equal(a.logits(ref["input_ids"]), b.logits(ref["input_ids"]))
  out = convert_workdir.export(tmp_path / "w", tmp_path / "hf")
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["model_type"] == "qwen2" and cfg["architectures"] == ["Qwen2ForCausalLM"]
  c = dlm.from_pretrained(out)
  np.testing.assert_array_equal(c.logits(ref["input_ids"]), a.logits(ref["input_ids"]))


def test_unsupported_causal_configs_are_one_line(tmp_path):
  import shutil
  folder = next(f for f in FOLDERS if json.loads((f / "config.json").read_text())[
      "model_type"] == "llama")
  for key, value in (("rope_scaling", {"rope_type": "llama3", "factor": 8.0}),
                     ("attention_bias", True)):
    bad = tmp_path / key
    shutil.copytree(folder, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg[key] = value
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=f"{key}=.* is not supported for a llama model") as e:
      dlm.from_pretrained(bad)
    assert "\n" not in str(e.value)


def test_quickstart_ar_trains_samples_and_evaluates(tmp_path):
  """configs/quickstart.py:smoke,ar: the AR baseline through dlm train / sample / eval, each
  picking the model's own sampler (ar) and likelihood (the exact NLL) without extra flags."""
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  run = lambda *a: subprocess.run([sys.executable, "-m", "dlm.main", *a], capture_output=True,
                                  text=True, env=env, cwd=ROOT, timeout=600)
  w = tmp_path / "ar"
  r = run("train", "--config=configs/quickstart.py:smoke,ar", f"--workdir={w}")
  assert r.returncode == 0, r.stderr[-2000:]
  r = run("sample", f"--workdir={w}", "--prompt=def ", "--max_new_tokens=12", "--num_samples=2",
          "--temperature=0.8")
  assert r.returncode == 0, r.stderr[-2000:]
  heads = [l for l in r.stdout.splitlines() if l.startswith("===== sample ")]
  assert len(heads) == 2 and all("(ar, nfe " in h for h in heads)
  bodies = [b.split("=====\n", 1)[1] for b in r.stdout.split("===== sample ")[1:]]
  assert all(b.startswith("def ") for b in bodies)
  r = run("eval", f"--workdir={w}")
  assert r.returncode == 0, r.stderr[-2000:]
  result = json.loads(r.stdout.strip().splitlines()[-1])
  assert 0 < result["bits_per_byte"] < 8, result
  m = dlm.from_pretrained(w)
  assert m.model_cfg.mask_kind == "causal" and m.process.__class__.__name__ == (
      "AutoregressiveProcess")
  bad = run("sample", f"--workdir={w}", "--prompt=x", "--sampler=llada", "--steps=4")
  assert bad.returncode != 0 and "use sampler='ar'" in bad.stderr.strip().splitlines()[-1]
