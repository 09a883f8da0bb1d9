"""Issue 15, `dlm sample`'s inputs: values, gap markers, prompts and chat templates are untrusted.

Each bad input ends in one line on stderr (exit 1 or 2) before anything is built; long runs batch
their work and show a progress bar.  Errors found before a model loads run `dlm.main.run` in this
process; runs that load a model or pass raw bytes on argv start `python -m dlm.main`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
import tracemalloc

import pytest
from absl import flags

from dlm import main
from dlm.data import hf_tokenizer
from dlm.errors import UserError
from dlm.sample import generate

ROOT = pathlib.Path(__file__).resolve().parents[1]
LLADA = ROOT / "tests" / "fixtures" / "llada-tiny"
CHAT = ("{% for m in messages %}w1 {{ m['content'] }} w2 {% endfor %}"
        "{% if add_generation_prompt %}w3{% endif %}")


def _word_tokenizer(folder: pathlib.Path, chat_template: str = CHAT) -> None:
  """A word-level tokenizer.json over llada-tiny's 256 ids (w0..w249, specials) and a template."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  vocab = {f"w{i}": i for i in range(250)}
  vocab.update({"<|mdm_mask|>": 250, "<|endoftext|>": 251, "<|eot_id|>": 252})
  vocab.update({f"x{i}": i for i in range(253, 256)})
  tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.decoder = decoders.WordPiece()
  tok.save(str(folder / "tokenizer.json"))
  (folder / "tokenizer_config.json").write_text(json.dumps(
      {"chat_template": chat_template, "eos_token": "<|endoftext|>"}))


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> pathlib.Path:
  d = tmp_path_factory.mktemp("untrusted-sample") / "llada"
  shutil.copytree(LLADA, d)
  _word_tokenizer(d)
  return d


def cli(*args: str) -> tuple[int, str, str]:
  """`dlm ARGS` in this process: (exit code, stdout, stderr); the flags it defined are removed."""
  before = set(flags.FLAGS)
  out, err = io.StringIO(), io.StringIO()
  code = 0
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      main.run(["dlm", *args])
  except SystemExit as e:
    code = e.code
  finally:
    for name in set(flags.FLAGS) - before:
      delattr(flags.FLAGS, name)
  return code, out.getvalue(), err.getvalue()


def dlm(*args: str | bytes) -> subprocess.CompletedProcess:
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "dlm.main", *args], capture_output=True, env=env,
                        cwd=ROOT, timeout=300)
  proc.stdout, proc.stderr = (proc.stdout.decode(errors="replace"),
                              proc.stderr.decode(errors="replace"))
  return proc


def one_line(stderr: str) -> str:
  lines = stderr.strip().splitlines()
  assert len(lines) == 1, stderr
  return lines[0]


BAD_VALUES = [
    ("--steps=0", "--steps=0"), ("--num_samples=0", "--num_samples=0"),
    ("--num_samples=-2", "--num_samples=-2"), ("--length=0", "--length=0"),
    ("--block_length=0", "--block_length=0"), ("--batch_size=0", "--batch_size=0"),
    ("--max_new_tokens=0", "--max_new_tokens=0"), ("--top_k=0", "--top_k=0"),
    ("--gap_length=-5", "--gap_length=-5"), ("--temperature=nan", "--temperature=nan"),
    ("--temperature=inf", "--temperature=inf"), ("--temperature=-1", "--temperature=-1"),
    ("--top_p=nan", "--top_p=nan"), ("--top_p=0", "--top_p=0"),
    ("--cfg_scale=nan", "--cfg_scale=nan"), ("--threshold=2", "--threshold=2"),
]


@pytest.mark.parametrize("arg,needle", BAD_VALUES)
def test_bad_values_are_one_line_errors_before_loading(hf, arg, needle):
  """`f.x or default` let 0 through to the default; -2 gave a traceback; nan an empty sample."""
  code, out, err = cli("sample", f"--hf={hf}", "--prompt=w4", arg)
  line = one_line(err)
  assert code == 1 and needle in line and ("integer >= 1" in line or "finite number" in line), line
  assert out == ""


def test_bad_gap_markers_are_named(hf):
  """`<gap:abc>` beside a valid gap stayed literal text; every `<gap` marker is now strict."""
  for marker in ("<gap:abc>", "<gap:0>", "<gap 5>", "<gap:-1>", "<gap=3>", "<gap:5"):
    code, _, err = cli("sample", f"--hf={hf}", f"--infill=w4 {marker} w5 <gap:4> w6")
    line = one_line(err)
    assert code == 1 and f"--infill marker '{marker}" in line and "<gap:N>" in line, line
  tok = hf_tokenizer.HFTokenizer(hf, mask_id=250)
  given, fixed = generate.build_template(tok, length=10, infill="w4 <gaps> <gap:2> w5 <gap>",
                                         gap_length=3)
  assert fixed.tolist() == [True, True, False, False, True, False, False, False, False, False]
  assert given[:2].tolist() == [4, 0] and given[4] == 5  # "<gaps>" is a word (here unknown: w0)
  with pytest.raises(UserError, match="gap_length=0"):
    generate.build_template(tok, length=10, infill="<gap>", gap_length=0)


