"""The lm-evaluation-harness model ``dlm`` (the optional extra ``eval``): any model ``dlm`` loads,
scored by ``dlm.eval.likelihood`` and generating through the sampling engine.

Importing this module registers ``dlm`` in lm_eval's model registry;
``dlm harness --model_args=pretrained=DIR,sampler=fast_dllm --tasks=...`` runs
``lm_eval.simple_evaluate`` with it (``evaluate`` below).

Model args: ``pretrained`` (a dlm workdir, converted workdir or Hugging Face LLaDA/Dream
folder) and LLaDA's evaluation harness's knobs under its names and defaults (eval_llada.py:
``mc_num=128``, ``batch_size=32``, ``cfg=0.0``, ``is_check_greedy=True``, ``max_length=4096``,
``mask_id``, ``device``; with its sampler, ``steps``, ``gen_length``, ``block_length`` = 1024 and
``remasking="low_confidence"``), plus ``sampler`` (default: the model's own), any knob of that
sampler (``threshold=0.9``, ...), ``seed=0``, ``prompt_bucket=16``, ``dtype=float32`` and
``trust_config_code=False``.  An unknown arg is one line listing these.

* ``loglikelihood``: ``model.log_likelihood`` of (context, continuation) token ids, split as
  LLaDA's harness and lm_eval's TemplateLM do (the context's trailing spaces go to the
  continuation; the continuation is what encoding the whole adds after the context); a context
  longer than ``max_length`` keeps its last tokens.  ``is_greedy``: for masked diffusion LLaDA's
  ``suffix_greedy_prediction`` (the answer decoded one most-confident token per step from the
  prompt; here the ``llada`` sampler with steps = gen_length = block_length = its length,
  temperature 0), for autoregressive models argmax at every position.
* ``loglikelihood_rolling``: lm_eval's disjoint rolling windows, each scored as a pair.
* ``generate_until``: ``model.generate`` with the sampler's knobs (temperature 0 unless given),
  the output cut at the first stop sequence.

Imported models get their BOS id before every context (LLaDA and Llama tokenizers add it);
an autoregressive model with an empty context is given EOS (lm_eval's prefix token).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from dlm.errors import UserError

# LLaDA's evaluation harness (eval_llada.py), its names and defaults
LLADA_ARGS = {"mc_num": 128, "batch_size": 32, "cfg": 0.0, "is_check_greedy": True,
              "max_length": 4096, "mask_id": None, "device": None}
LLADA_SAMPLER_DEFAULTS = {"steps": 1024, "gen_length": 1024, "block_length": 1024,
                          "remasking": "low_confidence"}
DLM_ARGS = {"pretrained": None, "sampler": None, "seed": 0, "prompt_bucket": 16,
            "dtype": "float32", "trust_config_code": False, "max_batch_size": None}


@register_model("dlm")
class DLMEvalHarness(LM):
  """lm_eval's LM over a loaded dlm model (``DiffusionLM``)."""

  def __init__(self, pretrained: str | None = None, **kwargs: Any):
    super().__init__()
    from dlm.models import loader
    from dlm.sample import engine
    if not pretrained:
      raise UserError("the dlm model needs --model_args=pretrained=DIR (a dlm workdir or a"
                      " Hugging Face LLaDA/Dream folder)")
    args = {**LLADA_ARGS, **{k: v for k, v in DLM_ARGS.items() if k != "pretrained"}}
    own = {k: kwargs.pop(k) for k in list(kwargs) if k in args}
    args.update(own)
    self.model = loader.load(pretrained, dtype=args["dtype"],
                             trust_config_code=bool(args["trust_config_code"]))
    self.pretrained = str(pretrained)
    m = self.model
    self.sampler = str(args["sampler"] or engine.default_sampler(m))
    make = engine.resolve(self.sampler)
    knobs = dict(LLADA_SAMPLER_DEFAULTS) if self.sampler == "llada" else {}
    if self.sampler == "llada":
      knobs["cfg_scale"] = float(args["cfg"])
    unknown = sorted(set(kwargs) - set(make.knobs))
    if unknown:
      raise UserError(
          f"lm_eval model arg {', '.join(map(repr, unknown))} is not one of dlm's"
          f" ({', '.join(['pretrained'] + sorted(args))}) nor a knob of sampler"
          f" {self.sampler!r} ({engine.describe(make)})")
    knobs.update(kwargs)
    if "temperature" in make.knobs:
      knobs.setdefault("temperature", 0.0)  # lm_eval's generate_until is greedy
    self.knobs = engine.check_knobs(self.sampler, make, knobs)
    self.length_knob = make.length
    self.given = set(kwargs) | (set(LLADA_SAMPLER_DEFAULTS) if self.sampler == "llada" else set())
    self.prompt_bucket = int(args["prompt_bucket"]) if make.pads else 0
    self.mc_num, self.batch_size = int(args["mc_num"]), int(args["batch_size"])
    self.cfg, self.seed = float(args["cfg"]), int(args["seed"])
    self.is_check_greedy = bool(args["is_check_greedy"])
    mask = m.ids.get("mask")
    if args["mask_id"] is not None and mask is not None and int(args["mask_id"]) != int(mask):
      raise UserError(f"mask_id={args['mask_id']} but this model's mask id is {mask}; leave"
                      " mask_id out (it is read from the model)")
    context = engine.model_context(m)
    self.max_length = min(int(args["max_length"]), context) if context else int(args["max_length"])
    self.tok = m.tokenizer
    if self.tok is None:
      raise UserError(f"{pretrained} has no tokenizer (tokenizer.model or tokenizer.json);"
                      " lm_eval scores text")
    self.causal = m.model_cfg.mask_kind == "causal"
    imported = hasattr(m.config, "get") and "hf" in m.config
    self.bos = m.ids.get("bos") if imported else None
    self.args = {"pretrained": self.pretrained, "sampler": self.sampler, **{
        k: args[k] for k in ("mc_num", "batch_size", "cfg", "is_check_greedy", "seed",
                             "prompt_bucket", "dtype")}, "max_length": self.max_length,
                 "knobs": self.knobs}

  # ------------------------------------------------------------------ text --
  def _encode(self, text: str) -> list[int]:
    return list(self.tok.encode(text)) if text else []

  def _prefix(self, ids: list[int]) -> list[int]:
    if self.bos is not None and (not ids or ids[0] != self.bos):
      ids = [int(self.bos)] + ids
    if self.causal and not ids:
      ids = [int(self.model.ids.get("eos") if self.model.ids.get("eos") is not None else 0)]
    return ids

  def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as LLaDA's harness and lm_eval's TemplateLM split them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
      continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
    whole, ctx = self._encode(context + continuation), self._encode(context)
    cont = whole[len(ctx):]
    ctx = self._prefix(ctx)
    keep = max(self.max_length - len(cont), 1 if self.causal else 0)
    return (ctx[len(ctx) - keep:] if keep else []), cont

  # -------------------------------------------------------------- requests --
  def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False
                    ) -> list[tuple[float, bool]]:
    pairs = [self.encode_pair(*r.args) for r in requests]
    out = self._score(pairs, greedy=self.is_check_greedy, progress=not disable_tqdm)
    for r, o in zip(requests, out):
      self.cache_hook.add_partial("loglikelihood", r.args, o)
    return out

  def _score(self, pairs: list[tuple[list[int], list[int]]], *, greedy: bool,
             progress: bool) -> list[tuple[float, bool]]:
    if not pairs:
      return []
    for i, (_, cont) in enumerate(pairs):
      if len(cont) > self.max_length - (1 if self.causal else 0):
        raise UserError(f"request {i}: its continuation is {len(cont)} tokens, longer than the"
                        f" context of {self.max_length}; shorten the task's answers")
    res = self.model.log_likelihood([p for p, _ in pairs], [a for _, a in pairs],
                                    num_samples=self.mc_num, batch_size=self.batch_size,
                                    seed=self.seed, cfg_scale=self.cfg, progress=progress)
    flags = [self._is_greedy(p, a) if greedy else False for p, a in pairs]
    return [(float(v), bool(g)) for v, g in zip(res.log_likelihood, flags)]

  def _is_greedy(self, prompt: list[int], answer: list[int]) -> bool:
    m = self.model
    if self.causal:  # greedy decoding is the argmax at every answer position
      logits = m.logits(np.asarray([prompt + answer], np.int32))  # jitted once per length
      best = logits[0, len(prompt) - 1:len(prompt) + len(answer) - 1].argmax(-1)
      return bool(np.array_equal(best, answer))
    n, bucket = len(answer), self.prompt_bucket
    if m.model_cfg.mask_kind == "bd3":  # whole blocks, greedy; the first n tokens compared
      from dlm.sample import engine
      name = engine.default_sampler(m)
      make = engine.resolve(name)
      bs = int(m.model_cfg.block_size)
      knobs = {make.length: -(-n // bs) * bs,
               **({"temperature": 0.0} if "temperature" in make.knobs else {})}
      bucket = 0  # the model's own block bucketing
    else:
      name, knobs = "llada", {"steps": n, "gen_length": n, "block_length": n, "temperature": 0.0,
                              "remasking": "low_confidence", "cfg_scale": self.cfg}
    out = m.generate(np.asarray([prompt], np.int32), sampler=name, seed=self.seed,
                     prompt_bucket=bucket, **knobs)
    return bool(np.array_equal(out.sequences[0, len(prompt):len(prompt) + n], answer))

  def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False
                            ) -> list[float]:
    from lm_eval import utils as lm_utils
    eos = self.model.ids.get("eos")
    prefix = int(self.bos if self.bos is not None else eos if eos is not None else 0)
    out = []
    for r in requests:
      (text,) = r.args
      windows = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
          self._encode(text), prefix, max(self.max_length - 1, 1), 1)]
      scores = self._score([(list(c), list(a)) for c, a in windows], greedy=False,
                           progress=False) if windows else []
      total = float(sum(s for s, _ in scores))
      self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
      out.append(total)
    return out

  def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
    from tqdm import tqdm
    out = []
    for r in tqdm(requests, desc="generate_until", disable=disable_tqdm):
      context, gen_kwargs = r.args
      until = gen_kwargs.get("until") or []
      until = [until] if isinstance(until, str) else list(until)
      knobs = dict(self.knobs)
      if self.length_knob and self.length_knob not in self.given and gen_kwargs.get(
          "max_gen_toks"):
        knobs[self.length_knob] = int(gen_kwargs["max_gen_toks"])
      gen = int(knobs.get(self.length_knob, 0) or 0)
      if gen >= self.max_length:
        raise UserError(f"{self.length_knob}={gen} is longer than the context of"
                        f" {self.max_length}; lower it in --model_args")
      ids = self._prefix(self._encode(context))
      ids = ids[max(len(ids) - (self.max_length - gen), 0):]
      res = self.model.generate(np.asarray([ids], np.int32), sampler=self.sampler,
                                seed=self.seed, prompt_bucket=self.prompt_bucket, **knobs)
      text = self.tok.decode(res.token_ids[0])
      for stop in until:
        if stop and stop in text:
          text = text.split(stop)[0]
      self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
      out.append(text)
    return out

  @property
  def tokenizer_name(self) -> str:
    return f"dlm:{self.pretrained}"


