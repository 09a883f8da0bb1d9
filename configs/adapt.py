"""Adapting an autoregressive model into a masked diffusion LM (Dream; DiffuLLaMA).

  dlm convert --from=llama --src=HF_LLAMA --workdir=runs/llama
  dlm train --config=configs/adapt.py --workdir=runs/adapted --init_from=runs/llama
  dlm sample --workdir=runs/adapted --prompt="def " --sampler=llada

``--init_from`` is an imported Llama / Qwen2 checkpoint (or a dlm ``:ar`` run): its weights
start a masked diffusion model on the stdlib corpus (``config.data``, as the quickstart's).
Both recipes keep the autoregressive head's shifted logits (the prediction of token i is
output i - 1; ``model.shift_logits``):

- ``:dream`` (the default; Ye et al. 2025): bidirectional attention from the first step.
- ``:diffullama`` (Gong et al. 2024): attention-mask annealing, causal plus each later key
  visible with probability step / ``model.anneal_steps``, bidirectional from that step on.

An import without a mask token gets one: ``init.mask_id`` (-1: the last id of the model's
vocabulary, which a tokenizer smaller than the embedding never produces).  ``:smoke`` runs
in about a minute on a CPU (from scratch without ``--init_from``).
"""

from __future__ import annotations

import ml_collections

from dlm import recipe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = recipe.flags(arg, {"smoke", "dream", "diffullama"}, "adapt")
  if {"dream", "diffullama"} <= args:
    raise ValueError("configs/adapt.py: dream or diffullama, not both")
  c = recipe.base(__file__, "quickstart", "smoke" if "smoke" in args else None)
  # the source's weights and vocabulary; this recipe's attention pattern and logit shift
  c.init = ml_collections.ConfigDict({
      "inherit": ["model", "data.vocab_size", "hf"],
      "keep_model_fields": ["mask_kind", "anneal_steps", "shift_logits"],
      "mask_id": -1,
  })
  c.process.name = "masked"
  c.loss = ml_collections.ConfigDict({"name": "nelbo", "antithetic": True})
  c.model.shift_logits = True
  c.model.time_conditioning = False
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 20
  c.train.steps = 1000
  c.train.ema_decay = 0.0
  c.sample.sampler = "llada"
  c.sample.steps = 32
  if "diffullama" in args:
    c.model.mask_kind = "annealed"
    c.model.anneal_steps = 500  # DiffuLLaMA anneals over the first part of training
  else:
    c.model.mask_kind = "bidirectional"
    c.model.anneal_steps = 0
  if "smoke" in args:
    c.train.steps = 40
    c.train.eval_every = 20
    c.train.checkpoint_every = 20
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 5
    if "diffullama" in args:
      c.model.anneal_steps = 20
  return c
