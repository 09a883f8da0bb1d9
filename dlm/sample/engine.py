"""One sampling engine: every sampler is a registered factory over one state, run by one loop.

The contract (``make(denoiser, process, **knobs) -> Sampler``):

* ``denoiser`` is a ``Denoiser``: the network with its weights bound, called with
  the one denoiser contract of training and sampling, ``denoiser(x_t, t,
  attention_mask=None, segment_ids=None, positions=None, cache=None,
  cache_start=None, fill_cache=False) -> (logits [B, W, V] float32, cache)``, plus
  the model's special ids.  ``t`` may be None for models without time conditioning.
* ``process`` is the model's forward process (``dlm.processes``).
* ``Sampler(init, step, done)``: ``init(rng, given, fixed, attention_mask)``
  builds a ``State``; ``step`` makes one or more denoiser calls; ``done`` says
  when to stop.  ``run`` is the only loop (``lax.while_loop`` under ``jit``).
* The factory declares its knobs (``register(name, knobs={...})``): each with a
  default and a one-line doc.  ``check_knobs`` turns an unknown knob into one
  line that lists the sampler's knobs.

``sample`` (a template: given tokens and which are fixed) and ``generate`` (a
prompt continued by ``gen_length`` tokens) are the entry points that
``dlm sample`` and ``DiffusionLM.generate`` call; the compiled loop is kept on
the model per sampler, knobs and shapes.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dlm import parallel
from dlm.errors import UserError
from dlm.registry import Registry

Array = jax.Array


@flax.struct.dataclass
class State:
  """What every sampler carries; a sampler's own fields (KV cache, block index, ...) go in aux."""
  x: Array  # int32 [B, L]: the current sequence x_t (float [B, L, D]: continuous states)
  given: Array  # int32 [B, L]: the template's tokens (float [B, L, D]: their clamped vectors)
  fixed: Array  # bool [B, L]: positions that never change
  committed_at: Array  # int32 [B, L]: the call (nfe index) that last set each position; -1 given
  nfe: Array  # int32 []: denoiser calls so far
  rng: Array  # key
  aux: dict[str, Any] = flax.struct.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Sampler:
  init: Callable[[Array, Array, Array, Array | None], State]
  step: Callable[[State], State]
  done: Callable[[State], Array]


@dataclasses.dataclass(frozen=True)
class Knob:
  default: Any
  doc: str


@dataclasses.dataclass(frozen=True)
class Denoiser:
  """The network as samplers see it: weights bound, special ids and what it conditions on."""
  fn: Callable[..., tuple[Array, Any]]
  mask_id: int
  vocab_size: int
  uses_t: bool = False  # time-conditioned (needs t); False allows MDLM's denoiser cache
  eos_id: int | None = None
  eot_id: int | None = None
  shifted: bool = False  # logits at i come from output i-1 (Dream): no KV-cached window passes
  causal: bool = False  # an autoregressive model (causal attention): only the `ar` sampler
  pad_id: int | None = None
  block_size: int = 0  # a BD3-LM model's block (mask_kind "bd3"), else 0
  context: int = 0  # the sequence length it was trained on (data.seq_len), 0 if unknown

  def __call__(self, x_t: Array, t: Array | None = None, **kw: Any) -> tuple[Array, Any]:
    """The denoiser contract (``Transformer.__call__``): keywords attention_mask, segment_ids,
    positions, cache, cache_start, fill_cache -> (logits, cache)."""
    return self.fn(x_t, t, **kw)


def denoiser_of_apply(apply: Callable[..., Any], params: Any, **ids: Any) -> Denoiser:
  """A ``Denoiser`` over ``apply(params, x_t, t, **kw) -> (logits, cache)`` with ``params`` bound."""
  return Denoiser(fn=functools.partial(apply, params), **ids)


