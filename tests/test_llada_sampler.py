"""LLaDA `generate` (confidence remasking, blocks, CFG, EOS flags) token for token against the fixtures."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import pytest

import dlm
from dlm.errors import UserError
from dlm.sample import llada

FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "llada-tiny"
DATA = json.loads((FIXTURE / "generate.json").read_text())
CASES = {c["name"]: c for c in DATA["cases"]}


@pytest.fixture(scope="module")
def model():
  m = dlm.from_pretrained(FIXTURE)
  m.ids["eot"] = DATA["eot_token_id"]
  return m


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference_generate(model, name):
  check_case(model, CASES[name])


@pytest.mark.parametrize("name", ["cfg_1.0", "batch2_left_padded"])
def test_stacked_layout_matches_reference_generate(model, name):
  """The samplers' other parameter layout (GPU/TPU default; dlm/models/decode.py)."""
  stacked = dataclasses.replace(model, decode_layout=False)
  assert stacked.sampling[1] is stacked.apply and model.sampling[1] is not model.apply
  check_case(stacked, CASES[name])


def check_case(model, c) -> None:
  # every knob of the reference passed explicitly, its defaults included
  out = model.generate(np.array(c["prompt"]), c["attention_mask"], sampler="llada",
                       steps=c["steps"], gen_length=c["gen_length"],
                       block_length=c["block_length"], temperature=0.0, cfg_scale=c["cfg_scale"],
                       remasking="low_confidence", logits_eos_inf=c["logits_eos_inf"],
                       confidence_eos_eot_inf=c["confidence_eos_eot_inf"])
  np.testing.assert_array_equal(out.sequences, np.array(c["expected"]))
  assert out.nfe == c["nfe"]
  per_step = llada.unmasked_per_step(out.committed_at, c["steps"])
  ref = c["unmasked_per_nfe"]
  ref = [r if r and isinstance(r[0], list) else [r] for r in ref]  # batch-1 cases list positions
  assert per_step == ref


def test_bad_knobs_are_one_line_errors():
  for kw, needle in [(dict(steps=8, gen_length=10, block_length=4), "does not divide"),
                     (dict(steps=5, gen_length=16, block_length=4), "not divisible by the 4 blocks"),
                     (dict(steps=4, gen_length=8, block_length=4, remasking="best"), "unknown")]:
    with pytest.raises(UserError, match=needle):
      llada.check_knobs(kw["steps"], kw["gen_length"], kw["block_length"],
                        kw.get("remasking", "low_confidence"))


@pytest.mark.parametrize("sampler,knobs", [
    ("llada", dict(steps=8, gen_length=16, block_length=8)),
    ("dream", dict(steps=8, max_new_tokens=16, alg="entropy")),
])
def test_mixed_length_batch_equals_one_prompt_at_a_time(sampler, knobs):
  family = "llada" if sampler == "llada" else "dream"
  m = dlm.from_pretrained(FIXTURE.parent / f"{family}-tiny")
  a, b = [11, 12, 13, 14, 15, 16], [21, 22, 23]
  pad = m.ids["pad"]
  batch = np.array([a, [pad] * 3 + b])
  mask = np.array([[1] * 6, [0] * 3 + [1] * 3])
  out = m.generate(batch, mask, sampler=sampler, **knobs)
  one_a = m.generate(np.array([a]), sampler=sampler, **knobs)
  one_b = m.generate(np.array([b]), sampler=sampler, **knobs)
  np.testing.assert_array_equal(out.sequences[0], one_a.sequences[0])
  np.testing.assert_array_equal(out.sequences[1, 3:], one_b.sequences[0])
  assert out.nfe == one_a.nfe == knobs["steps"]


def test_unknown_sampler_name():
  m = dlm.from_pretrained(FIXTURE)
  with pytest.raises(UserError, match="unknown sampler 'magic'"):
    m.generate(np.array([[5, 6]]), sampler="magic")


def test_descending_rank_is_a_stable_descending_sort():
  rng = np.random.default_rng(0)
  conf = rng.integers(0, 5, (3, 40)).astype(np.float32)  # many ties
  conf[0, :7] = -np.inf
  want = np.argsort(np.argsort(-conf, axis=1, kind="stable"), axis=1)
  np.testing.assert_array_equal(np.asarray(llada.descending_rank(conf)), want)
