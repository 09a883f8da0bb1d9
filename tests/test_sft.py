"""Supervised fine-tuning (configs/sft.py): chat templates, response-only loss masks, packing,
the recipe from a dlm run and from a converted checkpoint, exact resume, one-line errors."""

from __future__ import annotations

import json
import pathlib
import shutil
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import recipes
from dlm import losses, processes
from dlm.data import chat, inputs, sft
from dlm.errors import UserError
from dlm.eval import elbo
from dlm.models import loader

ROOT = pathlib.Path(__file__).resolve().parents[1]
SFT_SMOKE = f"{ROOT}/configs/sft.py:smoke"


dlm = recipes.dlm


# ------------------------------------------------------------------- units --

CONV = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "6"}, {"role": "user", "content": "bye"}]


def test_turns_split_every_assistant_turn_and_drop_the_tail():
  parts = chat.turns(CONV, chat.plain, None)
  assert parts == [("System: be brief\nUser: 2+2?\nAssistant: ", False), ("4\n", True),
                   ("User: 3+3?\nAssistant: ", False), ("6\n", True)]
  assert "".join(t for t, _ in parts) == chat.plain(CONV[:5], False)


class CharTok:
  """One id per character (ord + 10), EOS 2: enough to check what the packer does."""
  eos_id, mask_id = 2, 3

  def encode(self, text):
    return [ord(c) + 10 for c in text]


def test_pack_keeps_conversations_whole_and_pads_with_scored_eos():
  tok = CharTok()
  convs = [sft.tokenize(m, chat.plain, tok, tok.eos_id) for m in (
      [{"role": "user", "content": "a"}, {"role": "assistant", "content": "bc"}],
      [{"role": "user", "content": "d"}, {"role": "assistant", "content": "e"}],
      [{"role": "user", "content": "x" * 40}, {"role": "assistant", "content": "y"}])]
  ids0, counted0 = convs[0]
  assert tok.eos_id == ids0[-1] and counted0[-1]
  prompt_len = len("User: a\nAssistant: ")
  assert not counted0[:prompt_len].any() and counted0[prompt_len:].all()  # "bc\n" + EOS
  rows, dropped = sft.pack(convs, seq_len=48, eos_id=tok.eos_id)
  assert dropped == 1  # the 40-character prompt does not fit
  n0, n1 = len(ids0), len(convs[1][0])
  assert rows["tokens"].shape == (1, 48)
  np.testing.assert_array_equal(rows["tokens"][0, :n0], ids0)
  np.testing.assert_array_equal(rows["segment_ids"][0], [1] * n0 + [2] * (48 - n0))
  np.testing.assert_array_equal(rows["positions"][0], list(range(n0)) + list(range(48 - n0)))
  tail = rows["tokens"][0, n0 + n1:]
  assert (tail == tok.eos_id).all() and rows["loss_mask"][0, n0 + n1:].all()
  np.testing.assert_array_equal(rows["loss_mask"][0, :n0], counted0)
  one_each, _ = sft.pack(convs[:2], seq_len=48, eos_id=tok.eos_id, packing=False)
  assert one_each["tokens"].shape == (2, 48) and set(one_each["segment_ids"][1]) == {1}


def _sft_batch(length: int = 16) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(0)
  tokens = rng.integers(5, 60, size=(8, length)).astype(np.int32)
  loss_mask = np.zeros((8, length), np.float32)
  for i in range(8):  # a prompt of 3..9 tokens, the rest response
    loss_mask[i, 3 + i % 7:] = 1
  return {"tokens": tokens, "loss_mask": loss_mask,
          "segment_ids": np.ones_like(tokens), "positions": np.tile(np.arange(length), (8, 1))}


@pytest.mark.parametrize("loss_name,process_name", [
    ("nelbo", "masked"), ("nelbo_count", "masked"), ("discrete_nelbo", "masked"),
    ("bd3_nelbo", "masked"), ("nelbo", "uniform")])
