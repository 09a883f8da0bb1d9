"""Continuous batching on the one engine (engine.slot_programs): a request started in a slot
mid-way through the others' runs gets exactly the tokens and nfe of running alone, for every
prompt sampler (llada sharded over a 2x2x2 mesh: slots over data, weights over fsdp x tensor)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from test_sharded_sample import MASK, _model as sharded_model

from dlm.models import loader
from dlm.sample import engine

WIDTH, SLOTS = 8, 4


def _model(shift: bool, mesh: dict | None = None) -> loader.DiffusionLM:
  """test_sharded_sample's confident tiny model, placed on ``mesh``."""
  m = sharded_model(shift)
  return loader.shard(m, mesh) if mesh else m


CASES = {  # sampler -> (shifted model, knobs)
    "llada": (False, dict(steps=8, gen_length=8, block_length=4, temperature=0.7)),
    "fast_dllm": (False, dict(steps=8, gen_length=8, block_length=4, threshold=0.9,
                              use_cache="dual")),
    "dream": (True, dict(steps=4, max_new_tokens=8, alg="entropy", temperature=0.5)),
}


def _serve(model, name, knobs, prompts):
  """Six requests through 4 slots, two of them admitted while the others are mid-way."""
  make = engine.resolve(name)
  full = engine.check_knobs(name, make, knobs)
  gen = full[make.length]
  empty, admit, advance = engine.slot_programs(model, name, make, full, slots=SLOTS,
                                               width=WIDTH, padded=True)
  params = model.sampling_params()
  total = WIDTH + gen
  states = empty(params, np.full((SLOTS, total), MASK, np.int32), np.zeros((SLOTS, total), bool),
                 np.ones((SLOTS, total), np.int32))
  queue, slot_of, out, tick = list(range(len(prompts))), [None] * SLOTS, {}, 0
  while queue or any(s is not None for s in slot_of):
    for j in range(SLOTS):
      # a new request every other tick: slots start at different points of the others' runs
      if slot_of[j] is None and queue and (tick % 2 == 0 or tick == 0):
        r = queue.pop(0)
        p, am, _ = engine.bucket_prompts(prompts[r][None], None, WIDTH, engine.pad_id(model))
        g, f, a = engine.prompt_template(p, am, gen, engine.blank_id(model))
        states = admit(params, states, np.int32(j), jax.random.key(100 + r), g[0], f[0], a[0])
        slot_of[j] = r
    states, x, _, done, nfe = advance(params, states, np.array([s is not None for s in slot_of]))
    tick += 1
    for j in range(SLOTS):
      if slot_of[j] is not None and bool(done[j]):
        out[slot_of[j]] = (np.asarray(x[j]), int(nfe[j]))
        slot_of[j] = None
  return out


@pytest.mark.parametrize("name, mesh", [("llada", {"data": 2, "fsdp": 2, "tensor": 2}),
                                        ("fast_dllm", None), ("dream", None)])
def test_a_slot_equals_its_request_alone(name, mesh):
  shift, knobs = CASES[name]
  rng = np.random.default_rng(0)
  prompts = [rng.integers(3, 58, n).astype(np.int32) for n in (8, 5, 3, 8, 6, 2)]
  alone = _model(shift)
  want = [alone.generate(p[None], sampler=name, seed=100 + i, prompt_bucket=WIDTH, **knobs)
          for i, p in enumerate(prompts)]
  got = _serve(_model(shift, mesh), name, knobs, prompts)
  for i, (p, w) in enumerate(zip(prompts, want)):
    x, nfe = got[i]
    np.testing.assert_array_equal(x[WIDTH - len(p):], w.sequences[0], err_msg=f"{name} {i}")
    assert nfe == w.nfe
