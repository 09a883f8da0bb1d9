"""AR -> diffusion adaptation (configs/adapt.py): DiffuLLaMA's annealed attention mask reaches
bidirectional at the configured step, and an imported Llama trains and samples as a masked
diffusion model (Dream's shifted logits)."""

from __future__ import annotations

import json
import pathlib
import shutil
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import recipes
from dlm.data import corpora
from dlm.models import attention, loader, transformer

ROOT = pathlib.Path(__file__).resolve().parents[1]
ADAPT_SMOKE = f"{ROOT}/configs/adapt.py:smoke"


dlm = recipes.dlm


def test_annealed_mask_goes_from_causal_to_bidirectional_at_anneal_steps():
  n, length = 100, 64
  causal = np.tril(np.ones((length, length), bool))
  upper = ~causal
  np.testing.assert_array_equal(attention.annealed_visible(jnp.int32(0), n, length), causal)
  for step in (25, 50, 75):
    vis = np.asarray(attention.annealed_visible(jnp.int32(step), n, length))
    assert vis[causal].all()  # never less than causal
    assert abs(vis[upper].mean() - step / n) < 0.03  # each later key w.p. step / anneal_steps
  for step in (n, n + 1, 10 * n):
    assert np.asarray(attention.annealed_visible(jnp.int32(step), n, length)).all()
  a, b = (np.asarray(attention.annealed_visible(jnp.int32(s), n, length)) for s in (40, 41))
  assert (a != b).any()  # a fresh draw every step


def test_annealed_model_is_causal_at_step_0_and_bidirectional_after():
  kw = dict(vocab_size=32, d_model=32, num_layers=2, num_heads=4, mlp_dim=64, shift_logits=True)
  cfg = transformer.ModelConfig(mask_kind="annealed", anneal_steps=10, **kw)
  params = nnx.to_pure_dict(nnx.state(transformer.init_model(cfg, 0)))
  x = jnp.asarray(np.random.default_rng(0).integers(0, 32, (2, 12)))
  run = lambda c, **k: np.asarray(transformer.apply_fn(transformer.param_logical_specs(c)[0])(
      params, x, None, **k)[0])
  causal = run(transformer.ModelConfig(mask_kind="causal", **kw))
  bidir = run(transformer.ModelConfig(mask_kind="bidirectional", **kw))
  np.testing.assert_allclose(run(cfg, step=jnp.int32(0)), causal, atol=1e-6)
  np.testing.assert_allclose(run(cfg, step=jnp.int32(10)), bidir, atol=1e-6)
  np.testing.assert_allclose(run(cfg), bidir, atol=1e-6)  # sampling: annealing is over
  mid = run(cfg, step=jnp.int32(5))
  assert np.abs(mid - causal).max() > 1e-4 and np.abs(mid - bidir).max() > 1e-4


def _llama_with_tokenizer(tmp_path: pathlib.Path) -> pathlib.Path:
  """llama-tiny (vocab 256, EOS 251, BOS 252) with a 253-entry BPE trained on stdlib text: ids
  253..255 are never produced, so the adaptation's mask id (255) is free."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  d = tmp_path / "llama"
  shutil.copytree(ROOT / "tests" / "fixtures" / "llama-tiny", d)
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Metaspace()
  tok.decoder = decoders.Metaspace()
  texts = corpora.load_corpus("stdlib", val_permille=50).train[:40]
  tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=250, special_tokens=["<unk>"],
                                                     limit_alphabet=100, show_progress=False))
  assert tok.get_vocab_size() == 250
  tok.add_special_tokens(["<pad>", "<|endoftext|>", "<|begin_of_text|>"])
  tok.save(str(d / "tokenizer.json"))
  (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
  return d


def test_dream_variant_keeps_the_shift_with_bidirectional_attention():
  sys.path.insert(0, str(ROOT))
  try:
    from configs import adapt  # noqa: PLC0415
  finally:
    sys.path.remove(str(ROOT))
  c = adapt.get_config("dream")
  assert (c.model.mask_kind, c.model.shift_logits, c.process.name) == ("bidirectional", True,
                                                                        "masked")
  assert "mask_kind" in c.init.keep_model_fields and c.init.mask_id == -1
  with pytest.raises(ValueError, match="dream or diffullama, not both"):
    adapt.get_config("dream,diffullama")


def test_an_imported_llama_adapts_trains_and_samples(tmp_path, variant="diffullama"):
  src = _llama_with_tokenizer(tmp_path)
  dlm("convert", "--from=llama", f"--src={src}", f"--workdir={tmp_path / 'ar'}")
  wd = tmp_path / "adapted"
  r = dlm("train", f"--config={ADAPT_SMOKE},{variant}", f"--workdir={wd}",
          f"--init_from={tmp_path / 'ar'}", "--config.train.steps=12",
          "--config.train.eval_every=12", "--config.train.checkpoint_every=12")
  assert "initialized parameters from" in r.stdout
  cfg = json.loads((wd / "config.json").read_text())
  assert cfg["process"]["name"] == "masked" and cfg["model"]["shift_logits"] is True
  assert cfg["model"]["mask_kind"] == ("annealed" if variant == "diffullama" else "bidirectional")
  assert cfg["model"]["num_layers"] == 2 and cfg["hf"]["family"] == "llama"
  assert cfg["hf"]["ids"]["mask"] == 255 and cfg["hf"]["ids"]["eos"] == 251
  metrics = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
  assert any("val_bits_per_byte" in m for m in metrics)
  m = loader.load(wd)
  assert m.process.mask_id == 255
  out = m.generate(np.array([m.tokenizer.encode("def f(x):")]), sampler="llada", steps=8,
                   gen_length=8, block_length=8)
  assert out.sequences.shape[1] == len(m.tokenizer.encode("def f(x):")) + 8
  assert (out.sequences != 255).all()  # every mask filled
  from dlm.sample import engine
  out = engine.sample(m, np.full((1, 16), 255), np.zeros((1, 16), bool), sampler="ancestral",
                      steps=4)  # unconditional: every position from the mask
  assert (np.asarray(out.sequences) != 255).all()


def test_adaptation_resumes_exactly_after_sigkill_while_annealing(tmp_path):
  recipes.killed_then_resumed_is_exact(  # anneal_steps 20 > 16 steps: every step its own mask
      [f"--config={ADAPT_SMOKE},diffullama", "--config.train.steps=16",
       "--config.train.checkpoint_every=2", "--config.train.log_every=2",
       "--config.train.eval_every=100", "--config.data.tokenizer_max_chars=200000"], tmp_path, 16, seed_data=True)