def test_the_losses_never_corrupt_the_prompt(loss_name, process_name):
  """What the denoiser sees: the prompt exactly, responses noised (LLaDA sec. 2.3)."""
  batch = _sft_batch()
  seen = []
  vocab = 64
  process = processes.make_process(ml_collections.ConfigDict(
      {"name": process_name, "schedule": {"name": "linear", "eps": 1e-4}}), vocab_size=vocab, mask_id=3)

  def model(params, x_t, t, **kw):
    seen.append(np.asarray(x_t))
    return jnp.zeros(x_t.shape + (vocab,), jnp.float32) + params, None

  cfg = {"antithetic": True, "num_steps": 10, "block_size": 4, "beta": 0.0, "omega": 1.0}
  for seed in range(4):
    loss, m = losses.get_loss(loss_name)(jnp.float32(0.0), batch, jax.random.key(seed),
                                         model=model, process=process, config=cfg)
    assert np.isfinite(float(loss)) and float(m["num_tokens"]) == batch["loss_mask"].sum()
  prompt = batch["loss_mask"] == 0
  changed = np.zeros_like(prompt)
  for x_t in seen:
    x_t = x_t[:, :16]  # bd3: the x_t half of x_t (+) x_0
    np.testing.assert_array_equal(x_t[prompt], batch["tokens"][prompt])
    changed |= x_t != batch["tokens"]
  assert changed[~prompt].mean() > 0.2  # responses were noised


def test_eval_scores_only_responses_and_their_bytes():
  batch = _sft_batch()
  rows = {k: v for k, v in batch.items()}
  vocab = 64
  process = processes.make_process(ml_collections.ConfigDict(
      {"name": "masked", "schedule": {"name": "linear", "eps": 1e-4}}), vocab_size=vocab, mask_id=3)

  def model(params, x_t, t, **kw):
    assert (np.asarray(x_t)[batch["loss_mask"][:x_t.shape[0]] == 0] != 3).all()
    return jnp.zeros(x_t.shape + (vocab,), jnp.float32), None

  import functools
  fn = functools.partial(elbo.eval_step, model=model, process=process)
  out = elbo.evaluate(fn, None, rows, batch_size=8, piece_bytes=np.ones(vocab, np.int64))
  assert out["num_tokens"] == batch["loss_mask"].sum() == out["num_bytes"]


def _cfg(tmp_path, **sft_overrides) -> ml_collections.ConfigDict:
  sys.path.insert(0, str(ROOT))
  try:
    from configs import sft as recipe  # noqa: PLC0415
  finally:
    sys.path.remove(str(ROOT))
  c = recipe.get_config("smoke")
  c.data.sft.update(sft_overrides)
  return c


def _jsonl(path: pathlib.Path, objs: list) -> pathlib.Path:
  path.write_text("".join(json.dumps(o) + "\n" for o in objs))
  return path


def test_bad_conversations_and_templates_get_one_line_errors(tmp_path):
  tok = CharTok()
  cases = [
      ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
      ({"prompt": "hi"}, "no assistant turn"),
      ({"messages": [{"role": "user"}]}, "string \"role\" and \"content\""),
      ({"text": "hi"}, "need \"messages\""),
  ]
  for i, (obj, msg) in enumerate(cases):
    f = _jsonl(tmp_path / f"bad{i}.jsonl", [{"prompt": "a", "response": "b"}, obj])
    with pytest.raises(UserError, match=msg) as e:
      sft.read_conversations(f)
    assert f"bad{i}.jsonl:2" in str(e.value) and "\n" not in str(e.value)
  (tmp_path / "junk.jsonl").write_text('{"prompt": "a", "response": "b"}\n{not json\n')
  with pytest.raises(UserError, match=r"junk.jsonl:2 is not JSON"):
    sft.read_conversations(tmp_path / "junk.jsonl")
  with pytest.raises(UserError, match="has no chat_template; set --config.data.sft.chat_template"):
    chat.turns(CONV, chat.resolve("tokenizer", tok), tok)
  with pytest.raises(UserError, match="unknown chat template 'nope'"):
    chat.resolve("nope", tok)
  rewriting = lambda messages, gen, tok: "X" * len(messages) + ("Y" if gen else "")
  with pytest.raises(UserError, match="does not render the conversation's turns as prefixes"):
    chat.turns(CONV, rewriting, tok)
  c = _cfg(tmp_path, train_files=str(tmp_path / "none*.jsonl"))
  with pytest.raises(UserError, match="matches no file"):
    sft.prepare(c.data, tok, tok.eos_id)


