"""The ``dlm`` command: ``dlm train | sample | eval | harness | serve | plot | convert | export |
tokenizer | compile``."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import sys
import time
from typing import Callable

from absl import flags
from ml_collections import config_flags

COMMANDS = ("train", "sample", "eval", "harness", "serve", "plot", "convert", "export",
            "tokenizer", "compile")
USAGE = f"usage: dlm {{{'|'.join(COMMANDS)}}} [--flags]; `dlm CMD --helpfull` lists a command's flags"


def _define_train_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/quickstart.py[:smoke].",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, tokenizer.")
  flags.DEFINE_string("init_from", None,
                      "A trained workdir whose parameters (and tokenizer) start this new run.")
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0, for multi-process runs (or $DLM_COORDINATOR_ADDRESS).")
  flags.DEFINE_integer("num_processes", None, "Processes in the job (or $DLM_NUM_PROCESSES).")
  flags.DEFINE_integer("process_id", None, "This process's id (or $DLM_PROCESS_ID).")
  flags.DEFINE_bool("distributed", False,
                    "Join a job JAX detects by itself (Cloud TPU pods, SLURM) without a coordinator.")


def _define_convert_flags() -> None:
  flags.DEFINE_enum("from", None, ["llada", "dream", "llama", "qwen2"], "The checkpoint family of --src.")
  flags.DEFINE_string("src", None, "A Hugging Face model folder: config.json, *.safetensors.")
  flags.DEFINE_string("workdir", None, "A new folder for the dlm workdir.")


def _define_export_flags() -> None:
  flags.DEFINE_string("workdir", None, "A dlm workdir (trained or converted).")
  flags.DEFINE_string("out", None, "A new folder for config.json and *.safetensors.")
  flags.DEFINE_integer("max_shard_gb", 5, "Largest safetensors shard, in GiB.")


def _define_sample_flags() -> None:
  flags.DEFINE_string("workdir", None, "A trained run's directory.")
  flags.DEFINE_string("hf", None, "Sample a Hugging Face LLaDA/Dream folder directly.")
  flags.DEFINE_bool("chat", False, "Wrap --prompt in the model's chat template (instruct models).")
  flags.DEFINE_string("sampler", None, "ancestral, llada, dream, fast_dllm or pkg.mod:make"
                      " (default: config.sample.sampler).")
  flags.DEFINE_multi_string("knob", None, "NAME=VALUE: any knob of the sampler (JSON values).")
  flags.DEFINE_integer("max_new_tokens", None, "Tokens to generate after --prompt (llada, dream,"
                       " fast_dllm; default: fill --length).")
  flags.DEFINE_integer("prompt_bucket", 0, "With --max_new_tokens: left-pad prompts to a multiple"
                       " of N tokens so prompt lengths share compiled programs (0: off; without"
                       " --max_new_tokens every row is --length already).")
  flags.DEFINE_integer("block_length", None, "Semi-autoregressive block (llada, fast_dllm).")
  flags.DEFINE_float("cfg_scale", 0.0, "Classifier-free guidance (llada).")
  flags.DEFINE_enum("remasking", "low_confidence", ["low_confidence", "random"],
                    "llada, fast_dllm.")
  flags.DEFINE_enum("alg", "entropy", ["origin", "maskgit_plus", "topk_margin", "entropy"], "dream.")
  flags.DEFINE_integer("top_k", None, "dream: keep the k largest logits.")
  flags.DEFINE_float("threshold", None, "fast_dllm: commit every candidate this confident.")
  flags.DEFINE_enum("use_cache", "dual", ["none", "prefix", "dual"], "fast_dllm KV cache.")
  flags.DEFINE_string("trajectory", None, "Write the denoising of sample 0 to FILE.html or .png.")
  flags.DEFINE_string("prompt", None, "Fixed prefix; the rest of the row is generated.")
  flags.DEFINE_string("infill", None, "Template with <gap> or <gap:N> markers to fill.")
  flags.DEFINE_string("prompts", None, "A file of prompts: one per line, or JSON Lines with"
                      " \"prompt\" or chat \"messages\"; --num_samples each.")
  flags.DEFINE_string("output", None, "Write the samples to this new FILE.jsonl (text, token"
                      " ids, nfe, seconds).")
  flags.DEFINE_integer("num_samples", None, "Number of samples (default: config.sample).")
  flags.DEFINE_integer("batch_size", None, "Samples generated at once; a progress bar counts the"
                       " batches (default: config.sample.batch_size, else 16).")
  flags.DEFINE_integer("steps", None, "Denoising steps (default: config.sample).")
  flags.DEFINE_integer("seed", None, "Sampling seed (default: config.sample).")
  flags.DEFINE_float("temperature", None, "Softmax temperature; 0 = argmax.")
  flags.DEFINE_float("top_p", None, "Nucleus mass in (0, 1].")
  flags.DEFINE_integer("length", None, "Tokens per sample (default: data.seq_len).")
  flags.DEFINE_integer("gap_length", 16, "Tokens per <gap> marker without an explicit :N.")


def _define_tokenizer_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Recipe whose config.data names the source.",
                                  lock_config=True)
  flags.DEFINE_string("out", None, "Where to write the sentencepiece model (never overwritten).")


def _define_compile_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Recipe file, e.g. configs/llada_8b.py.",
                                  lock_config=True)
  flags.DEFINE_string("topology", None, "TPU slice: v5p-128, v5e-256, v6e-16, v4-64, v5p:4x4x4 ...")
  flags.DEFINE_enum("what", "train", ["train", "sample"], "Compile the train step or the sampler.")
  flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilization assumed for the projected step time.")
  flags.DEFINE_float("margin", 0.1, "HBM headroom required to report that the program fits.")


def _define_trust_flag() -> None:
  flags.DEFINE_bool("trust_config_code", False,
                    "Let the loaded workdir's config.json name module:attr imports (it runs their"
                    " code); without it only registered names load from files.")


def _define_eval_flags() -> None:
  flags.DEFINE_string("workdir", None, "A trained or converted workdir (or a Hugging Face"
                      " LLaDA/Dream folder).")
  flags.DEFINE_string("hf", None, "Evaluate a Hugging Face LLaDA/Dream folder directly.")
  flags.DEFINE_string("text", None, "Score this UTF-8 text file (default: a dlm run's own"
                      " validation split; the stdlib corpus for imported models).")
  flags.DEFINE_integer("seq_len", None, "Row length for --text and imported models (default:"
                       " config.eval.seq_len, else 512 for imported models).")
  flags.DEFINE_integer("max_rows", None, "Evaluate at most this many validation rows (0 = all).")
  flags.DEFINE_integer("num_passes", None, "Stratified time passes over the rows.")
  flags.DEFINE_integer("samples", None, "Sample quality instead: draw N samples and report"
                       " gen-ppl (with --evaluator), entropy, repetition, NFE, tokens/s.")
  flags.DEFINE_string("evaluator", None, "An autoregressive model (dlm AR workdir or imported"
                      " Llama/Qwen2) that scores --samples (gen-ppl).")
  flags.DEFINE_bool("retokenize", False, "--evaluator with another tokenizer: score the samples'"
                    " text re-encoded with its tokenizer (else refused).")
  flags.DEFINE_string("sampler", None, "--samples: the sampler (default: the model's own).")
  flags.DEFINE_multi_string("knob", None, "--samples: NAME=VALUE, any knob of the sampler"
                            " (JSON values), e.g. --knob=steps=64 --knob=gumbel_bits=32.")
  flags.DEFINE_integer("seed", 0, "--samples: sampling seed.")
  flags.DEFINE_integer("batch_size", 16, "--samples: samples drawn at once.")
  flags.DEFINE_string("output", None, "--samples: write each sample (text, ids, entropy,"
                      " repetition, NLL) to this new FILE.jsonl; --frontier: the points'"
                      " FILE.jsonl (its picture: FILE.png).")
  flags.DEFINE_multi_string("frontier", None, "KNOB=V1,V2,...: sweep these knob values (every"
                            " combination) and plot tokens/s against gen-ppl (needs --evaluator;"
                            " --samples per point, default 16).")


def _define_harness_flags() -> None:
  flags.DEFINE_string("model_args", None, "pretrained=DIR[,sampler=NAME][,mc_num=128][,batch_size=32]"
                      "[,cfg=0][,is_check_greedy=True][,steps=..,gen_length=..,KNOB=..][,seed=0]")
  flags.DEFINE_list("tasks", None, "lm_eval task names, comma-separated.")
  flags.DEFINE_string("include_path", None, "A folder of task YAML files (local tasks).")
  flags.DEFINE_integer("num_fewshot", None, "Few-shot examples per request (default: the task's).")
  flags.DEFINE_float("limit", None, "Documents per task (or a fraction < 1).")
  flags.DEFINE_bool("log_samples", False, "Keep every request's inputs and outputs in --output.")
  flags.DEFINE_string("output", None, "Write the results (and provenance) to this new FILE.json.")


def _define_serve_flags() -> None:
  flags.DEFINE_string("workdir", None, "A trained or converted workdir to serve.")
  flags.DEFINE_string("hf", None, "Serve a Hugging Face LLaDA/Dream folder directly.")
  flags.DEFINE_string("host", "127.0.0.1", "Address to bind (127.0.0.1: this machine only).")
  flags.DEFINE_integer("port", 8000, "Port to listen on.")
  flags.DEFINE_string("served_model_name", None, "The model id clients send (default: the"
                      " folder's name).")
  flags.DEFINE_string("sampler", None, "Requests' default sampler (default: the model's own,"
                      " config.sample.sampler); a request picks another with dlm.sampler.")
  flags.DEFINE_integer("slots", 8, "Requests one compiled pool runs at once (its batch).")
  flags.DEFINE_integer("max_queue", 64, "Requests waiting for a slot before 429s.")
  flags.DEFINE_integer("prompt_bucket", 32, "Smallest prompt canvas; prompts are left-padded to"
                       " bucket x 2^k tokens (samplers that take padding).")
  flags.DEFINE_integer("gen_bucket", 16, "Smallest generation canvas; max_tokens runs as"
                       " bucket x 2^k tokens (whole blocks) and is cut.")
  flags.DEFINE_float("request_timeout", 600.0, "Seconds from arrival before a request fails"
                     " with 408 (a request may ask for less: dlm.timeout).")
  flags.DEFINE_integer("max_pools", 4, "Compiled pools kept (sampler x knobs x prompt width);"
                       " an idle one is dropped for a new one.")
  flags.DEFINE_bool("warm", True, "Compile the default sampler's pools before listening.")


def _define_plot_flags() -> None:
  flags.DEFINE_string("workdir", None, "A run's directory (its metrics.jsonl is read).")
  flags.DEFINE_string("out", None, "PNG to write (default: WORKDIR/curves.png).")


def cmd_train() -> None:
  from dlm import distributed
  f = flags.FLAGS
  cfg = f.config
  if cfg is None:
    raise _usage("dlm train needs --config=configs/quickstart.py (or another recipe)")
  workdir = _workdir()
  distributed.initialize(f.coordinator_address, f.num_processes, f.process_id, auto=f.distributed)
  import jax
  from dlm.train import loop
  result = loop.train(cfg, workdir, init_from=f.init_from)
  if jax.process_index() == 0:
    print(json.dumps(result))


# sampler knobs that have a flag of their own (others: --knob=NAME=VALUE)
_KNOB_FLAGS = ("block_length", "cfg_scale", "remasking", "alg", "top_k", "threshold", "use_cache")


def _knob_value(text: str) -> object:
  """A --knob value: JSON (numbers, true/false, null, lists), else the text as a string."""
  try:
    return json.loads(text)
  except ValueError:
    return text


def _sample_knobs(make, name: str, run, temperature: float, top_p: float) -> dict:
  """The sampler's knobs from the flags given (an inapplicable flag is one line) and the config."""
  from dlm.sample import generate
  f = flags.FLAGS
  takes = make.knobs
  given = [k for k in _KNOB_FLAGS if f[k].present]
  given += [k for k in ("temperature", "top_p") if f[k].value is not None]
  for k in given:
    if k not in takes:
      raise _usage(f"--{k} is not a knob of sampler {name!r}; its knobs:"
                   f" {', '.join(takes)} (others pass as --knob=NAME=VALUE)")
  # a flag with a default of its own (--use_cache=dual, --alg=entropy) sets the knob it names
  knobs = {k: f[k].value for k in _KNOB_FLAGS + ("temperature", "top_p")
           if k in takes and f[k].value is not None
           and (f[k].present or not isinstance(takes[k].default, bool))}
  if isinstance(knobs.get("use_cache"), str) and isinstance(takes["use_cache"].default, bool):
    knobs["use_cache"] = knobs["use_cache"] != "none"  # ar, bd3: a cache or none
  if "do_sample" in takes and f.temperature is not None:  # ar: --temperature=T > 0 samples
    knobs["do_sample"] = f.temperature > 0
  if name == "dream" and knobs.get("top_p") == 1.0:
    knobs["top_p"] = None  # Dream filters only below 1
  if "steps" in takes:
    knobs["steps"] = generate.pick_count("steps", f.steps, run.config.sample.steps)
  elif f.steps is not None:
    raise _usage(f"--steps is not a knob of sampler {name!r}; its knobs: {', '.join(takes)}")
  if "temperature" in takes and "temperature" not in knobs and make.infill:
    knobs["temperature"] = temperature  # config.sample's, for template samplers (ancestral)
  if "top_p" in takes and "top_p" not in knobs and make.infill:
    knobs["top_p"] = top_p
  knobs.update(_knob_flags(f.knob, name, takes))
  return knobs


