"""Sample quality (dlm eval --samples, dlm/eval/samples.py): gen-ppl under an AR evaluator equals
the chain rule computed here, entropy and repetition by definition, the Gumbel precision knob,
tokenizer mismatches said plainly."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dlm import api
from dlm.errors import UserError
from dlm.eval import samples
from dlm.sample import categorical as cat

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _dlm(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "dlm.main", *args], capture_output=True,
                        text=True, env=env, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def evaluators(tmp_path_factory):
  """AR smoke runs: one with the diffusion smoke's tokenizer (same recipe data), one with
  another vocabulary."""
  d = tmp_path_factory.mktemp("ar_eval")
  for name, extra in (("same", []), ("other", ["--config.data.vocab_size=384"])):
    r = _dlm("train", "--config=configs/quickstart.py:smoke,ar", f"--workdir={d / name}", *extra)
    assert r.returncode == 0, r.stderr[-2000:]
  return d / "same", d / "other"


def test_entropy_and_repetition_by_definition():
  assert samples.entropy([]) == 0.0 and samples.entropy([5, 5, 5]) == 0.0
  assert samples.entropy([1, 2, 3, 4]) == pytest.approx(np.log(4))
  assert samples.entropy([1, 1, 2, 2]) == pytest.approx(np.log(2))
  assert samples.repetition([1, 2, 3]) == 0.0  # no 4-gram
  assert samples.repetition([1, 2, 3, 4, 1, 2, 3, 4]) == pytest.approx(1 / 5)  # 1 of 5 repeats
  assert samples.repetition([7] * 10) == pytest.approx(6 / 7)


def test_windows_score_every_token_once_within_the_context():
  tokens = list(range(3, 103))
  for limit in (8, 33, 64, 200):
    w = samples._windows(tokens, 1, limit)
    assert sum((s for _, s in w), []) == tokens
    assert all(len(c) + len(s) <= limit and c for c, s in w)
    assert all(c[-1] + 1 == s[0] for c, s in w[1:])  # each window's context ends where it starts


def test_gen_ppl_is_the_evaluators_chain_rule(evaluators):
  ev = api.from_pretrained(evaluators[0])
  rng = np.random.default_rng(0)
  seqs = [rng.integers(3, 500, n).tolist() for n in (5, 40, 150)]  # the last one needs windows
  ppl, per = samples.gen_ppl(ev, seqs + [[]])
  start = samples.start_token(ev)
  want = []
  for s in seqs[:2]:  # within the context: one pass
    x = jnp.asarray([[start] + s])
    logp = jax.nn.log_softmax(ev.apply(ev.params, x, None)[0][0], -1)
    want.append(-float(sum(logp[i, x[0, i]] for i in range(1, x.shape[1]))) / len(s))
  np.testing.assert_allclose(per[:2], want, rtol=1e-5)
  assert per[3] is None
  limit = int(ev.config.data.seq_len)  # the 150-token sample: the chain rule over its windows
  nll = 0.0
  for ctx, scored in samples._windows(seqs[2], start, limit):
    x = jnp.asarray([ctx + scored])
    logp = jax.nn.log_softmax(ev.apply(ev.params, x, None)[0][0], -1)
    nll -= float(sum(logp[i, x[0, i]] for i in range(len(ctx), x.shape[1])))
  np.testing.assert_allclose(per[2], nll / len(seqs[2]), rtol=1e-5)
  total = sum(p * len(s) for p, s in zip(per[:3], seqs))
  np.testing.assert_allclose(ppl, np.exp(total / sum(map(len, seqs))), rtol=1e-6)


def test_32_bit_noise_has_the_float32_tail():
  """gumbel_bits=32 draws -log(-log u), u float32 in [0, 1): no value above
  -log(-log(1 - 2^-23)) ~ 15.94; the 64-bit draw's tail reaches past it (~44)."""
  key = jax.random.key(0)
  g32 = cat.gumbel(key, (1 << 20,), 32)
  assert float(jnp.max(jnp.where(jnp.isfinite(g32), g32, -jnp.inf))) <= 15.95
  top = cat.gumbel_from_uniform(jnp.float32(2.0 ** -64))
  assert float(top) > 40  # the smallest 64-bit uniform reaches the far tail
  g64 = cat.gumbel(key, (1 << 20,), 64)
  for g in (g32, g64):  # both are Gumbel(0, 1) in the bulk: mean ~ Euler's gamma
    assert abs(float(jnp.mean(jnp.where(jnp.isfinite(g), g, 0.0))) - 0.5772) < 0.01
  with pytest.raises(UserError, match="gumbel_bits=16 must be 64"):
    cat.check_bits(16)