def denoiser_of_logits(logits_fn: Callable[[Array, Array], Array], *, mask_id: int,
                       vocab_size: int, uses_t: bool = True) -> Denoiser:
  """A ``Denoiser`` over a plain ``logits_fn(x_t, t)`` (exact test denoisers, research code)."""

  def fn(x_t, t, *, attention_mask=None, cache=None, fill_cache=False, **kw):
    if attention_mask is not None or cache is not None or fill_cache or any(
        v is not None for v in kw.values()):
      raise UserError("this denoiser is a plain logits_fn(x_t, t): it takes no attention_mask"
                      " or KV cache; use a sampler without padding or caching")
    return logits_fn(x_t, t), None

  return Denoiser(fn=fn, mask_id=mask_id, vocab_size=vocab_size, uses_t=uses_t)


SAMPLERS: Registry[Callable[..., Sampler]] = Registry("sampler")


def register(name: str, *, knobs: dict[str, Knob], length: str | None = "gen_length",
             pads: bool = True, infill: bool = False, causal: bool = False, doc: str = "",
             kinds: tuple[str, ...] | None = None, params: tuple[str, ...] = ("x0",)
             ) -> Callable[[Callable[..., Sampler]], Callable[..., Sampler]]:
  """Registers a sampler factory with its knobs.

  ``length``: the knob that sizes the generation after a prompt (``generate``);
  ``pads``: takes left-padded batches (an attention mask); ``infill``: takes any
  template of fixed positions (``sample``), not only a prompt followed by masks;
  ``causal``: decodes autoregressive models (causal attention), not diffusion models;
  ``kinds``: the process kinds it denoises (``dlm.processes.base.KINDS``; None: any);
  ``params``: the parameterizations of the denoiser's output it reads (x0, score, noise).
  """
  def deco(make: Callable[..., Sampler]) -> Callable[..., Sampler]:
    declare(make, knobs=knobs, length=length, pads=pads, infill=infill, causal=causal,
            kinds=kinds, params=params)
    return SAMPLERS.register(name)(make)
  return deco


def declare(make: Callable[..., Sampler], *, knobs: dict[str, Knob],
            length: str | None = "gen_length", pads: bool = True, infill: bool = False,
            causal: bool = False, kinds: tuple[str, ...] | None = None,
            params: tuple[str, ...] | None = None) -> None:
  """Attaches the knob table to a factory (``register`` without a registry name, for
  ``module:function`` samplers)."""
  make.knobs = dict(knobs)  # type: ignore[attr-defined]
  make.length = length  # type: ignore[attr-defined]
  make.pads = pads  # type: ignore[attr-defined]
  make.infill = infill  # type: ignore[attr-defined]
  make.causal = causal  # type: ignore[attr-defined]
  make.kinds = None if kinds is None else tuple(kinds)  # type: ignore[attr-defined]
  make.params = None if params is None else tuple(params)  # type: ignore[attr-defined]


def check_sampler(model: Any, name: str, make: Callable[..., Sampler]) -> None:
  """One line when sampler ``name`` cannot run on ``model``: an AR model takes only causal
  samplers, and a sampler takes only the process kinds it declares."""
  check_model_kind(name, make, model.model_cfg.mask_kind == "causal")
  from dlm.processes import base
  process = _process(model)
  kind, param = base.describe(process)

  def takes(m: Any) -> bool:
    kinds, params = getattr(m, "kinds", None), getattr(m, "params", None)
    return (kinds is None or kind in kinds) and (params is None or param in params)

  if not takes(make):  # name the built-in samplers that do take it
    fits = [n for n in names()
            if getattr(SAMPLERS.get(n), "kinds", None) and takes(SAMPLERS.get(n))]
    base.check_takes("sampler", name, getattr(make, "kinds", None), process,
                     f"use sampler={' or '.join(map(repr, fits))}" if fits else "",
                     params=getattr(make, "params", None))


def check_model_kind(name: str, make: Callable[..., Sampler], causal: bool) -> None:
  """An autoregressive model takes only causal samplers, a diffusion model only the others."""
  if bool(getattr(make, "causal", False)) == causal:
    return
  if causal:
    raise UserError(f"sampler {name!r} denoises a diffusion model; this model is autoregressive"
                    " (causal attention): use sampler='ar'")
  raise UserError(f"sampler {name!r} decodes autoregressive models; this one is a diffusion"
                  " model: use its own sampler (config.sample.sampler, e.g. 'llada')")


