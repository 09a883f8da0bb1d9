"""Supervised fine-tuning (LLaDA, Nie et al. 2025, sec. 2.3): a clean prompt, a noised answer.

  dlm train --config=configs/sft.py --workdir=runs/sft --init_from=runs/quickstart
  dlm sample --workdir=runs/sft --chat --prompt="Write the docstring of this function.
  def mean(data):" --max_new_tokens=48 --sampler=llada

``--init_from`` is any dlm workdir or converted checkpoint (``dlm convert``): its model,
process, sampler and (imported) special ids are taken over (``config.init.inherit``), its
tokenizer copied.  Data: ``--config.data.sft.train_files=chats.jsonl`` (JSON Lines with
``messages`` or ``prompt``/``response``; comma-separated globs), rendered with the
tokenizer's chat template when it has one (``data.sft.chat_template``: "auto", "tokenizer",
"plain" or ``module:function``).  Without files: the embedded default, each documented
function of the Python standard library (its signature -> its docstring's first paragraph).

Only response tokens (and the EOS padding after them) are noised and counted; the prompt is
never masked.  ``:smoke`` is sized to run in about a minute on a CPU; without
``--init_from`` it trains from scratch (its own tokenizer on the conversations).
``:lora`` trains low-rank adapters only (``config.lora``).
"""

from __future__ import annotations

import ml_collections

from dlm import recipe


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = recipe.flags(arg, {"smoke", "lora"}, "sft")
  c = recipe.base(__file__, "quickstart", "smoke" if "smoke" in args else None)

  # What --init_from brings: its model, process and sampler, an imported model's special ids.
  c.init = ml_collections.ConfigDict({"inherit": ["model", "process", "data.vocab_size", "hf",
                                                  "sample"]})
  c.data.source = "sft"
  c.data.seq_len = 128  # conversations are packed whole into rows of this many tokens
  c.data.sft = ml_collections.ConfigDict({
      "train_files": ml_collections.FieldReference(None, field_type=str),  # JSON Lines globs
      "val_files": ml_collections.FieldReference(None, field_type=str),
      "val_permille": 50,  # held out of train_files when no val_files are given
      "chat_template": "auto",  # the tokenizer's if it has one, else "plain"
      "packing": True,  # several conversations per row (False: one per row, LLaDA's layout)
      "max_conversations": 0,  # 0 = all
      "max_response_chars": 400,  # the embedded default: docstring summaries up to this long
  })
  # LLaDA's SFT objective (Alg. 2): t ~ U(0, 1], response tokens masked with probability t,
  # weighted 1/t.  Works for the masked, uniform and autoregressive processes alike.
  c.loss = ml_collections.ConfigDict({"name": "nelbo", "antithetic": True})
  # LoRA (Hu et al. 2022): rank 0 = full fine-tuning; alpha 0 = rank (scale 1).  The frozen
  # base is the --init_from checkpoint, recorded by the run as init.source / source_step.
  c.lora = ml_collections.ConfigDict({"rank": 0, "alpha": 0.0,
                                      "targets": "wq,wk,wv,wo,w_gate,w_up,w_out"})
  c.optim.lr = 2e-4
  c.optim.warmup_steps = 20
  c.optim.weight_decay = 0.0
  c.train.steps = 500
  c.train.batch_size = 16
  c.train.log_every = 10
  c.train.eval_every = 100
  c.train.checkpoint_every = 100
  c.train.ema_decay = 0.0  # fine-tuning: the weights as trained
  c.eval.max_rows = 256
  c.eval.periodic_rows = 128
  c.sample.steps = 32

  if "lora" in args:
    c.lora.rank, c.lora.alpha = 8, 16.0
    c.optim.lr = 1e-3  # adapters start at zero and are few: a larger step, as PEFT recipes use

  if "smoke" in args:
    c.data.seq_len = 96
    c.data.vocab_size = 512
    c.data.sft.max_conversations = 600
    c.optim.lr = 1e-3 if "lora" not in args else 3e-3
    c.optim.warmup_steps = 5
    c.train.steps = 40
    c.train.eval_every = 20
    c.train.checkpoint_every = 20
    c.eval.max_rows = 64
    c.eval.periodic_rows = 64
    c.sample.steps = 16
  return c