def test_cli_samples_with_an_evaluator(smoke_base, evaluators, tmp_path):
  out = tmp_path / "samples.jsonl"
  r = _dlm("eval", f"--workdir={smoke_base}", "--samples=4", "--batch_size=4",
           f"--evaluator={evaluators[0]}", "--sampler=llada", "--knob=steps=8",
           "--knob=gen_length=16", "--knob=temperature=1.0", "--knob=gumbel_bits=32", "--seed=2",
           f"--output={out}")
  assert r.returncode == 0, r.stderr[-2000:]
  got = json.loads(r.stdout.strip().splitlines()[-1])
  assert got["samples"] == 4 and got["nfe"] == 8 and got["tokens_per_s"] > 0
  assert got["evaluator"]["retokenized"] is False and 1 < got["gen_ppl"] < 1e4
  assert got["dlm"]["knobs"]["gumbel_bits"] == 32 and got["dlm"]["seed"] == 2
  assert "float32 uniform" in got["dlm"]["precision"]["sampling_noise"]
  rows = [json.loads(l) for l in out.read_text().splitlines()]
  assert len(rows) == 4 and all(len(x["token_ids"]) <= 16 for x in rows)
  np.testing.assert_allclose(np.mean([x["entropy"] for x in rows]), got["entropy"])
  scored = [x for x in rows if x["token_ids"]]
  pooled = np.exp(sum(x["nll_per_token"] * len(x["token_ids"]) for x in scored)
                  / sum(len(x["token_ids"]) for x in scored))
  np.testing.assert_allclose(pooled, got["gen_ppl"], rtol=1e-6)


def test_another_tokenizer_is_refused_or_retokenized_as_asked(smoke_base, evaluators):
  model = api.from_pretrained(smoke_base)
  other = api.from_pretrained(evaluators[1])
  kw = dict(sampler="llada", knobs={"steps": 4, "gen_length": 8}, batch_size=2)
  with pytest.raises(UserError, match="evaluator's tokenizer differs .* pass --retokenize") as e:
    samples.evaluate(model, 2, evaluator=other, **kw)
  assert "\n" not in str(e.value)
  summary, rows = samples.evaluate(model, 2, evaluator=other, retokenize=True, **kw)
  assert summary["evaluator"]["retokenized"] is True and summary["gen_ppl"] > 1
  with pytest.raises(UserError, match="the evaluator must be an autoregressive model"):
    samples.evaluate(model, 2, evaluator=model, **kw)
  r = _dlm("eval", f"--workdir={smoke_base}", "--knob=steps=4")
  assert r.returncode == 2 and "--knob applies to --samples=N" in r.stderr


def test_frontier_writes_points_and_picture(smoke_base, evaluators, tmp_path):
  from dlm.eval import frontier
  out = tmp_path / "fr.jsonl"
  args = ["eval", f"--workdir={smoke_base}", f"--evaluator={evaluators[0]}", "--sampler=llada",
          "--knob=gen_length=16", "--knob=temperature=1.0", "--samples=2", "--batch_size=2",
          f"--output={out}"]
  r = _dlm(*args, "--frontier=steps=4,16")
  assert r.returncode == 0, r.stderr[-2000:]
  points = [json.loads(l) for l in out.read_text().splitlines()]
  assert [p["sweep"] for p in points] == [{"steps": 4}, {"steps": 16}]
  assert [p["nfe"] for p in points] == [4, 16] and all("dlm" in p for p in points)
  assert all(p["gen_ppl"] > 1 and p["tokens_per_s"] > 0 for p in points)
  assert [p["pareto"] for p in points] == frontier.pareto(points) and any(frontier.pareto(points))
  png = out.with_suffix(".png")
  assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 10_000
  again = _dlm(*args, "--frontier=steps=4")
  assert again.returncode == 2 and "never overwritten" in again.stderr


def test_frontier_grid_and_its_errors(smoke_base):
  from dlm.eval import frontier
  from dlm.sample import engine
  knobs = engine.resolve("llada").knobs
  grid = frontier.parse_grid(["steps=4,16", "remasking=low_confidence,random"], knobs, "llada",
                             lambda v: int(v) if v.isdigit() else v)
  assert grid == [{"steps": 4, "remasking": "low_confidence"}, {"steps": 4, "remasking": "random"},
                  {"steps": 16, "remasking": "low_confidence"},
                  {"steps": 16, "remasking": "random"}]
  for specs, msg in ((["stepz=4"], "has no knob 'stepz'"), (["steps"], "write KNOB=V1,V2"),
                     (["steps=4", "steps=8"], "names 'steps' twice"), ([], "at least one")):
    with pytest.raises(UserError, match=msg) as e:
      frontier.parse_grid(specs, knobs, "llada", str)
    assert "\n" not in str(e.value)
  with pytest.raises(UserError, match="give --evaluator"):
    frontier.sweep(api.from_pretrained(smoke_base), None, grid, sampler="llada", knobs={},
                   num_samples=2, seed=0, batch_size=2, retokenize=False, path=None,
                   evaluator_path=None)


def test_pareto_flags():
  from dlm.eval import frontier
  pts = [{"tokens_per_s": 10, "gen_ppl": 50}, {"tokens_per_s": 20, "gen_ppl": 60},
         {"tokens_per_s": 5, "gen_ppl": 70}, {"tokens_per_s": 20, "gen_ppl": 55}]
  assert frontier.pareto(pts) == [True, False, False, True]