def parse_model_args(text: str) -> dict[str, Any]:
  """``key=value,key=value`` as lm_eval parses it (numbers and booleans typed)."""
  from lm_eval import utils as lm_utils
  for item in filter(None, text.split(",")):
    if "=" not in item:
      raise UserError(f"--model_args item {item!r} is not key=value; write e.g."
                      " pretrained=runs/quickstart,sampler=llada")
  return lm_utils.simple_parse_args_string(text)


def evaluate(model_args: str | dict[str, Any], tasks: list[str], *,
             include_path: str | None = None, num_fewshot: int | None = None,
             limit: float | None = None, log_samples: bool = True,
             trust_config_code: bool = False) -> dict[str, Any]:
  """``lm_eval.simple_evaluate`` with the ``dlm`` model; the results gain ``dlm``: the run's
  provenance (model, sampler, knobs, seed, precision, code version)."""
  import lm_eval
  from lm_eval.tasks import TaskManager

  from dlm.eval import provenance
  args = parse_model_args(model_args) if isinstance(model_args, str) else dict(model_args)
  if trust_config_code:
    args["trust_config_code"] = True
  lm = DLMEvalHarness(**args)
  if include_path is not None and not pathlib.Path(include_path).is_dir():
    raise UserError(f"--include_path={include_path} is not a folder of task YAML files")
  manager = TaskManager(include_path=include_path)
  missing = [t for t in tasks if t not in manager.all_tasks]
  if missing:
    raise UserError(f"unknown lm_eval task {', '.join(map(repr, missing))}; define it in a YAML"
                    " under --include_path (no data is downloaded here) or list them with"
                    " `lm_eval ls tasks`")
  results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                    log_samples=log_samples, task_manager=manager,
                                    random_seed=lm.seed, numpy_random_seed=lm.seed)
  results["dlm"] = provenance.record(lm.model, sampler=lm.sampler, knobs=lm.knobs,
                                     seed=lm.seed, path=lm.pretrained,
                                     extra={"model_args": lm.args})
  return json.loads(json.dumps(results, default=_jsonable))


def _jsonable(x: Any) -> Any:
  if isinstance(x, (np.integer, np.floating)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)
