"""Quickstart: a small masked diffusion LM on the Python standard library's sources.

Trains on a 2-core CPU in under ten minutes, then samples:

  dlm train  --config=configs/quickstart.py --workdir=runs/quickstart
  dlm sample --workdir=runs/quickstart --prompt="def "
  dlm eval   --workdir=runs/quickstart

``--config=configs/quickstart.py:smoke`` is the same recipe sized to finish in
under two minutes (used by the end-to-end test).  ``:uniform`` swaps in the
uniform-state process (UDLM) with a time-conditioned denoiser.  ``:sedd`` is SEDD (score
entropy on the absorbing graph, the ``sedd`` sampler).  ``:d3pm`` is D3PM (128 discrete steps,
uniform transitions, the hybrid loss), ``:genmd4`` GenMD4 (learned per-token masking schedules),
``:embed`` embedding diffusion (Gaussian over learned embeddings, self-conditioning, CDCD's
time warping, DDPM sampling).  ``:ar`` is the
autoregressive baseline on the same data and model size (causal attention, next-token
loss, the ``ar`` sampler with a KV cache); ``:smoke,ar`` combines them.  ``:bd3,block=4``
is BD3-LM block diffusion with blocks of 4 (the block NELBO over x_t (+) x_0).

Result (2-core CPU dev machine, Python 3.11.7 stdlib, 2026-12-04): train in
8 min 52 s (2,000 steps, ~35-40% MFU of a measured matmul peak), sample in ~10 s; `dlm eval`
gives validation bits/byte 2.475 (EMA weights) against the unigram entropy 3.789 of the same
tokens (34.7% lower), perplexity bound 26.1.  Before issue 18's faster step, the same day,
the 1,500 steps the recipe had then took 10 min 8 s and reached 2.573.  Its curves:
configs/quickstart_curves.png.
``:smoke`` trains in about 5 s and stays near the unigram: it only checks the
plumbing.
"""

