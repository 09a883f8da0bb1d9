"""lm-evaluation-harness (dlm/eval/harness.py): the `dlm` model on local tasks (no downloads) gives
exactly what model.log_likelihood and model.generate give when called directly; `dlm harness`
from the CLI; one-line errors."""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("lm_eval", reason="the eval extra: pip install -e '.[eval]'")

from dlm import api  # noqa: E402
from dlm.errors import UserError  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
MC = [{"question": "def add(a, b):\n    return", "choices": [" a + b", " None", " 42"], "label": 0},
      {"question": "import", "choices": [" os", " banana", " 7"], "label": 0},
      {"question": "for i in ", "choices": ["range(10):", "the house"], "label": 0}]
GEN = [{"prompt": "def f(x):\n    return", "answer": " x"},
       {"prompt": "import os\nimport", "answer": " sys"}]
LONG = "\n".join(f"def f{i}(x):\n    return x + {i}" for i in range(12))
ROLL = [{"text": "import os\n"}, {"text": LONG}]
ARGS = dict(sampler="llada", mc_num=8, batch_size=4, steps=4, gen_length=8, block_length=8,
            seed=3)


def _task(folder: pathlib.Path, name: str, rows: list[dict], body: str) -> None:
  data = folder / f"{name}.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in rows))
  (folder / f"{name}.yaml").write_text(
      f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
      f"test_split: test\n{body}")


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> pathlib.Path:
  d = tmp_path_factory.mktemp("tasks")
  _task(d, "dlm_mc", MC, 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: label\nmetric_list:\n  - metric: acc\n')
  _task(d, "dlm_gen", GEN, 'output_type: generate_until\ndoc_to_text: "{{prompt}}"\n'
        'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n"]\n'
        'metric_list:\n  - metric: exact_match\n')
  _task(d, "dlm_roll", ROLL, 'output_type: loglikelihood_rolling\ndoc_to_text: ""\n'
        'doc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n')
  return d


@pytest.fixture(scope="module")
def run(smoke_base, tasks):
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  from dlm.eval import harness
  out = harness.evaluate(dict(ARGS, pretrained=str(smoke_base)),
                         ["dlm_mc", "dlm_gen", "dlm_roll"], include_path=str(tasks))
  return out, api.from_pretrained(smoke_base)


def _split(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """LLaDA's _encode_pair: trailing spaces move to the continuation; it is what encoding the
  whole adds after the context."""
  n = len(context) - len(context.rstrip())
  if n:
    context, continuation = context[:-n], context[-n:] + continuation
  whole, ctx = tok.encode(context + continuation), tok.encode(context)
  return ctx, whole[len(ctx):]


def test_multiple_choice_scores_are_model_log_likelihood(run):
  out, model = run
  samples = out["samples"]["dlm_mc"]
  assert len(samples) == len(MC)
  correct = []
  for s in samples:
    got = [r[0] for r in s["resps"]]
    pairs = [_split(model.tokenizer, *a) for a in s["arguments"]]
    want = model.log_likelihood([p for p, _ in pairs], [a for _, a in pairs], num_samples=8,
                                batch_size=4, seed=3)
    assert [g[0] for g in got] == pytest.approx(list(want.log_likelihood), rel=1e-9)
    for (p, a), (_, greedy) in zip(pairs, got):  # LLaDA's suffix_greedy_prediction
      n = len(a)
      dec = model.generate(np.asarray([p]), sampler="llada", steps=n, gen_length=n,
                           block_length=n, temperature=0.0, seed=3).sequences[0, len(p):]
      assert greedy == bool(np.array_equal(dec, a))
    correct.append(float(np.argmax([g[0] for g in got]) == s["target"]))
  assert out["results"]["dlm_mc"]["acc,none"] == pytest.approx(np.mean(correct))


def test_generation_is_model_generate_cut_at_the_stop(run):
  out, model = run
  for s in out["samples"]["dlm_gen"]:
    context, kwargs = s["arguments"][0]
    gen = model.generate(np.asarray([model.tokenizer.encode(context)]), sampler="llada", steps=4,
                         gen_length=8, block_length=8, temperature=0.0, seed=3, prompt_bucket=16)
    text = model.tokenizer.decode(gen.token_ids[0]).split("\n")[0]
    assert kwargs["until"] == ["\n"] and s["filtered_resps"][0] == text


def test_rolling_log_likelihood_is_the_sum_over_lm_eval_windows(run):
  from lm_eval import utils as lm_utils
  out, model = run
  eos, limit = int(model.ids["eos"]), int(model.config.data.seq_len)
  for s, doc in zip(out["samples"]["dlm_roll"], ROLL):
    windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
        model.tokenizer.encode(doc["text"]), eos, limit - 1, 1)]
    want = model.log_likelihood([c for c, _ in windows], [a for _, a in windows], num_samples=8,
                                batch_size=4, seed=3).log_likelihood.sum()
    assert s["resps"][0][0] == pytest.approx(float(want), rel=1e-9)
    assert (len(windows) > 1) == (doc["text"] == LONG)  # the long one needs several windows
  assert math.isfinite(out["results"]["dlm_roll"]["word_perplexity,none"])