def _builtins() -> None:
  from dlm.sample import (ar, bd3, dream, fast_dllm, gaussian, llada, samplers,  # noqa: F401
                          sedd)  # (register)


def names() -> list[str]:
  """The registered samplers' names (built-ins included)."""
  _builtins()
  return SAMPLERS.names()


def resolve(name: str) -> Callable[..., Sampler]:
  """The factory of a registered name or a ``module:function``; one line if it is not a sampler."""
  _builtins()
  if not isinstance(name, str) or not name:
    raise UserError(f"sampler must be a name, got {name!r}; known: {', '.join(SAMPLERS.names())}")
  try:
    make = SAMPLERS.get(name)
  except ValueError as e:
    raise UserError(str(e)) from None
  if not callable(make) or not isinstance(getattr(make, "knobs", None), dict):
    raise UserError(f"sampler {name!r} is not a dlm sampler factory: decorate it with"
                    " dlm.sample.engine.register(...) (or engine.declare) to give it its knobs")
  return make


def describe(make: Callable[..., Sampler]) -> str:
  return ", ".join(f"{k}={v.default!r}" for k, v in make.knobs.items())


def check_knobs(name: str, make: Callable[..., Sampler], knobs: dict[str, Any]) -> dict[str, Any]:
  """The knobs with their defaults filled in; an unknown one is one line listing the sampler's."""
  unknown = sorted(set(knobs) - set(make.knobs))
  if unknown:
    raise UserError(f"sampler {name!r} takes no knob {', '.join(map(repr, unknown))}; its knobs:"
                    f" {describe(make)}")
  return {k: knobs.get(k, v.default) for k, v in make.knobs.items()}


def run(sampler: Sampler, rng: Array, given: Array, fixed: Array,
        attention_mask: Array | None = None) -> State:
  """The loop every sampler runs in; call under ``jax.jit`` (knobs are static)."""
  if not jnp.issubdtype(given.dtype, jnp.floating):  # token ids; float: continuous states
    chex.assert_type(given, jnp.int32)
  chex.assert_equal_shape_prefix([given, fixed], 2)
  state = sampler.init(rng, given, fixed, attention_mask)
  return jax.lax.while_loop(lambda s: ~sampler.done(s), sampler.step, state)


def initial_state(rng: Array, given: Array, fixed: Array, x: Array, **aux: Any) -> State:
  """A ``State`` at call 0 with ``x`` as the starting sequence (given tokens clamped in).

  ``x`` int [B, L] is token ids (kept int32); float [B, L, D] is continuous states (embedding
  diffusion), ``given`` then the clamped positions' vectors [B, L, D]."""
  if jnp.issubdtype(x.dtype, jnp.floating):
    x = jnp.where(fixed[..., None] if x.ndim == fixed.ndim + 1 else fixed, given, x)
  else:
    x = jnp.where(fixed, given, x).astype(jnp.int32)
  return State(x=x, given=given, fixed=fixed,
               committed_at=jnp.full(fixed.shape, -1, jnp.int32), nfe=jnp.zeros((), jnp.int32),
               rng=rng, aux=aux)


# ------------------------------------------------------------------ entry points --


@dataclasses.dataclass
class Output:
  sequences: np.ndarray  # int32 [B, L]: prompt (or template) and what was generated
  nfe: int  # denoiser calls
  committed_at: np.ndarray  # int32 [B, L]: the call that committed each position (-1 given)
  token_ids: list[list[int]] | None = None  # each row's generated ids, cut at the first EOS
  texts: list[str] | None = None  # those ids decoded (with a tokenizer)


def _process(model: Any) -> Any:
  """The model's process (the loader sets it), else one made from its config and kept."""
  if getattr(model, "process", None) is not None:
    return model.process
  from dlm import processes
  kept = model.__dict__.get("_process")
  if kept is None:
    kept = processes.make_process(model.config.process, vocab_size=model.model_cfg.vocab_size,
                                  mask_id=model.ids["mask"])
    model.__dict__["_process"] = kept
  return kept


def bind(process: Any, params: Any) -> Any:
  """The process with the parameters it reads from the model's (``dlm.processes.bind``)."""
  from dlm import processes
  return processes.bind(process, params)