from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None) -> dict[str, str | bool]:
  """'smoke,uniform' or 'size=smoke' -> {'smoke': True, 'uniform': True, 'size': 'smoke'}."""
  out: dict[str, str | bool] = {}
  for part in filter(None, (arg or "").split(",")):
    key, sep, value = part.partition("=")
    out[key] = value if sep else True
  return out


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg)
  known = {"smoke", "uniform", "ar", "bd3", "block", "sedd", "d3pm", "genmd4", "embed"}
  if set(args) - known:
    raise ValueError(f"configs/quickstart.py: unknown argument(s) {sorted(set(args) - known)};"
                     f" known: {sorted(known)}")
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  c.data.source = "stdlib"
  c.data.root = ml_collections.FieldReference(None, field_type=str)
  c.data.vocab_size = 512  # small pieces: context carries more, the unigram less
  c.data.seq_len = 128
  c.data.val_permille = 50
  c.data.tokenizer_max_chars = 3_000_000
  # Other sources (config change only): "tfds", "files", "mixture"; they stream through
  # grain with packing below. "stdlib" is tokenized once and cached in the workdir.
  c.data.tokenizer = ml_collections.FieldReference(None, field_type=str)  # a model file to use
  c.data.tokenizer_type = "bpe"  # or "unigram" (streamed sources and `dlm tokenizer train`)
  c.data.invalid_utf8 = "fail"  # or "skip" (counted, one warning)
  c.data.tokenize_chunk_chars = 1 << 20  # read/tokenize at once: memory bounded for any line
  c.data.scan = ml_collections.FieldReference(None, field_type=bool)  # validate files up front
  c.data.tfds = ml_collections.ConfigDict({
      "name": ml_collections.FieldReference(None, field_type=str),
      "data_dir": ml_collections.FieldReference(None, field_type=str),
      "text_field": "text",
      "splits": {"train": "train", "validation": "validation"},
  })
  c.data.files = ml_collections.ConfigDict({
      "train_glob": ml_collections.FieldReference(None, field_type=str),
      "val_glob": ml_collections.FieldReference(None, field_type=str),
      "format": ml_collections.FieldReference(None, field_type=str),  # None: by extension
      "jsonl_field": "text",
  })
  c.data.mixture = []  # [{"source": ..., "weight": w, ...}, ...] when source == "mixture"
  c.data.packing = "concat"  # or "pad": one document per row
  c.data.segment_ids = True  # concat: attention stays inside each document
  c.data.truncate_fraction = 0.0  # LLaDA: this fraction of rows cut to a random length
  c.data.worker_count = 0  # grain worker processes for tokenization

  c.process = ml_collections.ConfigDict()
  c.process.name = "masked"
  c.process.schedule = ml_collections.ConfigDict({"name": "linear", "eps": 1e-4})

  # The any-order form of the same NELBO: no 1/t weight, so far lower gradient variance.
  c.loss = ml_collections.ConfigDict({"name": "nelbo_count", "antithetic": True, "num_steps": 1000})

  c.model = ml_collections.ConfigDict()
  c.model.d_model = 192
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.mlp_dim = 512
  c.model.rope_theta = 10_000.0
  c.model.time_conditioning = False
  c.model.dtype = "float32"
  c.model.remat = "none"
  # Unrolled layers: on this CPU a step of these shapes is ~1.2x faster than scanned (no stacked
  # activations for the backward; benchmarks/train_step.py), and 4 layers compile in seconds.
  c.model.scan_layers = False
  c.model.attention = "xla"  # or "cudnn" (GPU), "splash" (TPU): dlm/models/attention.py
  c.model.mask_kind = "bidirectional"  # or "causal", "block_causal" (with model.block_size)
  c.model.block_size = 0

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 50
  c.optim.final_lr_frac = 0.1
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.01
  c.optim.clip_norm = 1.0

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 16  # global batch, rows of data.seq_len tokens: many small steps
  c.train.steps = 2000  # issue 18's faster step: 1,500 steps took 5 min 43 s, not 10 min 8 s
  c.train.time_limit_s = 0.0  # > 0: stop early (and save) after this many seconds of training
  c.train.log_every = 25
  c.train.eval_every = 500
  c.train.checkpoint_every = 500
  c.train.max_to_keep = 2  # newest checkpoints kept, besides the best by validation loss
  c.train.keep_best = True
  c.train.microbatches = 1  # gradient accumulation: the batch in this many sequential parts
  c.train.ema_decay = 0.99  # EMA of the parameters (0 = off); eval and sampling use it
  c.train.max_nonfinite_in_a_row = 10  # skipped non-finite updates before training stops
  c.train.peak_flops = 0.0  # the devices' peak FLOP/s for MFU (0 = measure a matmul at start)
  c.train.profile_steps = ""  # "a:b": a jax.profiler trace of steps a..b in WORKDIR/profile

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 64
  c.eval.num_passes = 2  # stratified t passes over the validation rows
  c.eval.max_rows = 0  # 0 = all validation rows; periodic evals use eval.periodic_rows
  c.eval.periodic_rows = 256
  c.eval.seed = 1234
  c.eval.use_ema = True  # evaluate the EMA parameters when train.ema_decay > 0

  c.sample = ml_collections.ConfigDict()
  c.sample.sampler = "ancestral"
  c.sample.steps = 128
  c.sample.num_samples = 4
  c.sample.length = 0  # 0 = data.seq_len
  c.sample.temperature = 1.0
  c.sample.top_p = 1.0
  c.sample.seed = 0

  # Mesh axis sizes (-1 = the rest of the devices), e.g. --config.mesh.data=2
  # --config.mesh.fsdp=2 --config.mesh.tensor=2, and the logical -> mesh axis rules.
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.mesh.rules = [
      ("batch", ("data", "fsdp")),  # activations and data: batch over data x fsdp
      ("length", None),
      ("embed", "fsdp"),  # parameters (and optimizer state): FSDP over `fsdp`
      ("heads", "tensor"),  # tensor parallelism: heads, MLP and vocabulary over `tensor`
      ("kv", None),
      ("mlp", "tensor"),
      ("vocab", "tensor"),
      ("layers", None),
  ]

  if args.get("uniform"):
    c.process.name = "uniform"
    c.loss.name = "nelbo"  # the count form is for absorbing processes only
    c.model.time_conditioning = True

  if args.get("sedd"):  # SEDD (Lou et al. 2024): score entropy on the absorbing graph
    c.process.name = "sedd_absorbing"
    c.process.scale_by_sigma = True  # the network predicts the score up to log r(t)
    c.process.schedule = ml_collections.ConfigDict({"name": "loglinear"})  # SEDD's noise
    c.loss.name = "nelbo"  # for a score-parameterized process: the DWDSE
    c.sample.sampler = "sedd"

  if args.get("d3pm"):  # D3PM (Austin et al. 2021): 128 discrete steps, uniform transitions
    c.process = ml_collections.ConfigDict({
        "name": "d3pm", "num_steps": 128, "transition": "uniform",
        "schedule": {"name": "cosine", "eps": 1e-4}})
    c.loss = ml_collections.ConfigDict({"name": "hybrid", "hybrid_coeff": 0.01,
                                        "antithetic": True})  # D3PM's L_vb + lambda L_CE
    c.model.time_conditioning = True
    c.sample.steps = 128

  if args.get("genmd4"):  # GenMD4 (Shi et al. 2024): per-token masking schedules, learned
    c.process = ml_collections.ConfigDict({
        "name": "genmd4", "power_init": 1.0, "eps": 1e-4, "t1": 1e-3,
        "schedule": {"name": "linear"}})
    c.loss = ml_collections.ConfigDict({"name": "genmd4", "antithetic": True})  # RLOO, 2 draws
    c.model.time_conditioning = True  # the reverse step depends on t, not only on the masks

  if args.get("embed"):  # embedding diffusion (Diffusion-LM, CDCD, Plaid), self-conditioned
    c.process = ml_collections.ConfigDict({
        "name": "gaussian", "self_condition": True, "time_warp": 32,
        "schedule": {"name": "sqrt", "eps": 1e-4}})
    c.loss = ml_collections.ConfigDict({"name": "cdcd", "antithetic": True})  # CE + time warp
    c.model.time_conditioning = True
    c.model.self_conditioning = True
    c.sample.sampler = "ddpm"

  if args.get("ar"):  # the autoregressive baseline: causal attention, next-token NLL
    c.process.name = "autoregressive"
    c.loss.name = "nelbo"  # x_t = x_0: the exact NLL at every t
    c.model.mask_kind = "causal"
    c.model.shift_logits = True  # the prediction of token l is output l-1
    c.sample.sampler = "ar"
    c.eval.num_passes = 1  # no noise: one pass is exact

  if args.get("bd3"):  # BD3-LM block diffusion (block=N, default 4): x_t (+) x_0 in one pass
    block = int(args.get("block", 4))
    c.model.mask_kind = "bd3"
    c.model.block_size = block
    c.sample.sampler = "bd3"
    c.loss = ml_collections.ConfigDict({"name": "bd3_nelbo", "block_size": block, "beta": 0.0,
                                        "omega": 1.0, "antithetic": True})
    c.train.steps = 1500  # a step runs x_t (+) x_0, 2L tokens: ~2x the masked step
  elif "block" in args:
    raise ValueError("configs/quickstart.py: block=N goes with bd3 (e.g. :bd3,block=4)")

  if args.get("smoke"):
    c.data.vocab_size = 512
    c.data.seq_len = 64
    c.data.tokenizer_max_chars = 500_000
    c.model.d_model = 64
    c.model.num_layers = 2
    c.model.num_heads = 2
    c.model.mlp_dim = 128
    c.train.batch_size = 16
    c.train.steps = 60
    c.train.log_every = 10
    c.train.eval_every = 30
    c.train.checkpoint_every = 30
    c.train.ema_decay = 0.9  # 60 steps: a short average
    c.optim.warmup_steps = 10
    c.eval.max_rows = 128
    c.eval.periodic_rows = 64
    c.eval.num_passes = 1
    c.sample.steps = 16
    c.sample.num_samples = 2
  if args.get("bd3"):
    c.sample.steps = c.model.block_size  # bd3: passes per block, one token each
  return c