def test_results_carry_their_provenance(run):
  out, _ = run
  p = out["dlm"]
  assert p["sampler"] == "llada" and p["seed"] == 3 and p["knobs"]["steps"] == 4
  assert p["knobs"]["temperature"] == 0.0 and p["model_args"]["mc_num"] == 8
  assert p["precision"]["params"] == ["float32"] and "64-bit" in p["precision"]["sampling_noise"]
  assert p["model"]["step"] > 0 and p["code"]["jax"] and "time" in p


def test_cli_runs_the_same_evaluation(smoke_base, tasks, run, tmp_path):
  out_file = tmp_path / "results.json"
  args = ",".join(f"{k}={v}" for k, v in dict(ARGS, pretrained=smoke_base).items())
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu", HF_DATASETS_OFFLINE="1",
             HF_HUB_OFFLINE="1")
  r = subprocess.run([sys.executable, "-m", "dlm.main", "harness", f"--model_args={args}",
                      "--tasks=dlm_mc", f"--include_path={tasks}",
                      f"--output={out_file}"], capture_output=True, text=True, env=env, cwd=ROOT,
                     timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  last = json.loads(r.stdout.strip().splitlines()[-1])
  assert last["results"]["dlm_mc"] == run[0]["results"]["dlm_mc"]
  assert json.loads(out_file.read_text())["dlm"]["model_args"]["seed"] == 3
  again = subprocess.run([sys.executable, "-m", "dlm.main", "harness", f"--model_args={args}",
                          "--tasks=dlm_mc", f"--include_path={tasks}", f"--output={out_file}"],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  assert again.returncode == 2 and "never overwritten" in again.stderr


def test_bad_model_args_and_tasks_are_one_line(smoke_base, tasks):
  from dlm.eval import harness
  cases = [(dict(ARGS, pretrained=str(smoke_base), temprature=0.5),
            "lm_eval model arg 'temprature' is not one of dlm's"),
           (dict(ARGS, pretrained=str(smoke_base), mask_id=7), "mask_id=7 but this model's mask"),
           (dict(sampler="llada"), "needs --model_args=pretrained=DIR")]
  for args, match in cases:
    with pytest.raises(UserError, match=match) as e:
      harness.evaluate(args, ["dlm_mc"], include_path=str(tasks))
    assert "\n" not in str(e.value)
  with pytest.raises(UserError, match="unknown lm_eval task 'nope'"):
    harness.evaluate(dict(ARGS, pretrained=str(smoke_base)), ["nope"], include_path=str(tasks))
  with pytest.raises(UserError, match="is not key=value"):
    harness.parse_model_args("pretrained")


def test_is_greedy_is_true_for_the_models_own_greedy_answer(smoke_base):
  """LLaDA's suffix_greedy_prediction: the answer the model decodes one most-confident token
  per step is greedy; changing one of its tokens is not."""
  from dlm.eval import harness
  lm = harness.DLMEvalHarness(pretrained=str(smoke_base), **ARGS)
  prompt = lm.model.tokenizer.encode("def f(x):\n    return")
  n = 3
  dec = lm.model.generate(np.asarray([prompt]), sampler="llada", steps=n, gen_length=n,
                          block_length=n, temperature=0.0).sequences[0, len(prompt):].tolist()
  assert lm._is_greedy(prompt, dec) is True
  assert lm._is_greedy(prompt, dec[:-1] + [(dec[-1] + 1) % 500]) is False