def _knob_flags(items: list[str] | None, name: str, takes: dict) -> dict:
  """--knob=NAME=VALUE flags of sampler ``name`` (knob table ``takes``) as a dict."""
  knobs = {}
  for item in items or []:
    key, sep, value = item.partition("=")
    if not sep or key not in takes:
      raise _usage(f"--knob={item!r}: sampler {name!r} takes {', '.join(takes)}"
                   " (as --knob=NAME=VALUE)")
    knobs[key] = _knob_value(value)
  return knobs


def cmd_sample() -> None:
  import numpy as np
  from dlm.errors import UserError
  from dlm.models import loader
  from dlm.sample import engine, generate, trajectory
  from dlm.sample import prompts as prompts_lib
  f = flags.FLAGS
  # every value given on the command line, checked before anything loads
  for name in ("steps", "num_samples", "batch_size", "length", "block_length", "max_new_tokens",
               "top_k", "gap_length"):
    if f[name].value is not None:
      generate.check_count(f"--{name}", f[name].value, f"pass --{name}=1 or more, or leave it out")
  if f.prompt_bucket < 0:
    raise _usage(f"--prompt_bucket={f.prompt_bucket}: need 0 (off) or a bucket of N >= 1 tokens")
  inf = float("inf")
  for name, high, low_open in (("temperature", inf, False), ("top_p", 1.0, True),
                               ("cfg_scale", inf, False), ("threshold", 1.0, False)):
    if f[name].value is not None:
      generate.check_real(f"--{name}", f[name].value, high=high, low_open=low_open)
  prompt = generate.check_text("--prompt", f.prompt)
  if generate.check_text("--infill", f.infill):
    if f.chat:
      raise _usage("--chat wraps --prompt in the chat template; drop --infill or --chat")
    generate.parse_template(f.infill, gap_length=f.gap_length)  # strict markers, before loading
  if f.sampler is not None:
    make = engine.resolve(f.sampler)  # the user's own name: module:function allowed
  run = loader.load(f.hf or _workdir(), trust_config_code=f.trust_config_code)
  if _MESH_OVERRIDES:  # --config.mesh.*: the parameters and the sampler over a mesh
    run = loader.shard(run, _MESH_OVERRIDES)
  tok = run.tokenizer
  if tok is None:
    raise UserError(f"{f.hf or f.workdir} has no tokenizer.json; dlm sample needs it to read"
                    " --prompt: copy the model's tokenizer files there")
  from dlm.data import chat
  template = chat.for_model(run.config, tok)
  if f.chat and template is None:
    raise UserError(f"{f.hf or f.workdir} has no chat template (its tokenizer is dlm's"
                    " sentencepiece model and it was not fine-tuned with configs/sft.py):"
                    " drop --chat")
  sc = run.config.sample
  name = f.sampler or sc.sampler
  if f.sampler is None:
    make = engine.resolve(name)  # from config.json: registered names only (read_config checks)
  length = generate.pick_count("length", f.length,
                               sc.get("length") or run.config.data.seq_len)  # config 0: seq_len
  temperature = generate.check_real(
      "--temperature" if f.temperature is not None else "config.sample.temperature",
      sc.temperature if f.temperature is None else f.temperature)
  top_p = generate.check_real("--top_p" if f.top_p is not None else "config.sample.top_p",
                              sc.top_p if f.top_p is None else f.top_p, high=1.0, low_open=True)
  knobs = _sample_knobs(make, name, run, temperature, top_p)
  model = run
  items: list = [prompt]
  if f.prompts:
    if f.prompt is not None or f.infill:
      raise _usage("--prompts gives the prompts: drop --prompt and --infill")
    items = prompts_lib.read_prompts(f.prompts)
  texts = []
  for item in items:
    if isinstance(item, list) or f.chat:
      if template is None:
        raise UserError(f"{f.hf or f.workdir} has no chat template (its tokenizer is dlm's"
                        " sentencepiece model): give plain prompts, without --chat")
      item = chat.render(template, item if isinstance(item, list)
                         else [{"role": "user", "content": item or ""}], True, tok)
    texts.append(item)
  if make.infill:  # a template: the prompt, or --infill's gaps, within --length
    if f.max_new_tokens is not None:
      raise _usage(f"--max_new_tokens is for prompt samplers; sampler {name!r} fills --length")
    templates = [generate.build_template(tok, length=length, prompt=t, infill=f.infill,
                                         gap_length=f.gap_length) + (None, 0) for t in texts]
  else:
    if f.infill:
      raise _usage(f"--infill needs a template sampler: pass --sampler=ancestral ({name!r}"
                   " continues a --prompt)")
    ids = [tok.encode(t or "") or [tok.bos_id if tok.bos_id is not None else tok.eos_id]
           for t in texts]
    width = max(map(len, ids))  # prompts left-padded to the longest: one compiled program
    new = f.max_new_tokens if f.max_new_tokens is not None else length - width
    if new < 1:
      raise _usage(f"--prompt is {width} tokens, no room in --length={length}; raise --length")
    if run.model_cfg.mask_kind == "bd3":  # block diffusion: the prompt in whole blocks
      block = run.model_cfg.block_size
      width = -(-width // block) * block
      new = f.max_new_tokens if f.max_new_tokens is not None else length - width
      if new < 1:
        raise _usage(f"--prompt takes {width} tokens in blocks of {block}, no room in"
                     f" --length={length}; raise --length")
    elif f.prompt_bucket and f.max_new_tokens is not None:  # rows of width + new
      if not make.pads:
        raise _usage(f"sampler {name!r} takes prompts of one length (no padding): drop"
                     " --prompt_bucket")
      width = -(-width // f.prompt_bucket) * f.prompt_bucket
    if make.length is not None:
      knobs[make.length] = new
    pad = tok.pad_id if tok.pad_id is not None else tok.eos_id
    templates = []
    for row in ids:
      k = width - len(row)
      given, fixed, am = engine.prompt_template(
          np.array([[pad] * k + row], np.int32), np.array([[0] * k + [1] * len(row)]), new,
          engine.blank_id(model))
      templates.append((given[0], fixed[0], am[0], k))
  num = generate.pick_count("num_samples", f.num_samples, sc.num_samples)
  plan = list(prompts_lib.rows(len(texts), num))
  size = min(generate.pick_count("batch_size", f.batch_size, sc.get("batch_size", 16)), len(plan))
  seed = sc.seed if f.seed is None else f.seed
  output = prompts_lib.Output(f.output) if f.output else None
  first = None  # (tokens, committed_at, nfe) of sample 0, for --trajectory
  try:
    for b, start, n in generate.progress_batches(len(plan), size):
      chunk = plan[start:start + n]
      full = chunk + chunk[-1:] * (size - n)  # the last batch is run full (one program) and cut
      g = np.stack([templates[p][0] for p, _ in full])
      fx = np.stack([templates[p][1] for p, _ in full])
      am = None if make.infill else np.stack([templates[p][2] for p, _ in full])
      t0 = time.perf_counter()
      out = engine.sample(model, g, fx, am, sampler=name, seed=generate.batch_seed(seed, b),
                          **knobs)
      secs = time.perf_counter() - t0
      for j, (p, s_i) in enumerate(chunk):
        cut = templates[p][3]  # left padding
        text = generate.decode_samples(tok, out.sequences[j:j + 1, cut:])[0]
        generate.emit(f"===== sample {start + j} ({name}, nfe {out.nfe}, step {run.step})"
                      f" =====\n{text}")
        if output is not None:
          output.write({"prompt_index": p, "sample": s_i, "prompt": items[p],
                        "text": out.texts[j], "token_ids": out.token_ids[j], "nfe": out.nfe,
                        "seconds": round(secs, 4),
                        "sampler": name, "step": run.step})
      if output is not None:
        output.flush()
      if first is None and f.trajectory:
        first = (out.sequences[0, templates[0][3]:], out.committed_at[0, templates[0][3]:],
                 out.nfe)
  finally:
    if output is not None:
      output.close()
  if first is not None:
    print(trajectory.write(f.trajectory, tok, *first))
  if output is not None:
    print(f"wrote {len(plan)} samples to {f.output}", file=sys.stderr)


def cmd_eval() -> None:
  from dlm.eval import run_eval
  f = flags.FLAGS
  for name in ("max_rows", "num_passes", "seq_len"):
    low = 0 if name == "max_rows" else 1
    if f[name].value is not None and f[name].value < low:
      raise _usage(f"--{name}={f[name].value} must be >= {low}")
  if f.samples is not None or f.frontier:
    print(json.dumps(_eval_samples()))
    return
  for name in ("evaluator", "sampler", "knob", "output", "retokenize", "seed", "batch_size"):
    if f[name].present:
      raise _usage(f"--{name} applies to --samples=N (sample quality) and --frontier")
  result = run_eval.evaluate_workdir(f.hf or _workdir(), max_rows=f.max_rows,
                                     num_passes=f.num_passes, text=f.text, seq_len=f.seq_len,
                                     trust_config_code=f.trust_config_code)
  print(json.dumps(result))


def _eval_samples() -> dict:
  """`dlm eval --samples=N [--evaluator=AR] [--sampler=S --knob=K=V]`: sample quality."""
  from dlm.eval import samples
  from dlm.models import loader
  from dlm.sample import engine
  f = flags.FLAGS
  for name in ("samples", "batch_size"):
    if f[name].value is not None and f[name].value < 1:
      raise _usage(f"--{name}={f[name].value} must be >= 1")
  path = f.hf or _workdir()
  outputs = [f.output] if f.output else []
  if f.frontier:
    stem = f.output or os.path.join(path, f"frontier-{f.sampler or 'default'}.jsonl")
    outputs = [stem, os.path.splitext(stem)[0] + ".png"]
  for out in outputs:
    if os.path.exists(out):
      raise _usage(f"{out} exists; outputs are never overwritten: pick another --output")
  model = loader.load(path, trust_config_code=f.trust_config_code)
  name = f.sampler or engine.default_sampler(model)
  make = engine.resolve(name)
  knobs = _knob_flags(f.knob, name, make.knobs)
  evaluator = None
  if f.frontier:
    from dlm.eval import frontier
    grid = frontier.parse_grid(f.frontier, make.knobs, name, _knob_value)
  if f.evaluator:
    evaluator = loader.load(f.evaluator, trust_config_code=f.trust_config_code)
  if f.frontier:
    points = frontier.sweep(model, evaluator, grid, sampler=name, knobs=knobs,
                            num_samples=f.samples or 16, seed=f.seed, batch_size=f.batch_size,
                            retokenize=f.retokenize, path=path, evaluator_path=f.evaluator)
    frontier.write(points, pathlib.Path(outputs[0]), pathlib.Path(outputs[1]),
                   f"{name} on {path} ({f.samples or 16} samples a point, gen-ppl under"
                   f" {f.evaluator})")
    print(f"wrote {outputs[0]} and {outputs[1]}", file=sys.stderr)
    return {"points": len(points), "jsonl": outputs[0], "png": outputs[1],
            "pareto": [p["sweep"] for p in points if p["pareto"]]}
  summary, rows = samples.evaluate(model, f.samples, evaluator=evaluator, sampler=name,
                                   knobs=knobs, seed=f.seed, batch_size=f.batch_size,
                                   retokenize=f.retokenize, path=path,
                                   evaluator_path=f.evaluator)
  if f.output:
    with open(f.output, "x", encoding="utf-8") as out:
      for row in rows:
        out.write(json.dumps(row) + "\n")
  return summary


def cmd_harness() -> None:
  """`dlm harness --model_args=pretrained=DIR --tasks=...`: lm_eval.simple_evaluate with the
  `dlm` model (the optional extra `eval`)."""
  f = flags.FLAGS
  if not f.model_args or not f.tasks:
    raise _usage("dlm harness needs --model_args=pretrained=DIR[,...] and --tasks=NAME[,NAME]")
  if f.output and os.path.exists(f.output):
    raise _usage(f"{f.output} exists; results are never overwritten: pick another --output")
  try:
    from dlm.eval import harness
  except ImportError as e:
    raise _usage(f"dlm harness needs lm-evaluation-harness ({e.name or e} is missing): pip"
                 " install -e '.[eval]'") from None
  result = harness.evaluate(f.model_args, f.tasks, include_path=f.include_path,
                            num_fewshot=f.num_fewshot, limit=f.limit, log_samples=f.log_samples,
                            trust_config_code=f.trust_config_code)
  from lm_eval.utils import make_table
  print(make_table(result), file=sys.stderr)
  if f.output:
    with open(f.output, "x", encoding="utf-8") as out:
      json.dump(result, out, indent=1)
  print(json.dumps({"results": result["results"], "dlm": result["dlm"]}))


def cmd_serve() -> None:
  from dlm.models import loader
  from dlm.serve import serve
  f = flags.FLAGS
  path = f.hf or _workdir()
  model = loader.load(path, trust_config_code=f.trust_config_code)
  if _MESH_OVERRIDES:  # --config.mesh.*: slots over data, parameters over fsdp / tensor
    model = loader.shard(model, _MESH_OVERRIDES)
  serve(model, host=f.host, port=f.port,
        model_name=f.served_model_name or pathlib.Path(path).resolve().name, slots=f.slots,
        max_queue=f.max_queue, prompt_bucket=f.prompt_bucket, gen_bucket=f.gen_bucket,
        request_timeout=f.request_timeout, max_pools=f.max_pools, warm=f.warm,
        sampler=f.sampler)


def cmd_plot() -> None:
  from dlm.train import plot
  print(plot.plot_curves(_workdir(), out=flags.FLAGS.out))


def cmd_tokenizer(args: list[str]) -> None:
  """``dlm tokenizer train --config=... --out=FILE``: sentencepiece on a sample of any source."""
  f = flags.FLAGS
  if args != ["train"]:
    raise _usage("usage: dlm tokenizer train --config=RECIPE --out=FILE")
  if f.config is None or not f.out:
    raise _usage("dlm tokenizer train needs --config=RECIPE and --out=FILE")
  if os.path.exists(f.out):
    raise _usage(f"{f.out} exists; tokenizers are never overwritten: pick another --out")
  from dlm.data import packing, sources
  d = f.config.data
  docs = sources.make_source(d, "train")
  tok = packing.train_tokenizer_from_docs(docs, f.out, vocab_size=int(d.vocab_size),
                                          max_chars=int(d.tokenizer_max_chars),
                                          seed=int(f.config.seed),
                                          model_type=d.get("tokenizer_type", "bpe"))
  print(json.dumps({"out": f.out, "vocab_size": tok.vocab_size, "mask_id": tok.mask_id,
                    "eos_id": tok.eos_id, "bos_id": tok.bos_id, "pad_id": tok.pad_id}))


class _UsageError(Exception):
  pass


def _usage(msg: str) -> _UsageError:
  return _UsageError(msg)


def _workdir() -> str:
  if not flags.FLAGS.workdir:
    raise _usage("--workdir=DIR is required")
  return flags.FLAGS.workdir


def cmd_compile() -> None:
  """`dlm compile --config=... --topology=NAME`: memory, FLOPs, collectives, projected speed."""
  f = flags.FLAGS
  if f.config is None or not f.topology:
    raise _usage("dlm compile needs --config=RECIPE and --topology=NAME (e.g. v5p-128)")
  from dlm.compile import report
  r = report.compile_report(f.config, f.topology, what=f.what, mfu=f.mfu, margin=f.margin)
  print(report.format_report(r))
  print(json.dumps(r))


def cmd_convert() -> None:
  from dlm.convert import workdir as convert_workdir
  f = flags.FLAGS
  if not f["from"].value or not f.src or not f.workdir:
    raise _usage("dlm convert needs --from=llada|dream --src=HF_DIR --workdir=OUT")
  print(convert_workdir.convert(f.src, f.workdir, expected=f["from"].value))


def cmd_export() -> None:
  from dlm.convert import workdir as convert_workdir
  f = flags.FLAGS
  if not f.out:
    raise _usage("dlm export needs --workdir=DIR --out=HF_DIR")
  if f.max_shard_gb < 1:
    raise _usage(f"--max_shard_gb={f.max_shard_gb} must be >= 1")
  print(convert_workdir.export(_workdir(), f.out, max_shard_bytes=int(f.max_shard_gb * 2**30),
                               trust_config_code=f.trust_config_code))


_COMMANDS: dict[str, tuple[Callable[[], None], Callable[[], None]]] = {
    "train": (_define_train_flags, cmd_train),
    "sample": (lambda: (_define_sample_flags(), _define_trust_flag()), cmd_sample),
    "eval": (lambda: (_define_eval_flags(), _define_trust_flag()), cmd_eval),
    "harness": (lambda: (_define_harness_flags(), _define_trust_flag()), cmd_harness),
    "serve": (lambda: (_define_serve_flags(), _define_trust_flag()), cmd_serve),
    "plot": (_define_plot_flags, cmd_plot),
    "convert": (_define_convert_flags, cmd_convert),
    "export": (lambda: (_define_export_flags(), _define_trust_flag()), cmd_export),
    "tokenizer": (_define_tokenizer_flags, cmd_tokenizer),
    "compile": (_define_compile_flags, cmd_compile),
}


def _no_field(e: BaseException, args: list[str]) -> str:
  """ml_collections' "no field" error (a KeyError, maybe inside an AttributeError) as one line."""
  while isinstance(e, AttributeError) and e.args and isinstance(e.args[0], BaseException):
    e = e.args[0]
  text = str(e.args[0] if e.args else e)
  lines = text.splitlines() or [""]
  field = lines[0].strip().strip("'\"")
  hint = " ".join(l.strip() for l in lines[1:] if l.strip())
  where = next((a.split("=", 1)[0] for a in args
                if a.startswith("--config.") and field in a.split("=", 1)[0].split(".")), "")
  return (f"the config has no field {field!r}" + (f" ({where})" if where else "") + "; "
          + (f"{hint[0].lower()}{hint[1:]}" if hint
             else "check the --config.* override against the recipe's get_config()"))


def one_line(e: BaseException) -> str:
  """The message of an exception that reached the CLI, as one line that ends in what to do."""
  from dlm.errors import UserError
  text = str(e).strip()
  first = text.splitlines()[0] if text else ""
  if isinstance(e, UserError):
    return first or type(e).__name__
  if isinstance(e, OSError) and e.errno is not None:
    where = " -> ".join(str(n) for n in (e.filename, e.filename2) if n is not None)
    what = e.strerror or first
    if isinstance(e, PermissionError) or e.errno in (errno.EROFS, errno.EACCES):
      fix = "fix its permissions or pick another path"
    elif e.errno == errno.ENOSPC:
      fix = "free disk space or pick another path"
    elif isinstance(e, FileNotFoundError):
      fix = "check the path"
    else:
      fix = "check the path and the disk"
    return f"{where}: {what}; {fix}" if where else f"{what}; {fix}"
  if isinstance(e, (FileNotFoundError, FileExistsError)) and first:  # ours: the text names the fix
    return first
  name = type(e).__name__
  if type(e) is ValueError and first:  # ours name the fix; a library's still reads as one line
    return f"{first} (DLM_DEBUG=1 shows the traceback)"
  if name == "SecurityError":  # jinja2's sandbox refused a chat template
    return (f"the chat template was refused by the sandbox ({first}); use a trusted template"
            " or sample without --chat")
  return (f"{name}: {first[:500]} (unexpected: rerun with DLM_DEBUG=1 for the traceback and"
          " report it if the input looks valid)")


# dlm sample --config.mesh.{data,fsdp,tensor}=N: the mesh to sample on (the loaded config's)
_MESH_OVERRIDES: dict[str, int] = {}


def _mesh_overrides(cmd: str, args: list[str]) -> list[str]:
  """``dlm sample``'s ``--config.mesh.AXIS=N`` arguments, taken out of ``args`` (the loaded
  model's config is not known when flags are parsed)."""
  _MESH_OVERRIDES.clear()
  rest = []
  for arg in args:
    if cmd not in ("sample", "serve") or not arg.startswith("--config."):
      rest.append(arg)
      continue
    key, _, value = arg[len("--config."):].partition("=")
    axis = key.removeprefix("mesh.")
    if axis not in ("data", "fsdp", "tensor") or not key.startswith("mesh."):
      raise _usage(f"{arg.split('=')[0]}: dlm sample takes only --config.mesh.data, .fsdp and"
                   " .tensor (other settings are flags, e.g. --steps)")
    try:
      n = int(value)
    except ValueError:
      raise _usage(f"{arg}: give a whole number of devices (or -1 for the rest)") from None
    if n == 0 or n < -1:
      raise _usage(f"{arg}: give a positive number of devices (or -1 for the rest)")
    _MESH_OVERRIDES[axis] = n
  return rest


def run(argv: list[str] | None = None) -> None:
  """Entry point of the ``dlm`` console script."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] not in _COMMANDS:
    print(USAGE, file=sys.stderr)
    sys.exit(2)
  cmd = argv[1]
  try:
    argv = argv[:2] + _mesh_overrides(cmd, argv[2:])
  except _UsageError as e:
    print(f"dlm {cmd}: error: {e}", file=sys.stderr)
    sys.exit(2)
  if cmd == "compile":  # compiles for TPU devices described by libtpu; this host's chips unused
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  define, body = _COMMANDS[cmd]
  define()
  flags.DEFINE_string("compile_cache", None, "Persistent compilation cache: a directory, or"
                      " 'off' (default: $DLM_COMPILE_CACHE, else ~/.cache/dlm/jax).")
  for arg in argv[2:]:
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1].split(":", 1)[0]
      if not os.path.isfile(path):
        print(f"dlm {cmd}: error: --config file {path!r} not found; pass a recipe such as"
              " configs/quickstart.py", file=sys.stderr)
        sys.exit(2)
  try:
    positional = flags.FLAGS([f"dlm {cmd}"] + argv[2:])[1:]
  except flags.Error as e:
    lines = [l for l in str(e).splitlines() if l.strip()]
    msg = lines[0] if len(lines) == 1 else f"{lines[0]} {lines[-1].strip()}"
    print(f"dlm {cmd}: error: {msg}", file=sys.stderr)
    sys.exit(2)
  except UnicodeDecodeError as e:  # a --flagfile (or the command line) that is not UTF-8
    print(f"dlm {cmd}: error: a --flagfile is not UTF-8 text (byte {e.object[e.start]:#04x} at"
          f" offset {e.start}); save it as UTF-8", file=sys.stderr)
    sys.exit(2)
  except (KeyError, AttributeError) as e:  # ml_collections: an override names no field
    print(f"dlm {cmd}: error: {_no_field(e, argv[2:])}", file=sys.stderr)
    sys.exit(2)
  if cmd != "compile":  # compile lowers for TPUs it does not run on: nothing to keep
    from dlm import compile_cache
    compile_cache.enable(flags.FLAGS.compile_cache)
  if positional and cmd != "tokenizer":
    print(f"dlm {cmd}: error: unexpected arguments {positional}; flags are --name=value",
          file=sys.stderr)
    sys.exit(2)
  try:
    body(positional) if cmd == "tokenizer" else body()
  except _UsageError as e:
    print(f"dlm {cmd}: error: {e}", file=sys.stderr)
    sys.exit(2)
  except Exception as e:  # noqa: BLE001  every error reaches the user as one line
    if os.environ.get("DLM_DEBUG"):
      raise
    print(f"dlm {cmd}: error: {one_line(e)}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  run()