def test_a_chat_template_from_a_test_local_file(tmp_path, monkeypatch):
  (tmp_path / "my_template.py").write_text(textwrap.dedent("""
      def render(messages, add_generation_prompt, tokenizer):
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")
  """))
  monkeypatch.syspath_prepend(str(tmp_path))
  data = _jsonl(tmp_path / "chats.jsonl", [{"prompt": f"q{i}", "response": f"r{i}"}
                                           for i in range(40)])
  c = _cfg(tmp_path, train_files=str(data), chat_template="my_template:render", val_permille=200)
  out = sft.prepare(c.data, CharTok(), CharTok.eos_id)
  row = out.train_rows["tokens"][0]
  first = "".join(chr(i - 10) for i in row[:out.train_rows["segment_ids"][0].tolist().count(1)]
                  if i != CharTok.eos_id)
  assert first.startswith("<user>q") and "<assistant>r" in first
  assert out.meta["train_conversations"] + out.meta["val_conversations"] == 40


def test_embedded_default_is_stdlib_signatures_to_docstrings():
  text = textwrap.dedent('''
      def mean(data, *, weights=None) -> float:
          """Return the sample arithmetic mean of data.

          More words.
          """
      def _private():
          """Hidden."""
      class A:
          async def fetch(self, url):
              """Fetch url."""
  ''')
  got = sft.stdlib_conversations([text])
  assert [m[1]["content"] for m in got] == ["Return the sample arithmetic mean of data.",
                                            "Fetch url."]
  assert got[0][0]["content"] == sft.SIGNATURE_TASK + "def mean(data, *, weights=None) -> float:"
  assert got[1][0]["content"].endswith("async def fetch(self, url):")


# --------------------------------------------------------------- end to end --


@pytest.fixture(scope="module")
def runs(tmp_path_factory, smoke_base) -> dict[str, pathlib.Path]:
  """The quickstart :smoke base, and configs/sft.py:smoke fine-tuned from it (CLI)."""
  d = tmp_path_factory.mktemp("sft")
  r = dlm("train", f"--config={SFT_SMOKE}", f"--workdir={d / 'sft'}", f"--init_from={smoke_base}")
  assert "initialized parameters from" in r.stdout
  return {"base": smoke_base, "sft": d / "sft"}


def _eos_rate(workdir: pathlib.Path, prompts: list) -> float:
  """How often greedy LLaDA sampling of 16 tokens ends in EOS (one left-padded batch)."""
  m = loader.load(workdir)
  rows = [m.tokenizer.encode(chat.plain(messages, True)) for messages in prompts]
  width = max(map(len, rows))
  ids = np.array([[m.tokenizer.pad_id] * (width - len(r)) + r for r in rows])
  attention = np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows])
  out = m.generate(ids, attention, sampler="llada", steps=16, gen_length=16, block_length=16,
                   temperature=0.0)
  return float(np.mean(np.asarray(out.sequences)[:, width + 15] == m.tokenizer.eos_id))


