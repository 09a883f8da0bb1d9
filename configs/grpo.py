"""diffu-GRPO (Zhao et al. 2025, d1): reinforcement learning of a diffusion LM on rewards.

  dlm train --config=configs/grpo.py --workdir=runs/grpo --init_from=runs/quickstart
  dlm plot --workdir=runs/grpo          # loss, reward (train and validation), KL

Each rollout samples ``grpo.num_generations`` completions of ``train.batch_size /
num_generations`` prompts through the sampling engine (``grpo.sampler``, LLaDA's with d1's
``diffusion_steps`` / ``block_length`` / ``temperature`` / ``cfg_scale`` / ``remasking``),
scores them with ``grpo.rewards`` (registered names or ``module:function``), and is reused
for ``num_iterations`` inner updates of the clipped-ratio loss with a KL penalty to the
reference model (``loss.epsilon``, ``loss.beta``, ``loss.p_mask_prompt``: the one-step
log-likelihood with a randomly masked prompt).  ``--init_from`` is any dlm or converted
workdir (its model and sampler are taken over, as in configs/sft.py); ``:lora`` trains LoRA
adapters and uses the base as the reference (d1's setup).

Data: ``--config.data.grpo.train_files=prompts.jsonl`` (``prompt`` or ``messages``, plus the
fields rewards read, e.g. ``answer``).  Without files: the embedded default, stdlib function
headers with their docstrings, the reward ``python_parses`` (the body the model writes parses).
``:smoke`` runs in about a minute on a CPU (from scratch without ``--init_from``).
"""

from __future__ import annotations

import ml_collections

from dlm import recipe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = recipe.flags(arg, {"smoke", "lora"}, "grpo")
  c = recipe.base(__file__, "sft", ",".join(sorted(args)) or None)

  # d1's knobs, under d1's names and defaults (diffu_grpo_config.py)
  c.grpo = ml_collections.ConfigDict({
      "num_generations": 8,  # completions per prompt: one group
      "max_prompt_length": 64,
      "max_completion_length": 32,
      "num_iterations": 1,  # mu: inner updates per rollout batch
      "sampler": "llada",
      "diffusion_steps": 32,
      "block_length": 32,
      "temperature": 0.9,
      "cfg_scale": 0.0,
      "remasking": "low_confidence",
      "random_masking": True,  # a new prompt mask per inner iteration
      "generation_batch_size": 0,  # rows sampled at once (0 = the whole rollout batch)
      "scale_rewards": False,  # d1: A = r - group mean; True: / (group std + 1e-4) (TRL)
      "rewards": ("python_parses",),  # tuples: --config.grpo.rewards=a --config.grpo.rewards=b
      "reward_weights": (1.0,),
      "sampler_knobs": {},  # more knobs of grpo.sampler (any registered sampler)
  })
  c.loss = ml_collections.ConfigDict({"name": "grpo", "epsilon": 0.2, "beta": 0.04,
                                      "p_mask_prompt": 0.15})
  c.data.source = "grpo"
  c.data.seq_len = c.grpo.get_ref("max_prompt_length") + c.grpo.get_ref("max_completion_length")
  c.data.grpo = ml_collections.ConfigDict({
      "train_files": ml_collections.FieldReference(None, field_type=str),
      "val_files": ml_collections.FieldReference(None, field_type=str),
      "val_permille": 50,
      "chat_template": "auto",
      "max_prompts": 0,
      "max_val_prompts": 32,
      "max_prompt_length": c.grpo.get_ref("max_prompt_length"),
  })
  # 1e-4 suits the quickstart-sized model (d1 uses 3e-6 for LoRA on LLaDA-8B)
  c.optim.lr = 1e-4 if "lora" not in args else 3e-4
  c.optim.warmup_steps = 5
  c.optim.weight_decay = 0.1
  c.optim.clip_norm = 0.2  # d1's max_grad_norm
  c.optim.b2 = 0.99
  c.train.batch_size = 16  # completions per step: 2 prompts x 8
  c.train.steps = 250  # ~10 min on a 2-core CPU from the quickstart model (README)
  c.train.log_every = 5
  c.train.eval_every = 50
  c.train.checkpoint_every = 50
  c.eval.periodic_rows = 0

  if "smoke" in args:
    c.grpo.num_generations = 4
    c.grpo.max_prompt_length = 32
    c.grpo.max_completion_length = 16
    c.grpo.diffusion_steps = 8
    c.grpo.block_length = 16
    c.grpo.num_iterations = 2
    c.data.grpo.max_prompts = 200
    c.data.grpo.max_val_prompts = 8
    c.optim.lr = 1e-4
    c.train.batch_size = 8
    c.train.steps = 12
    c.train.log_every = 2
    c.train.eval_every = 6
    c.train.checkpoint_every = 6
  return c