def test_huge_gap_is_refused_before_anything_is_built(hf):
  """`<gap:150000000>` took 3.7 GB before its error; now nothing of its size is allocated."""
  tok = hf_tokenizer.HFTokenizer(hf, mask_id=250)
  tracemalloc.start()
  try:
    with pytest.raises(UserError, match="gaps ask for 150000004 tokens but the sequence is 64"):
      generate.build_template(tok, length=64, infill="w4 <gap:150000000> w5 <gap:4>")
    with pytest.raises(UserError, match="marker"):
      generate.build_template(tok, length=64, infill="<gap:" + "9" * 5000 + ">")
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert peak < 1_000_000, peak
  r = dlm("sample", f"--hf={hf}", "--infill=w4 <gap:150000000>", "--length=32", "--steps=2",
          "--sampler=ancestral")
  assert r.returncode == 1 and "raise --length" in one_line(r.stderr)
  r = dlm("sample", f"--hf={hf}", "--infill=w4 <gap:4>", "--steps=2")  # its default: llada
  assert r.returncode == 2 and "pass --sampler=ancestral" in one_line(r.stderr)


def test_non_utf8_prompt_is_one_line(hf):
  """Bytes on argv that are not UTF-8 reach Python as surrogates; encoding them raised."""
  r = dlm("sample", f"--hf={hf}".encode(), b"--prompt=w4 \xff\xfe w5")
  line = one_line(r.stderr)
  assert r.returncode == 1 and "--prompt is not UTF-8 text (byte 0xff at character 3)" in line
  code, _, err = cli("sample", f"--hf={hf}", "--infill=w4 \udcc3 <gap>")
  assert code == 1 and "--infill is not UTF-8 text" in one_line(err)


def test_tokenizer_files_linked_out_of_the_folder_are_refused(tmp_path):
  for name in ("tokenizer.json", "tokenizer_config.json"):
    folder = tmp_path / name / "llada"
    shutil.copytree(LLADA, folder)
    _word_tokenizer(folder)
    outside = tmp_path / name / "outside"
    os.replace(folder / name, outside)
    (folder / name).symlink_to(outside)
    with pytest.raises(UserError) as e:
      hf_tokenizer.HFTokenizer(folder)
    assert repr(name) in str(e.value) and f"resolves to {outside.resolve()}" in str(e.value)
  shutil.copytree(LLADA, tmp_path / "plain")
  _word_tokenizer(tmp_path / "plain")
  assert hf_tokenizer.HFTokenizer(tmp_path / "plain").encode("w5 w7") == [5, 7]


def test_chat_on_a_sentencepiece_model_is_one_line(tmp_path):
  """A dlm-trained (sentencepiece) tokenizer has no apply_chat_template: it was a traceback."""
  from dlm.data import tokenizer
  d = tmp_path / "sp"
  shutil.copytree(LLADA, d)
  text = ["def f(x):\n    return x + 1\n", "import os\nprint(os.getcwd())\n"] * 50
  tokenizer.train_tokenizer(text, d / "tokenizer.model", vocab_size=300)
  r = dlm("sample", f"--hf={d}", "--chat", "--prompt=hi", "--steps=2", "--length=8")
  line = one_line(r.stderr)
  assert r.returncode == 1 and "has no chat template" in line and "drop --chat" in line, line
  code, _, err = cli("sample", f"--hf={d}", "--chat", "--infill=<gap>")
  assert code == 2 and "drop --infill or --chat" in one_line(err)


