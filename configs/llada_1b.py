"""A ~1B LLaDA-shaped masked diffusion LM (rows of 4096) pretraining on C4 for a v5p-32 slice.

LLaDA (Nie et al. 2025) at ~1B: 22 layers, d 2048, 32 heads, SwiGLU 5632,
their 126,464-entry vocabulary size, RoPE theta 500,000, 1% of rows cut to a
random length.  Parameters and optimizer state are FSDP-sharded over the 16
chips; the 1024-row global batch is accumulated in 8 microbatches.
Launch:

  launch/tpu_pod.sh --tpu=NAME --zone=ZONE --setup -- dlm train \
      --config=configs/llada_1b.py --workdir=/mnt/shared/llada_1b \
      --config.data.tfds.data_dir=gs://BUCKET/tensorflow_datasets

Check it first on this machine (no TPU; needs `pip install -e '.[tpu]'`):

  dlm compile --config=configs/llada_1b.py --topology=v5p-32

Compile report (2026-12-01, libtpu 0.0.42.1): 1.65B parameters (1.13B without the
embedding and head); per chip 1.16 GiB arguments + 30.49 GiB temporaries = 31.7 GiB of
95 GiB HBM (33.4%, fits with the 10% margin); projected at 40% MFU 15.1 s per step,
278k tokens/s.  tests/test_compile.py compiles it for v5p-32 and fails if it stops fitting.
"""

from __future__ import annotations

from dlm import recipe

TOPOLOGY = "v5p-32"


def get_config(arg: str | None = None):
  c = recipe.base(__file__, "quickstart")
  c.data.source = "tfds"
  c.data.tfds.name = "c4/en:3.1.0"
  c.data.tokenizer_max_chars = 200_000_000
  c.data.worker_count = 8
  c.data.truncate_fraction = 0.01  # LLaDA: 1% of rows get a random length
  recipe.pod_model(c, d_model=2048, num_layers=22, num_heads=32, mlp_dim=5632,
                   vocab_size=126_464, seq_len=4096)
  c.model.rope_theta = 500_000.0
  c.model.norm_eps = 1e-5
  c.optim.lr = 4e-4
  c.optim.warmup_steps = 2_000
  c.optim.weight_decay = 0.1
  c.optim.b2 = 0.95
  c.train.batch_size = 1024
  c.train.microbatches = 8
  c.train.steps = 500_000
  c.train.log_every = 50
  c.train.eval_every = 5_000
  c.train.checkpoint_every = 1_000
  c.train.ema_decay = 0.0  # at this size the EMA copy is 4 bytes/parameter more HBM
  c.eval.batch_size = 64
  c.eval.periodic_rows = 1024
  c.sample.steps = 256
  c.sample.num_samples = 16
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1  # FSDP over every chip of the slice
  return c