def _ids(model: Any) -> dict[str, Any]:
  ids = model.ids
  return dict(mask_id=ids["mask"], vocab_size=model.model_cfg.vocab_size,
              uses_t=bool(model.model_cfg.time_conditioning), eos_id=ids.get("eos"),
              eot_id=ids.get("eot"), shifted=bool(model.model_cfg.shift_logits),
              causal=model.model_cfg.mask_kind == "causal", pad_id=ids.get("pad"),
              block_size=model.model_cfg.block_size if model.model_cfg.mask_kind == "bd3" else 0,
              context=model_context(model))


def model_context(model: Any) -> int:
  """The training context (``config.data.seq_len``) of a workdir's model, else 0."""
  data = model.config.get("data") if hasattr(model.config, "get") else None
  seq_len = data.get("seq_len") if hasattr(data, "get") else None
  return int(seq_len) if isinstance(seq_len, int) and seq_len > 0 else 0


def default_sampler(model: Any) -> str:
  """The model's own sampler: ``config.sample.sampler``, else its family's (llada, dream)."""
  sample = model.config.get("sample") if hasattr(model.config, "get") else None
  if sample is not None and sample.get("sampler"):
    return sample.sampler
  if model.model_cfg.mask_kind == "causal":
    return "ar"
  if model.model_cfg.mask_kind == "bd3":
    return "bd3"
  family = model.config.get("hf", {}).get("family") if "hf" in model.config else None
  return {"dream": "dream"}.get(family, "llada")


def sample(model: Any, given: Any, fixed: Any, attention_mask: Any = None, *,
           sampler: str | None = None, seed: int = 0, rng: Array | None = None,
           **knobs: Any) -> Output:
  """Runs a sampler on a template (``given`` tokens, ``fixed`` positions) of a loaded model."""
  name = sampler or default_sampler(model)
  make = resolve(name)
  full = check_knobs(name, make, knobs)
  check_sampler(model, name, make)
  given = np.asarray(given, np.int32)
  fixed = np.asarray(fixed, bool)
  if given.ndim == 1:
    given, fixed = given[None], fixed[None]
  mesh = getattr(model, "mesh", None)
  multi = mesh is not None and parallel.spans_processes(mesh)
  am = None
  if attention_mask is not None:
    am = np.asarray(attention_mask, np.int32)
    if am.shape != given.shape:
      raise UserError(f"attention_mask shape {am.shape} != the sequences' {given.shape}")
    if np.all(am) and not (make.pads and multi):
      # no padding: no mask (it would cost a select in every attention layer); on several
      # hosts every process must compile the same program, so a given mask is kept
      am = None
    elif not np.all(am) and not make.pads:
      raise UserError(f"sampler {name!r} takes prompts of one length (no padding); use"
                      " sampler='llada' or 'dream', or one prompt at a time")
  fn = program(model, name, make, full, batch=given.shape[0] * (jax.process_count() if multi
                                                                  else 1), padded=am is not None)
  key = jax.random.key(seed) if rng is None else rng
  if multi:  # multi-host: this process's rows of one global batch (every process calls this)
    rows = row_sharding(model)
    put = lambda a: jax.make_array_from_process_local_data(rows, a)  # noqa: E731
    x, nfe, committed_at = fn(model.sampling_params(), key, put(given), put(fixed),
                              None if am is None else put(am))
    x, committed_at = parallel.local_rows(x), parallel.local_rows(committed_at)
    nfe = nfe.addressable_data(0)
  else:
    x, nfe, committed_at = fn(model.sampling_params(), key, jnp.asarray(given),
                              jnp.asarray(fixed), None if am is None else jnp.asarray(am))
  seqs, committed_at = np.asarray(x), np.asarray(committed_at)
  # columns after the last one any row reached (every row stopped early: EOS) are cut
  reached = fixed.any(0) | (committed_at >= 0).any(0)
  end = int(np.flatnonzero(reached)[-1]) + 1 if reached.any() else seqs.shape[1]
  seqs, committed_at, fixed = seqs[:, :end], committed_at[:, :end], fixed[:, :end]
  tok = getattr(model, "tokenizer", None)
  gen = _generated(seqs, fixed, model.ids.get("eos") if tok is None else tok.eos_id)
  return Output(sequences=seqs, nfe=int(nfe), committed_at=committed_at,
                token_ids=gen, texts=None if tok is None else [tok.decode(g) for g in gen])


