"""One loader: a dlm workdir or a Hugging Face LLaDA/Dream folder -> ``DiffusionLM``.

Sampling, evaluation and export load models only through ``load``; it imports no
training code (the checkpoint reader is ``dlm/checkpoint.py``).  A workdir is data:
its ``config.json`` names registered things only, unless ``trust_config_code``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dlm import checkpoint, jsonfile, processes
from dlm.errors import UserError
from dlm.models import lora, transformer


@dataclasses.dataclass
class DiffusionLM:
  """A loaded model: config, parameters, Transformer config, process, special ids, tokenizer.

  The one container of a model for sampling and evaluation, whatever it was loaded from
  (``load``).
  """
  config: ml_collections.ConfigDict
  model_cfg: transformer.ModelConfig
  params: Any
  ids: dict[str, int | None]
  tokenizer: Any
  apply: Any  # the pure denoiser apply(params, x_t, t, **kw) -> (logits, cache)
  process: Any = None  # the corruption process (dlm.processes) the model was trained with
  step: int = 0  # the checkpoint step loaded (0 for an imported model)
  weights: str = "params"  # or "ema_params": which of the checkpoint's weights were loaded
  mesh: Any = None  # jax.sharding.Mesh the parameters are placed on (``shard``), or None
  rules: Any = None  # the logical -> mesh axis rules used with ``mesh``
  # samplers' parameter layout: True = decode layout (dlm/models/decode.py), None = on CPU only
  decode_layout: bool | None = None
  # keep the decode-layout copy of the weights between generate calls (a second copy in
  # memory); False converts inside every call instead (~0.25 s at 114M parameters)
  keep_sampling_params: bool = True

  @property
  def sampling(self) -> tuple[Any, Any]:
    """(prepare, apply) for samplers: ``apply(prepare(params), x_t, t, **kw)`` is ``self.apply``'s
    network; call ``prepare`` inside the sampler's jit, before its loop.  Made once per
    ``decode_layout`` value."""
    from dlm.models import decode
    made = self.__dict__.setdefault("_sampling", {})
    if self.decode_layout not in made:
      made[self.decode_layout] = decode.for_sampling(self.model_cfg, self.apply, self.decode_layout)
    return made[self.decode_layout]

  def sampling_params(self) -> Any:
    """``self.params`` as the samplers take them: in decode layout where that is used,
    converted once and kept while the parameters are the same arrays (see
    ``keep_sampling_params``); ``prepare`` leaves them as they are."""
    prepare, apply = self.sampling
    if apply is self.apply or not self.keep_sampling_params:
      return self.params
    leaves = jax.tree.leaves(self.params)
    key = (self.decode_layout, tuple(map(id, leaves)))
    kept = self.__dict__.get("_sampling_params")
    if kept is None or kept[0] != key:
      self.__dict__["_sampling_params"] = None  # free the old copy before making a new one
      # the leaves are held so that their ids stay theirs while the copy is kept
      kept = (key, leaves, jax.jit(prepare)(self.params))
      self.__dict__["_sampling_params"] = kept
    return kept[2]

  def jitted(self, name: str, knobs: dict, build: Any, **jit_kw: Any) -> Any:
    """``jax.jit(build(), **jit_kw)`` made once per sampler and knobs on this model: a fresh
    jit per call would trace and compile the whole loop every time.  On a mesh the function
    is traced inside it (activations constrained by logical names)."""
    key = (name, self.decode_layout, repr(sorted(knobs.items())))
    cache = self.__dict__.setdefault("_jitted", {})
    if key not in cache:
      fn = build()
      if self.mesh is not None:
        from dlm import parallel
        fn = parallel.traced_in_mesh(fn, self.mesh, self.rules)
      cache[key] = jax.jit(fn, **jit_kw)
    return cache[key]

  @property
  def param_shardings(self) -> Any:
    """The parameters' NamedShardings on ``mesh`` (None without a mesh)."""
    return None if self.mesh is None else jax.tree.map(lambda x: x.sharding, self.params)

  @functools.cached_property
  def _apply(self):
    return jax.jit(self.apply, static_argnames=("raw_logits",))

  def logits(self, input_ids: Any, attention_mask: Any = None) -> np.ndarray:
    """The network's float32 logits [B, L, V] as the reference forward returns them (Dream unshifted).

    ``attention_mask`` [B, L] (1 = real token) for left-padded batches.
    """
    ids = jnp.asarray(input_ids, jnp.int32)
    if ids.ndim != 2:
      raise UserError(f"input_ids must be [batch, length], got shape {tuple(ids.shape)}")
    if int(jnp.max(ids)) >= self.model_cfg.vocab_size or int(jnp.min(ids)) < 0:
      raise UserError(f"input_ids must be in [0, {self.model_cfg.vocab_size}); got"
                      f" {int(jnp.min(ids))}..{int(jnp.max(ids))}")
    mask = None if attention_mask is None else jnp.asarray(attention_mask, jnp.int32)
    if mask is not None and mask.shape != ids.shape:
      raise UserError(f"attention_mask shape {tuple(mask.shape)} != input_ids {tuple(ids.shape)}")
    return np.asarray(self._apply(self.params, ids, None, attention_mask=mask, raw_logits=True)[0])

  def generate(self, prompt_ids: Any, attention_mask: Any = None, *, sampler: str | None = None,
               seed: int = 0, prompt_bucket: int = 0, **knobs: Any) -> Any:
    """Generates after each prompt with a sampler and the reference code's knob names.

    ``sampler``: a registered name (``llada``, ``dream``, ``fast_dllm``,
    ``ancestral``) or ``"pkg.mod:make"``; None uses the model's own
    (``config.sample.sampler``).  Each sampler lists its knobs
    (``dlm.sample.engine.resolve(name).knobs``); an unknown knob is an error.
    Rows of different lengths are left-padded with ``attention_mask`` (llada, dream).
    ``prompt_bucket=N`` left-pads prompts to a multiple of N tokens so that prompt lengths
    share compiled programs (greedy: the same tokens; stochastic draws differ).
    Returns ``.sequences`` (prompt included), ``.nfe``, ``.committed_at``, ``.texts``.
    """
    from dlm.sample import engine  # the layer above: imported only when generating
    return engine.generate(self, prompt_ids, attention_mask, sampler=sampler, seed=seed,
                           prompt_bucket=prompt_bucket, **knobs)

  def log_likelihood(self, prompt_ids: Any, answer_ids: Any, *, num_samples: int = 128,
                     batch_size: int = 32, seed: int = 0, cfg_scale: float = 0.0,
                     bucket: int = 16, progress: bool = False) -> Any:
    """log p(answer | prompt) with its standard error: LLaDA's Monte-Carlo estimator (eq. 6,
    stratified mask counts; ``num_samples`` is its mc_num, ``cfg_scale`` its cfg) for masked
    diffusion models, per block for BD3-LM, exact for autoregressive models.  One pair (two
    flat token lists) or many (lists of lists).  See ``dlm.eval.likelihood``."""
    from dlm.eval import likelihood  # the layer above: imported only when scoring
    return likelihood.log_likelihood(self, prompt_ids, answer_ids, num_samples=num_samples,
                                     batch_size=batch_size, seed=seed, cfg_scale=cfg_scale,
                                     bucket=bucket, progress=progress)


