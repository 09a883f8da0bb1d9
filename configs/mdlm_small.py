"""MDLM-small-sized masked diffusion LM (~110M parameters, rows of 1024) on C4 for a v6e-16 slice.

Sahoo et al. 2024 (MDLM) train a ~110M denoiser on 1024-token rows with a
global batch of 512; this is that size in our Transformer (12 layers, d 768,
SwiGLU 2048, a 16,384-piece sentencepiece vocabulary trained on the corpus).
Launch (C4 prepared with TFDS in a bucket every host reads):

  launch/tpu_pod.sh --tpu=NAME --zone=ZONE --setup -- dlm train \
      --config=configs/mdlm_small.py --workdir=/mnt/shared/mdlm_small \
      --config.data.tfds.data_dir=gs://BUCKET/tensorflow_datasets

Check it first on this machine (no TPU; needs `pip install -e '.[tpu]'`):

  dlm compile --config=configs/mdlm_small.py --topology=v6e-16

Compile report (2026-12-01, libtpu 0.0.42.1, `dlm compile` above): 110.1M parameters; per
chip 0.13 GiB arguments + 4.28 GiB temporaries = 4.44 GiB of 32 GiB HBM (13.9%, fits with
the 10% margin); projected at 40% MFU 62 ms per step, 8.4M tokens/s.
tests/test_compile.py compiles it for v6e-16 and fails if it stops fitting.
"""

from __future__ import annotations

from dlm import recipe

TOPOLOGY = "v6e-16"


def get_config(arg: str | None = None):
  c = recipe.base(__file__, "quickstart")
  c.data.source = "tfds"
  c.data.tfds.name = "c4/en:3.1.0"
  c.data.tfds.splits = {"train": "train", "validation": "validation"}
  c.data.tokenizer_max_chars = 200_000_000
  c.data.worker_count = 8
  recipe.pod_model(c, d_model=768, num_layers=12, num_heads=12, mlp_dim=2048,
                   vocab_size=16_384, seq_len=1024)
  c.optim.lr = 3e-4
  c.optim.warmup_steps = 2_500
  c.optim.b2 = 0.999
  c.train.batch_size = 512
  c.train.steps = 1_000_000
  c.train.log_every = 100
  c.train.eval_every = 10_000
  c.train.checkpoint_every = 5_000
  c.train.ema_decay = 0.9999
  c.eval.batch_size = 256
  c.eval.periodic_rows = 4096
  c.sample.steps = 1000
  c.sample.num_samples = 16
  # Data parallel over the whole slice, parameters and optimizer state FSDP-sharded over it.
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1  # FSDP over every chip of the slice
  return c