def program(model: Any, name: str, make: Callable[..., Sampler], full: dict[str, Any], *,
            batch: int, padded: bool) -> Any:
  """The jitted sampler loop of a loaded model, made once per sampler, knobs and ids:
  ``fn(params, key, given, fixed, attention_mask) -> (x, nfe, committed_at)``.

  On a mesh (``loader.shard``) the shardings are explicit both ways: prompts and outputs
  over ``data``, parameters as placed (``fsdp``, ``tensor``), the key and nfe replicated.
  Only the sequences leave the loop (a sampler's KV cache and confidences stay inside).
  ``dlm compile --what=sample`` lowers this same function with abstract inputs.
  """
  prepare, apply = model.sampling
  process = _process(model)
  ids = _ids(model)

  def build() -> Callable[..., tuple[Array, Array, Array]]:
    def fn(params: Any, key: Array, g: Array, f: Array, a: Array | None):
      params = prepare(params)
      final = run(make(denoiser_of_apply(apply, params, **ids), bind(process, params), **full),
                  key, g, f, a)
      return final.x, final.nfe, final.committed_at
    return fn

  # params are an argument, not a closure: no weight constants baked into the program
  # the ids are part of the program (mask id, EOS flags): a change to model.ids recompiles
  jit_kw = {}
  mesh = getattr(model, "mesh", None)
  if mesh is not None:  # prompts over `batch`'s axes, parameters as placed (fsdp, tensor)
    from jax.sharding import NamedSharding, PartitionSpec as P
    row, one = row_sharding(model), NamedSharding(mesh, P())
    axes, shards = row_axes(row)
    if batch % shards:
      raise UserError(f"a batch of {batch} rows does not divide over the mesh's"
                      f" {'x'.join(f'{a}={mesh.shape[a]}' for a in axes if a)}; give a multiple"
                      f" of {shards} rows or a smaller mesh data size")
    jit_kw = dict(in_shardings=(model.param_shardings, one, row, row, row if padded else None),
                  out_shardings=(row, one, row))
  key = dict(full, _ids=tuple(sorted(ids.items())), _padded=padded and mesh is not None)
  return model.jitted(name, key, build, **jit_kw)


def slot_programs(model: Any, name: str, make: Callable[..., Sampler], full: dict[str, Any], *,
                  slots: int, width: int, padded: bool) -> tuple[Any, Any, Any]:
  """Continuous batching on the one contract: ``slots`` independent copies of a sampler, each
  its own batch-of-one ``State`` (``jax.vmap`` over a leading slot axis), so a slot can start a
  new request while the others are mid-way, at any step, block-wise samplers included.

  Returns jitted ``(empty, admit, advance)``:

  * ``empty(params, given [S, W], fixed, am) -> states``: every slot initialised (blank);
  * ``admit(params, states, j, key, given [W], fixed, am) -> states``: slot ``j`` restarted on
    a new template with its own key (the state ``run`` would start from on that one row);
  * ``advance(params, states, active [S]) -> (states, x [S, W], committed_at, done, nfe)``:
    one ``step`` of every active slot that is not ``done`` (the others are left as they are).

  A slot's tokens equal ``run`` on its row alone with the same key: the same init, the same
  steps.  ``am`` is the attention mask of left-padded rows (``padded``), else ignored.  On a
  mesh the slots lie over the sampling rules' batch axes and the parameters as placed.
  """
  prepare, apply = model.sampling
  process = _process(model)
  ids = _ids(model)

  def sampler(params: Any) -> Sampler:
    return make(denoiser_of_apply(apply, params, **ids), bind(process, params), **full)

  def init_one(smp: Sampler, key: Array, g: Array, f: Array, a: Array) -> State:
    return smp.init(key, g[None], f[None], a[None] if padded else None)

  def build_empty() -> Callable[..., State]:
    def empty(params: Any, g: Array, f: Array, a: Array) -> State:
      smp = sampler(prepare(params))
      keys = jax.random.split(jax.random.key(0), g.shape[0])
      return jax.vmap(functools.partial(init_one, smp))(keys, g, f, a)
    return empty

  def build_admit() -> Callable[..., State]:
    def admit(params: Any, states: State, j: Array, key: Array, g: Array, f: Array,
              a: Array) -> State:
      one = init_one(sampler(prepare(params)), key, g, f, a)
      return jax.tree.map(lambda all_, x: jax.lax.dynamic_update_index_in_dim(all_, x, j, 0),
                          states, one)
    return admit

  def build_advance() -> Callable[..., Any]:
    def advance(params: Any, states: State, active: Array):
      smp = sampler(prepare(params))

      def one(s: State, go: Array) -> State:
        return jax.lax.cond(go & ~smp.done(s), smp.step, lambda s: s, s)

      states = jax.vmap(one)(states, active)
      return (states, states.x[:, 0], states.committed_at[:, 0], jax.vmap(smp.done)(states),
              states.nfe)
    return advance

  key = dict(full, _ids=tuple(sorted(ids.items())), _slots=(slots, width, padded))
  made = []
  for part, build in (("empty", build_empty), ("admit", build_admit),
                      ("advance", build_advance)):
    made.append(model.jitted(f"{name}/slots/{part}", key, build, **_slot_shardings(model, part)))
  return tuple(made)


