"""LoRA (dlm/models/lora.py): the low-rank path against the merged kernels, adapter-only
training and checkpoints on a frozen base, merged export, unmerged sampling, one-line errors."""

from __future__ import annotations

import json
import pathlib

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

import dlm
import recipes
from dlm.errors import UserError
from dlm.models import decode, loader, lora, transformer

ROOT = pathlib.Path(__file__).resolve().parents[1]
LORA_SMOKE = f"{ROOT}/configs/sft.py:smoke,lora"


dlm_cli = recipes.dlm


def _model(**kw) -> tuple[transformer.ModelConfig, dict]:
  cfg = transformer.ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4,
                                num_kv_heads=2, mlp_dim=64, qkv_bias=True, lora_rank=4,
                                lora_alpha=8.0, lora_targets=lora.TARGETS, **kw)
  return cfg, jax.jit(lambda: nnx.to_pure_dict(nnx.state(transformer.init_model(cfg, 0))))()


@pytest.mark.parametrize("scan_layers", [True, False])
def test_low_rank_path_equals_merged_kernels_in_every_layout(scan_layers):
  cfg, params = _model(scan_layers=scan_layers)
  base, adapters = lora.split(params)
  assert lora.combine(base, adapters).keys() == params.keys()
  names = [p[-1].key for p, _ in jax.tree_util.tree_flatten_with_path(adapters)[0]]
  assert len(names) == 2 * len(lora.TARGETS) and all(n.endswith(lora.SUFFIXES) for n in names)
  x = np.random.default_rng(0).integers(0, 64, (2, 12))
  plain = transformer.ModelConfig(**{**cfg.__dict__, "lora_rank": 0, "lora_alpha": 0.0,
                                     "lora_targets": ()})
  apply_plain = jax.jit(transformer.apply_fn(transformer.param_logical_specs(plain)[0]))
  apply = jax.jit(transformer.apply_fn(transformer.param_logical_specs(cfg)[0]))
  # B = 0 at init: the adapted model is the base exactly
  np.testing.assert_array_equal(apply(params, x)[0], apply_plain(base, x)[0])
  keys = iter(jax.random.split(jax.random.key(1), 64))
  adapters = jax.tree.map(lambda a: 0.2 * jax.random.normal(next(keys), a.shape), adapters)
  params = lora.combine(base, adapters)
  unmerged = np.asarray(apply(params, x)[0])
  merged = np.asarray(apply_plain(lora.merge(params, cfg.lora_alpha / cfg.lora_rank), x)[0])
  assert np.abs(unmerged - np.asarray(apply_plain(base, x)[0])).max() > 0.1  # adapters matter
  np.testing.assert_allclose(unmerged, merged, atol=1e-5)
  prepare, dapply = decode.for_sampling(cfg, apply, True)  # fused kernels, adapters folded in
  np.testing.assert_allclose(np.asarray(jax.jit(dapply)(prepare(params), x)[0]), unmerged,
                             atol=1e-5)


def test_bad_lora_configs_get_one_line_errors():
  for lc, msg in (({"rank": 4, "targets": "wq,w_qkv"}, "lora.targets names \\['w_qkv'\\]: no such"
                   " parameter; the projections are wq, wk"),
                  ({"rank": -1}, "lora.rank=-1 must be >= 1")):
    with pytest.raises(UserError, match=msg):
      lora.settings(ml_collections.ConfigDict({"lora": lc}))
  assert lora.settings(ml_collections.ConfigDict({"lora": {"rank": 0}})) == {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, smoke_base) -> dict[str, pathlib.Path]:
  d = tmp_path_factory.mktemp("lora")
  r = dlm_cli("train", f"--config={LORA_SMOKE}", f"--workdir={d / 'lora'}",
              f"--init_from={smoke_base}", "--config.lora.rank=2", "--config.train.steps=30")
  assert "LoRA adapters (rank 2, alpha 16)" in r.stdout
  return {"base": smoke_base, "lora": d / "lora", "root": d}