def is_hf_folder(path: str | pathlib.Path) -> bool:
  """A Hugging Face model folder: a config.json that is not a dlm config (no ``model``)."""
  cfg = pathlib.Path(path) / "config.json"
  return cfg.is_file() and "model" not in jsonfile.read_object(
      cfg, fix="give a Hugging Face model folder or a dlm workdir")


def build(config: ml_collections.ConfigDict, vocab_size: int,
          mask_id: int) -> tuple[transformer.ModelConfig, Any]:
  """(model config, process) of a dlm config: what training and loading both build."""
  model_cfg = transformer.ModelConfig.from_config(config.model, vocab_size=vocab_size)
  model_cfg = dataclasses.replace(model_cfg, **lora.settings(config))  # config.lora adapters
  process = processes.make_process(config.process, vocab_size=vocab_size, mask_id=mask_id)
  learned = processes.learned_specs(process)  # parameters the process learns with the denoiser
  return dataclasses.replace(model_cfg, process_params=learned), process


def _cast(params: Any, dtype: str | None) -> Any:
  if dtype is None:
    return jax.tree.map(jnp.asarray, params)
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), params)


def _sampling_rules(config: Any) -> tuple[tuple[str, Any], ...]:
  """The config's logical -> mesh rules with prompts (``batch``) over ``data`` only: ``fsdp``
  shards the parameters (gathered layer by layer), ``tensor`` the heads, MLP and vocabulary."""
  from dlm import parallel
  mesh_cfg = config.get("mesh", None)
  rules = parallel.rules_from_config(mesh_cfg) if mesh_cfg is not None else parallel.DEFAULT_RULES
  return tuple((k, "data") if k == "batch" else (k, v) for k, v in rules)