def _slot_shardings(model: Any, part: str) -> dict[str, Any]:
  """in/out shardings of a slot program on the model's mesh (none without a mesh): the slot
  axis of every state leaf over the rows' axes, the parameters as placed."""
  mesh = getattr(model, "mesh", None)
  if mesh is None:
    return {}
  from jax.sharding import NamedSharding, PartitionSpec as P
  rows = NamedSharding(mesh, P(row_sharding(model).spec[0]))  # leading (slot) axis only
  one = NamedSharding(mesh, P())
  if part == "empty":
    return dict(in_shardings=(model.param_shardings, rows, rows, rows), out_shardings=rows)
  if part == "admit":
    return dict(in_shardings=(model.param_shardings, rows, one, one, one, one, one),
                out_shardings=rows)
  return dict(in_shardings=(model.param_shardings, rows, rows), out_shardings=rows)


def row_sharding(model: Any) -> Any:
  """How a sampled batch's rows lie on the model's mesh: its rules' ``batch`` axes (a loaded
  model's sampling rules put them over ``data``; a training run's, e.g. GRPO rollouts, over
  ``data`` and ``fsdp``, as its train step does)."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  if getattr(model, "rules", None) is None:
    return NamedSharding(model.mesh, P("data", None))
  return parallel.batch_sharding(model.mesh, model.rules)


def row_axes(row: Any) -> tuple[tuple[str, ...], int]:
  """(mesh axes, shard count) of a row sharding's first dimension."""
  spec = row.spec[0] if isinstance(row.spec[0], tuple) else (row.spec[0],)
  axes = tuple(a for a in spec if a is not None)
  return axes, int(np.prod([row.mesh.shape[a] for a in axes]))


def _generated(seqs: np.ndarray, fixed: np.ndarray, eos_id: int | None) -> list[list[int]]:
  """Each row's generated ids (after the prompt; the whole row for infill templates), cut at EOS."""
  out = []
  for row, fix in zip(seqs.tolist(), fixed.tolist()):
    p = fix.index(False) if False in fix else len(fix)
    gen = row[p:] if not any(fix[p:]) else row  # a prompt then masks, else an infill template
    if eos_id is not None and eos_id in gen:
      gen = gen[:gen.index(eos_id)]
    out.append(gen)
  return out


def pad_id(model: Any) -> int:
  """What left-pads bucketed prompts (masked out of attention): pad, else EOS, else the mask."""
  for key in ("pad", "eos", "mask"):
    if model.ids.get(key) is not None:
      return int(model.ids[key])
  return 0


def blank_id(model: Any) -> int:
  """What fills the positions to generate: the mask id (an AR model has none: its pad)."""
  for key in ("mask", "pad", "eos"):
    if model.ids.get(key) is not None:
      return int(model.ids[key])
  return 0


