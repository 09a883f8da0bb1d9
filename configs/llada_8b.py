"""LLaDA-8B-shaped masked diffusion LM pretraining (rows of 4096) for a v5p-128 slice.

LLaDA-8B (Nie et al. 2025, Table 5): 32 layers, d 4096, 32 heads, SwiGLU
12,288, vocabulary 126,464, RoPE theta 500,000; their global batch of 1280
rows of 4096, here accumulated in 20 microbatches (64 rows each, one per chip).
Parameters, Adam moments and gradients are FSDP-sharded over the 64 chips.
Launch:

  launch/tpu_pod.sh --tpu=NAME --zone=ZONE --setup -- dlm train \
      --config=configs/llada_8b.py --workdir=/mnt/shared/llada_8b \
      --config.data.tfds.data_dir=gs://BUCKET/tensorflow_datasets

Fine-tune the released weights instead: `dlm convert --from=llada ...` then
`--init_from=` that workdir (see the README).  Check it first on this machine
(no TPU; needs `pip install -e '.[tpu]'`):

  dlm compile --config=configs/llada_8b.py --topology=v5p-128

Compile report (2026-12-01, libtpu 0.0.42.1): 8.02B parameters; per chip 1.40 GiB
arguments + 7.36 GiB temporaries = 8.8 GiB of 95 GiB HBM (9.3%, fits with the 10% margin);
projected at 40% MFU 22.9 s per step, 228k tokens/s.  tests/test_compile.py compiles it
for v5p-128 and fails if it stops fitting.

Its sampler loop (config.sample: llada, 512 calls, 8 prompts x 1024 tokens, bfloat16
weights), per device (2026-12-03):

  dlm compile --config=configs/llada_8b.py --topology=v5e-8 --what=sample \
      [--config.mesh.fsdp=1 --config.mesh.tensor=8]

v5e-8 fsdp=8: 1.87 + 6.29 = 8.16 GiB (51.0% of 16 GiB); v5e-8 tensor=8: 1.87 + 1.10 =
2.97 GiB (18.6%); v5p-8 (4 chips) fsdp=4: 3.73 + 6.82 = 10.57 GiB (11.1% of 95 GiB).
"""

from __future__ import annotations

from dlm import recipe

TOPOLOGY = "v5p-128"


def get_config(arg: str | None = None):
  c = recipe.base(__file__, "llada_1b")
  recipe.pod_model(c, d_model=4096, num_layers=32, num_heads=32, mlp_dim=12_288,
                   vocab_size=126_464, seq_len=4096)
  c.optim.lr = 4e-4
  c.train.batch_size = 1280
  c.train.microbatches = 20
  c.train.steps = 500_000
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  # sampling as LLaDA's evaluations do: 512 new tokens after a prompt, one token per call
  # (`dlm sample` reads sampler, length, steps, num_samples; prompt_length sizes the
  # prompt `dlm compile --what=sample` compiles for)
  c.sample.sampler = "llada"
  c.sample.length = 1024
  c.sample.prompt_length = 512
  c.sample.steps = 512
  c.sample.num_samples = 8
  return c