def sampling_mesh(mesh: Any, devices: Any = None) -> Any:
  """A ``Mesh``, or one made of axis sizes (``{"fsdp": 4, "tensor": 2}``: an axis left out is
  1, and ``data`` takes the rest of ``devices`` (default all) unless a size is -1)."""
  from jax.sharding import Mesh
  from dlm import parallel
  if isinstance(mesh, Mesh):
    return mesh
  sizes = {"data": 1, "fsdp": 1, "tensor": 1, **dict(mesh)}
  if -1 not in sizes.values() and "data" not in dict(mesh):
    sizes["data"] = -1  # the rest of the devices take prompts
  try:
    return parallel.make_mesh(sizes, devices)
  except ValueError as e:
    raise UserError(f"{e} (sampling mesh {sizes})") from None


def sampling_shardings(model_cfg: transformer.ModelConfig, config: Any, mesh: Any
                       ) -> tuple[Any, Any]:
  """(rules, parameter NamedShardings) of a model sampled over ``mesh``: the training rules
  with prompts over ``data``; a mesh that does not divide a parameter is one line."""
  from dlm import parallel
  rules = _sampling_rules(config)
  _, abstract, specs = transformer.param_logical_specs(model_cfg)
  flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
  spec_of = dict(jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0])
  for path, leaf in flat:
    spec = parallel.logical_to_spec(tuple(spec_of[path]), rules, mesh)
    for dim, axes, logical in zip(leaf.shape, spec, tuple(spec_of[path])):
      names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      n = int(np.prod([mesh.shape[a] for a in names])) if names else 1
      if dim % n:
        where = "/".join(str(getattr(k, "key", k)) for k in path)
        raise UserError(
            f"the mesh {dict(mesh.shape)} does not divide the model: {where} has {dim}"
            f" {logical} over {'x'.join(names)}={n}; pick sizes that divide the heads"
            f" ({model_cfg.num_heads}, {model_cfg.num_kv_heads or model_cfg.num_heads}"
            f" key/value), MLP ({model_cfg.mlp}), width ({model_cfg.d_model}) and"
            f" vocabulary ({model_cfg.vocab_size})")
  return rules, parallel.tree_shardings(specs, mesh, rules)