def prompt_template(prompt: np.ndarray, attention_mask: Any, gen_length: int, mask_id: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """(given, fixed, attention_mask) of prompts [B, P] followed by ``gen_length`` masks."""
  b, p = prompt.shape
  given = np.concatenate([prompt, np.full((b, gen_length), mask_id, np.int32)], axis=1)
  fixed = np.concatenate([np.ones((b, p), bool), np.zeros((b, gen_length), bool)], axis=1)
  am = None
  if attention_mask is not None:
    am = np.asarray(attention_mask, np.int32)
    if am.shape != prompt.shape:
      raise UserError(f"attention_mask shape {am.shape} != prompt_ids {prompt.shape}")
    am = np.concatenate([am, np.ones((b, gen_length), np.int32)], axis=1)
  return given, fixed, am


def bucket_prompts(prompt: np.ndarray, attention_mask: Any, bucket: int, pad_id: int
                   ) -> tuple[np.ndarray, np.ndarray, int]:
  """Prompts [B, P] left-padded to the next multiple of ``bucket``: (prompt, mask, columns added).

  Every prompt length in ``(k - 1) * bucket, k * bucket]`` then shares one compiled loop.
  Left padding is masked out of attention and positions, so greedy decoding gives the same
  tokens (up to float rounding); stochastic draws differ, as the noise is drawn over the
  padded shape.
  """
  b, p = prompt.shape
  am = np.ones((b, p), np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
  if am.shape != prompt.shape:
    raise UserError(f"attention_mask shape {am.shape} != prompt_ids {prompt.shape}")
  k = -(-p // bucket) * bucket - p
  return (np.concatenate([np.full((b, k), pad_id, np.int32), prompt], axis=1),
          np.concatenate([np.zeros((b, k), np.int32), am], axis=1), k)


def generate(model: Any, prompt_ids: Any, attention_mask: Any = None, *,
             sampler: str | None = None, seed: int = 0, prompt_bucket: int = 0,
             **knobs: Any) -> Output:
  """Continues each prompt row by the sampler's length knob (``gen_length``, ``max_new_tokens``).

  ``prompt_bucket=N`` (N >= 1) left-pads prompts to a multiple of N tokens, so that prompt
  lengths share compiled programs (``bucket_prompts``); the outputs are cut back to the
  prompt as given.  0 (the default) compiles one program per prompt length.
  """
  name = sampler or default_sampler(model)
  make = resolve(name)
  full = check_knobs(name, make, knobs)
  if make.length is None:
    raise UserError(f"sampler {name!r} fills a template, not a prompt: use engine.sample")
  gen = full[make.length]
  if isinstance(gen, bool) or not isinstance(gen, (int, np.integer)) or gen < 1:
    raise UserError(f"{make.length}={gen!r} must be an integer >= 1")
  prompt = np.asarray(prompt_ids, np.int32)
  if prompt.ndim == 1:
    prompt = prompt[None]
  if prompt.ndim != 2:
    raise UserError(f"prompt_ids must be [batch, length], got shape {prompt.shape}")
  if isinstance(prompt_bucket, bool) or not isinstance(prompt_bucket, (int, np.integer)) or (
      prompt_bucket < 0):
    raise UserError(f"prompt_bucket={prompt_bucket!r} must be an integer >= 0 (0: no bucketing)")
  cut = 0
  if not prompt_bucket and model.model_cfg.mask_kind == "bd3":
    prompt_bucket = model.model_cfg.block_size  # block diffusion: prompts of whole blocks
  if prompt_bucket and prompt.shape[1] % prompt_bucket:
    if not make.pads:
      raise UserError(f"sampler {name!r} takes prompts of one length (no padding), so it cannot"
                      " bucket them: pass prompt_bucket=0")
    prompt, attention_mask, cut = bucket_prompts(prompt, attention_mask, int(prompt_bucket),
                                                 pad_id(model))
  given, fixed, am = prompt_template(prompt, attention_mask, int(gen), blank_id(model))
  out = sample(model, given, fixed, am, sampler=name, seed=seed, **knobs)
  if cut:
    out.sequences, out.committed_at = out.sequences[:, cut:], out.committed_at[:, cut:]
  return out
