"""Dream `diffusion_generate` (maskgit_plus, topk_margin, entropy, origin; top-k) token for token."""

from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np
import pytest

import dlm
from dlm.errors import UserError
from dlm.sample import llada

FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "dream-tiny"
CASES = {c["name"]: c for c in json.loads((FIXTURE / "generate.json").read_text())["cases"]}


@pytest.fixture(scope="module")
def model():
  return dlm.from_pretrained(FIXTURE)


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference_diffusion_generate(model, name):
  check_case(model, CASES[name])


def test_stacked_layout_matches_reference_diffusion_generate(model):
  """The samplers' other parameter layout (GPU/TPU default; dlm/models/decode.py)."""
  check_case(dataclasses.replace(model, decode_layout=False),
             CASES["topk_margin_batch2_left_padded"])


def check_case(model, c) -> None:
  out = model.generate(np.array(c["prompt"]), c["attention_mask"], sampler="dream",
                       steps=c["steps"], max_new_tokens=c["max_new_tokens"], alg=c["alg"],
                       alg_temp=c["alg_temp"], eps=c["eps"], top_p=c["top_p"], top_k=c["top_k"],
                       temperature=c.get("temperature") or 0.0)
  np.testing.assert_array_equal(out.sequences, np.array(c["expected"]))
  assert out.nfe == c["nfe"]
  if c["alg"] != "origin":
    assert llada.unmasked_per_step(out.committed_at, c["steps"]) == c["unmasked_per_step"]


def test_unknown_alg_is_a_one_line_error(model):
  with pytest.raises(UserError, match="alg='best' unknown"):
    model.generate(np.array([[5, 6]]), sampler="dream", steps=2, max_new_tokens=2, alg="best")