def shard(model: DiffusionLM, mesh: Any, *, devices: Any = None) -> DiffusionLM:
  """``model`` with its parameters placed over ``mesh`` by the same logical-axis rules as
  training; its samplers then run jitted with explicit shardings over that mesh.

  ``mesh``: a ``jax.sharding.Mesh`` with axes (data, fsdp, tensor), or some of their sizes
  (``sampling_mesh``).
  """
  mesh = sampling_mesh(mesh, devices)
  rules, shardings = sampling_shardings(model.model_cfg, model.config, mesh)
  params = jax.device_put(model.params, shardings)
  return dataclasses.replace(model, params=params, mesh=mesh, rules=rules, decode_layout=False)


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def _meta_tokenizer_dir(step_dir: pathlib.Path, meta: dict[str, Any]) -> pathlib.Path | None:
  """A folder holding the tokenizer file a step's meta item carries (None if it has none):
  ``$XDG_CACHE_HOME/dlm/tokenizers/<sha256>/``, written once, content-addressed."""
  if "tokenizer_base64" not in meta:
    return None
  name = meta.get("tokenizer_file")
  if name not in TOKENIZER_FILES:
    raise UserError(f"{step_dir}/meta names tokenizer file {name!r}; only"
                    f" {' or '.join(TOKENIZER_FILES)} load")
  try:
    raw = checkpoint.tokenizer_bytes(meta)
  except (ValueError, TypeError, KeyError) as e:
    raise UserError(f"{step_dir}/meta: {e}; copy the whole step folder again") from None
  from dlm import compile_cache
  folder = compile_cache.default_dir().parent / "tokenizers" / hashlib.sha256(raw).hexdigest()
  if not (folder / name).is_file():
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.{os.getpid()}.tmp"
    tmp.write_bytes(raw)
    os.replace(tmp, folder / name)
  return folder


def _lora_base(config: Any, abstract: Any, path: pathlib.Path) -> Any:
  """The frozen base parameters a LoRA run's config names (``init.source`` / ``source_step``)."""
  base, step = config.get("init", {}).get("source"), config.get("init", {}).get("source_step")
  if not base or step is None or int(step) < 0:
    raise UserError(f"{path}: its config names no base checkpoint (init.source) for its LoRA"
                    " adapters; it was not written by dlm train")
  base_abstract = lora.split(abstract)[0]
  if not (pathlib.Path(base) / "config.json").is_file():
    raise UserError(f"{path} holds LoRA adapters of {base}, which is gone: restore it there")
  try:
    return checkpoint.restore_params(base, base_abstract, int(step))[1]
  except (FileNotFoundError, ValueError) as e:
    raise UserError(f"the LoRA base {base} of {path}: {e}") from None