HOSTILE = {
    "silent nested loops": ("{% for a in range(100000) %}{% for b in range(100000) %}"
                            "{% endfor %}{% endfor %}", "did not finish within 1 s"),
    "nested loops that print": ("{% for a in range(100000) %}{% for b in range(100000) %}xx"
                                "{% endfor %}{% endfor %}", "renders more than"),
    "a huge repeat": ("{{ 'x' * 10 ** 9 }}", "exceeds the limit"),
    "a huge width": ("{{ 'x'|center(10 ** 9) }}{{ '%999999999d' % 1 }}", "exceeds the limit"),
    "doubling by ~": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}"
                      "{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "exceeds the limit"),
    "a join product": ("{{ range(100000)|join('y' * 100000) }}", "exceeds the limit"),
    "an escape": ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "stopped by the sandbox"),
    "a mutation": ("{{ messages.append(1) }}", "stopped by the sandbox"),
    "a syntax error": ("{% for %}", "does not parse (line 1"),
    "an undefined name": ("{{ foo.bar }}", "UndefinedError"),
    "a division by zero": ("{{ 1 / 0 }}", "ZeroDivisionError"),
    "endless recursion": ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_chat_templates_stop_in_one_line(tmp_path, case):
  """The sandbox blocked escapes but bounded nothing: nested loops rendered forever."""
  template, needle = HOSTILE[case]
  _word_tokenizer(tmp_path, template)
  tok = hf_tokenizer.HFTokenizer(tmp_path, mask_id=250)
  t0 = time.monotonic()
  with pytest.raises(UserError) as e:
    tok.apply_chat_template([{"role": "user", "content": "w4"}], max_chars=100_000,
                            time_limit_s=1.0)
  assert time.monotonic() - t0 < 5
  msg = str(e.value)
  assert needle in msg and str(tmp_path / "tokenizer_config.json") in msg and "\n" not in msg, msg


def test_ordinary_chat_templates_still_render(tmp_path):
  llama = ("{% set loop_messages = messages %}{% for message in loop_messages %}"
           "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
           " + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
           "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
           "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
           "{% endif %}{{ ', '.join(['a', 'b']) ~ ('%3d' % 7) ~ 'x'.replace('x', 'y') * 2 }}")
  _word_tokenizer(tmp_path, llama)
  config = json.loads((tmp_path / "tokenizer_config.json").read_text())
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(config, bos_token="<s>")))
  tok = hf_tokenizer.HFTokenizer(tmp_path, mask_id=250)
  out = tok.apply_chat_template([{"role": "user", "content": " hi "}])
  assert out == ("<s><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\na, b  7yy")
  (tmp_path / "tokenizer_config.json").write_bytes(b'{"chat_template": "\xff"}')
  with pytest.raises(UserError, match="tokenizer_config.json is not UTF-8 text"):
    hf_tokenizer.HFTokenizer(tmp_path, mask_id=250)


def test_hostile_chat_template_on_the_cli(tmp_path):
  d = tmp_path / "hostile"
  shutil.copytree(LLADA, d)
  _word_tokenizer(d, HOSTILE["nested loops that print"][0])
  r = dlm("sample", f"--hf={d}", "--chat", "--prompt=w4", "--steps=2", "--length=8")
  line = one_line(r.stderr)
  assert r.returncode == 1 and "renders more than 1000000 characters" in line
  assert str(d / "tokenizer_config.json") in line and "drop --chat" in line


def _headers(stdout: str) -> list[str]:
  return re.findall(r"^===== sample (\d+) \((.*)\) =====$", stdout, re.M)


def test_ancestral_samples_run_in_batches_with_a_progress_bar(hf):
  """`--num_samples=100000` showed nothing for minutes: batches print as they finish."""
  r = dlm("sample", f"--hf={hf}", "--sampler=ancestral", "--prompt=w4 w5", "--num_samples=5",
          "--batch_size=2", "--steps=2", "--length=8", "--seed=3")
  assert r.returncode == 0, r.stderr
  heads = _headers(r.stdout)
  assert [int(i) for i, _ in heads] == [0, 1, 2, 3, 4], r.stdout
  bodies = r.stdout.split("=====\n")[1:]
  assert all(b.startswith("w4 w5") for b in bodies)
  assert "5/5" in r.stderr and "sample" in r.stderr  # the bar, on stderr only
  assert len(set(bodies)) > 1  # batches draw different randomness


def test_llada_samples_run_in_batches_with_a_progress_bar(hf):
  r = dlm("sample", f"--hf={hf}", "--sampler=llada", "--prompt=w4 w5", "--num_samples=3",
          "--batch_size=2", "--steps=2", "--max_new_tokens=4")
  assert r.returncode == 0, r.stderr
  heads = _headers(r.stdout)
  assert [int(i) for i, _ in heads] == [0, 1, 2] and all(h.startswith("llada, nfe ")
                                                         for _, h in heads), r.stdout
  assert "3/3" in r.stderr


def test_progress_batches_cover_every_sample_once():
  plan = list(generate.progress_batches(7, 3))
  assert plan == [(0, 0, 3), (1, 3, 3), (2, 6, 1)]
  assert list(generate.progress_batches(2, 16)) == [(0, 0, 2)]
  assert generate.batch_seed(5, 0) == 5
  assert len({generate.batch_seed(5, i) for i in range(50)}) == 50