def test_sft_lowers_the_response_loss_and_learns_to_stop(runs):
  base, tuned = runs["base"], runs["sft"]
  cfg = json.loads((tuned / "config.json").read_text())
  base_cfg = json.loads((base / "config.json").read_text())
  assert cfg["model"] == base_cfg["model"] and cfg["process"] == base_cfg["process"]  # inherited
  assert (tuned / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
  rows, meta = inputs.validation_rows(ml_collections.ConfigDict(cfg["data"]), tuned)
  assert meta["val_conversations"] > 0 and rows["loss_mask"].min() == 0  # prompts not counted
  scores = {}
  for name, wd in runs.items():
    m = loader.load(wd, ema=False)
    import functools
    fn = jax.jit(functools.partial(elbo.eval_step, model=m.apply, process=m.process))
    scores[name] = elbo.evaluate(fn, m.params, rows, batch_size=16,
                                 piece_bytes=m.tokenizer.piece_bytes())["nelbo_per_token"]
  assert scores["sft"] < 0.8 * scores["base"], scores
  prompts = [c[:1] for c, _ in sft.conversations(ml_collections.ConfigDict(cfg["data"]))[1][:6]]
  assert _eos_rate(tuned, prompts) > _eos_rate(base, prompts)
  out = json.loads(dlm("eval", f"--workdir={tuned}").stdout.strip().splitlines()[-1])
  assert out["rows"] == len(rows["tokens"]) and np.isfinite(out["bits_per_byte"])
  r = dlm("sample", f"--workdir={tuned}", "--chat", "--prompt=def f(x):", "--max_new_tokens=8",
          "--sampler=llada", "--num_samples=1", "--steps=8")
  assert "User: def f(x):\nAssistant: " in r.stdout


def _hf_with_chat_tokenizer(tmp_path: pathlib.Path) -> pathlib.Path:
  """llada-tiny with a word-level tokenizer.json and a prefix-consistent chat template."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  d = tmp_path / "llada-chat"
  shutil.copytree(ROOT / "tests" / "fixtures" / "llada-tiny", d)
  vocab = {f"w{i}": i for i in range(250)}
  vocab.update({"<|mdm_mask|>": 250, "<|endoftext|>": 251, "<|eot_id|>": 252})
  vocab.update({f"x{i}": i for i in range(253, 256)})
  tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  tok.decoder = decoders.WordPiece()
  tok.save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(json.dumps({
      "chat_template": "{% for m in messages %}w1 {{ 'w4' if m['role'] == 'assistant' else 'w3' }}"
                       " {{ m['content'] }} w2 {% endfor %}"
                       "{% if add_generation_prompt %}w1 w4 {% endif %}",
      "eos_token": "<|endoftext|>"}))
  return d


def test_sft_of_a_converted_checkpoint_with_its_chat_template(tmp_path):
  src = _hf_with_chat_tokenizer(tmp_path)
  dlm("convert", "--from=llada", f"--src={src}", f"--workdir={tmp_path / 'conv'}")
  rng = np.random.default_rng(0)
  convs = [{"prompt": " ".join(f"w{i}" for i in rng.integers(10, 100, 4)),
            "response": " ".join(f"w{i}" for i in rng.integers(100, 200, 3))} for _ in range(200)]
  data = _jsonl(tmp_path / "chats.jsonl", convs)
  wd = tmp_path / "tuned"
  dlm("train", f"--config={SFT_SMOKE}", f"--workdir={wd}", f"--init_from={tmp_path / 'conv'}",
      f"--config.data.sft.train_files={data}", "--config.data.seq_len=32",
      "--config.train.steps=6", "--config.train.batch_size=8", "--config.train.eval_every=6",
      "--config.train.checkpoint_every=6")
  cfg = json.loads((wd / "config.json").read_text())
  assert cfg["hf"]["family"] == "llada" and cfg["model"]["vocab_size"] == 256
  rows, _ = inputs.validation_rows(ml_collections.ConfigDict(cfg["data"]), wd,
                                   ids=cfg["hf"]["ids"])
  # "w1 w3 <prompt> w2 w1 w4" clean, then "<response> w2" and EOS (251) scored
  tokens, counted = rows["tokens"][0], rows["loss_mask"][0] > 0
  assert tokens[:2].tolist() == [1, 3] and not counted[:9].any()
  assert tokens[6:9].tolist() == [2, 1, 4] and counted[9:14].all()
  assert tokens[12:14].tolist() == [2, 251] and 100 <= tokens[9:12].min() <= tokens[9:12].max() < 200
  m = loader.load(wd)
  assert m.step == 6 and m.ids == cfg["hf"]["ids"]
  out = m.generate(np.array([[1, 5, 6, 2]]), sampler="llada", steps=4, gen_length=8,
                   block_length=8)
  assert out.sequences.shape == (1, 12)