def load(path: str | pathlib.Path, *, step: int | None = None, ema: bool | None = None,
         dtype: str | None = "float32", mesh: Any = None, trust_config_code: bool = False,
         compile_cache: str | bool | None = None) -> DiffusionLM:
  """A trained dlm workdir, a converted workdir or an HF folder (LLaDA / Dream) -> ``DiffusionLM``.

  ``path`` may also be one checkpoint of a workdir, ``WORKDIR/checkpoints/STEP``, or a copy
  of one on its own (its meta item holds the config and the tokenizer).
  ``step``: the checkpoint to load (default: the newest readable one).
  ``ema``: load the EMA weights (default: when the run kept them, ``train.ema_decay > 0``).
  ``dtype``: the parameters' dtype in memory (None keeps the checkpoint's, e.g.
  bfloat16 for the released 8B models); compute runs in ``model.dtype``.
  ``mesh``: shard the parameters and the samplers over a mesh (``shard``): a ``Mesh`` or
  axis sizes such as ``{"fsdp": 4, "tensor": 2}`` (the rest of the devices go to ``data``).
  ``trust_config_code``: a workdir's ``config.json`` may name ``module:attr`` imports
  (refused otherwise: a downloaded folder is data, never a program).
  ``compile_cache``: JAX's persistent compilation cache (``dlm/compile_cache.py``): None
  = the default directory, a path, or False / "off".
  """
  from dlm import compile_cache as compile_cache_lib
  from dlm.data import hf_tokenizer
  compile_cache_lib.enable(compile_cache)
  path = pathlib.Path(path)
  alone = False  # a step folder read on its own: config and tokenizer from its meta item
  if checkpoint.is_step_folder(path) and not (path / "config.json").is_file():
    if (path.parent.name == checkpoint.CHECKPOINTS and path.name.isdigit()
        and (path.parent.parent / "config.json").is_file()):  # that step of its workdir
      if step is not None and step != int(path.name):
        raise UserError(f"{path} is step {path.name} but step={step} was asked; give the"
                        " workdir")
      path, step = path.parent.parent, int(path.name)
    elif step is not None:
      raise UserError(f"{path} is one checkpoint; step={step} applies to a workdir: drop it")
    else:
      alone = True
  if not alone and not (path / "config.json").is_file():
    raise UserError(f"{path} has no config.json: give a dlm workdir or a Hugging Face model"
                    " folder")
  if is_hf_folder(path):
    from dlm.convert import families, hf
    fam, model, hf_cfg, params = hf.load_params(path)
    ids = fam.special_ids(hf_cfg)
    config = ml_collections.ConfigDict(families.dlm_config(
        fam.name, model, hf_cfg, ids, str(path), str(params["embed"].dtype)))
    model_cfg, process = build(config, int(config.model.vocab_size), ids["mask"])
    graphdef = transformer.param_logical_specs(model_cfg)[0]
    params, step, weights, tok = _cast(params, dtype), 0, "params", None
  else:
    meta = checkpoint.read_step_meta(path, trust_config_code=trust_config_code) if alone else None
    config = ml_collections.ConfigDict(meta["config"] if alone else checkpoint.read_config(
        path, trust_config_code=trust_config_code))
    tok_dir = _meta_tokenizer_dir(path, meta) if alone else path
    tok = None
    if "hf" in config:  # converted: ids and the parameters' dtype in the config
      ids = dict(config.hf.ids)
      vocab, stored = int(config.model.vocab_size), config.hf.get("param_dtype")
    else:  # trained by dlm: its sentencepiece model names the special ids
      tok = None if tok_dir is None else hf_tokenizer.load_any_tokenizer(tok_dir)
      if tok is None:
        raise UserError(f"{path} has no tokenizer.model; copy it from the run's workdir (or"
                        " a checkpoint's meta item)")
      ids = {"mask": tok.mask_id, "eos": tok.eos_id, "pad": tok.pad_id, "bos": tok.bos_id}
      vocab, stored = tok.vocab_size, None
    model_cfg, process = build(config, vocab, ids["mask"])
    graphdef, abstract, _ = transformer.param_logical_specs(model_cfg)
    want = jnp.dtype(dtype or stored or "float32")
    if stored is not None or dtype is not None:
      abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, want), abstract)
    if ema is None:  # from the config, not the checkpoint's metadata: a lost file is an error
      ema = float(config.get("train", {}).get("ema_decay", 0.0) or 0.0) > 0
    base = None
    if model_cfg.lora_rank:  # adapters here, the frozen base where the run recorded it
      if alone:
        raise UserError(f"{path} is one checkpoint of a LoRA run: its adapters need the base"
                        " model; load the run's workdir, or `dlm export` it merged")
      abstract, base = lora.split(abstract)[1], _lora_base(config, abstract, path)
    if alone:
      step, params = checkpoint.restore_step_folder(path, abstract, ema=ema)
    else:
      step, params = checkpoint.restore_params(path, abstract, step, ema=ema)
    if base is not None:
      params = lora.combine(base, params)
    params, weights = _cast(params, dtype), "ema_params" if ema else "params"
    path = tok_dir
  if tok is None and path is not None:
    tok = hf_tokenizer.load_any_tokenizer(path, vocab_size=model_cfg.vocab_size,
                                          **{f"{k}_id": v for k, v in ids.items()})
  model = DiffusionLM(config=config, model_cfg=model_cfg, params=params, ids=ids, tokenizer=tok,
                      apply=transformer.apply_fn(graphdef), process=process, step=step,
                      weights=weights)
  return model if mesh is None else shard(model, mesh)