def test_adapter_only_checkpoints_on_a_frozen_base(runs):
  import test_resilience as res
  step, state, _ = res.saved(runs["lora"])
  assert step == 30
  names = [p[-1].key for p, _ in jax.tree_util.tree_flatten_with_path(state["params"])[0]]
  assert names and all(n.endswith(lora.SUFFIXES) for n in names)
  adapter_bytes = sum(a.nbytes for a in jax.tree.leaves(state["params"]))
  model = loader.load(runs["lora"])
  base = loader.load(runs["base"], ema=False)
  model_bytes = sum(np.asarray(a).nbytes for a in jax.tree.leaves(model.params))
  assert adapter_bytes < 0.06 * model_bytes, (adapter_bytes, model_bytes)
  cfg = json.loads((runs["lora"] / "config.json").read_text())
  assert cfg["init"]["source"] == str(runs["base"].resolve()) and cfg["init"]["source_step"] == 60
  frozen, adapters = lora.split(model.params)
  for a, b in zip(jax.tree.leaves(frozen), jax.tree.leaves(base.params)):
    np.testing.assert_array_equal(a, b)  # the base never moved
  assert max(float(np.abs(b).max()) for p, b in jax.tree_util.tree_flatten_with_path(adapters)[0]
             if p[-1].key.endswith("_lora_b")) > 0  # the adapters did
  metrics = [json.loads(l) for l in (runs["lora"] / "metrics.jsonl").read_text().splitlines()]
  losses = [m["loss"] for m in metrics if "loss" in m]
  assert np.mean(losses[-2:]) < np.mean(losses[:2])


def test_merged_export_matches_unmerged_and_samplers_run_both(runs):
  out = runs["root"] / "merged"
  dlm_cli("export", f"--workdir={runs['lora']}", f"--out={out}")
  model = loader.load(runs["lora"])
  merged = dlm.from_pretrained(out)
  assert not any(k.endswith(lora.SUFFIXES) for k in merged.params["blocks"]["attn"])
  x = np.random.default_rng(0).integers(0, 500, (2, 48))
  np.testing.assert_allclose(model.logits(x), merged.logits(x), atol=1e-5)
  prompt = x[:, :8]
  seqs = []
  for layout in (False, True):  # unmerged low-rank path, and adapters folded into the kernels
    model.decode_layout = layout
    seqs.append(np.asarray(model.generate(prompt, sampler="llada", steps=8, gen_length=8,
                                          block_length=8, temperature=0.0).sequences))
  np.testing.assert_array_equal(seqs[0], seqs[1])
  r = dlm_cli("sample", f"--workdir={runs['lora']}", "--prompt=def ", "--steps=4",
              "--num_samples=1")
  assert "sample 0" in r.stdout


def test_lora_resumes_exactly_after_sigkill(runs, tmp_path):
  args = ["--config.train.steps=10", "--config.train.checkpoint_every=2",
          "--config.train.log_every=2", "--config.train.eval_every=100"]
  recipes.killed_then_resumed_is_exact(  # resumed without --init_from: the recorded base
      [f"--config={LORA_SMOKE}", f"--init_from={runs['base']}", *args], tmp_path, 10,
      resume_args=[f"--config={LORA_SMOKE}", *args])


def test_lora_cli_errors(runs, tmp_path):
  r = dlm_cli("train", f"--config={LORA_SMOKE}", f"--workdir={tmp_path / 'x'}", check=False)
  assert r.returncode != 0 and "pass --init_from=DIR" in r.stderr.strip().splitlines()[-1]
  assert not (tmp_path / "x").exists()
  r = dlm_cli("train", f"--config={LORA_SMOKE}", f"--workdir={tmp_path / 'y'}",
              f"--init_from={runs['base']}", "--config.lora.targets=wq,wqq", check=False)
  last = r.stderr.strip().splitlines()[-1]
  assert r.returncode != 0 and "lora.targets names ['wqq']: no such parameter" in last
