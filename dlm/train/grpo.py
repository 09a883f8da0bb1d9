"""diffu-GRPO rollouts (Zhao et al. 2025, d1): the stage between the prompt iterator and the step.

Every ``num_iterations`` steps (mu, the inner updates per rollout batch) it takes the next
``train.batch_size / num_generations`` prompts, samples ``num_generations`` completions of
each through the sampling engine with the current parameters (``grpo.sampler``, LLaDA's by
default, with d1's knobs), scores them with the configured rewards, and turns them into the
``grpo`` loss's batch (``dlm/losses.py``):

  A_i = r_i - mean(r of its group)          (d1; / (std + 1e-4) with ``scale_rewards``)
  completion_mask: the completion up to and including its first EOS
  old_logp, ref_logp [mu, B, L]: ``completion_logp`` under the rollout's parameters and the
    reference model, one prompt mask (``mask_seed``) per inner iteration (``random_masking``)

Step k of the cycle gets iteration k's mask seed and log-probabilities.  The buffer goes into
the checkpoint with the prompt iterator's state, so a resumed run continues mid-cycle exactly.
"""

from __future__ import annotations

import base64
import io
import math
from typing import Any, Callable

import jax
import numpy as np

from dlm import parallel
from dlm.data import rl_prompts
from dlm.errors import UserError
from dlm.train import rewards as rewards_lib

BUFFER_KEYS = ("tokens", "loss_mask", "prompt_mask", "attention_mask", "advantages")


def batch_keys(grpo_cfg: Any, beta: float) -> tuple[str, ...]:
  """The arrays of each GRPO batch (all [B, L])."""
  keys = BUFFER_KEYS + ("mask_seed",)
  if int(grpo_cfg.get("num_iterations", 1)) > 1:
    keys += ("old_logp",)
  if beta:
    keys += ("ref_logp",)
  return keys


def check(config: Any) -> None:
  """The GRPO settings, before anything is written."""
  gc = config.grpo
  g, b = int(gc.num_generations), int(config.train.batch_size)
  if g < 2 or b % g:
    raise UserError(f"grpo.num_generations={g} must be >= 2 and divide train.batch_size={b}"
                    " (each prompt's completions form one group); change one of them")
  hosts = jax.process_count()
  if b % (g * hosts):
    raise UserError(f"train.batch_size={b} must split into whole groups of grpo.num_generations="
                    f"{g} on each of the {hosts} processes (each samples and scores its own"
                    f" prompts); make it a multiple of {g * hosts}")
  if int(gc.get("num_iterations", 1)) < 1:
    raise UserError(f"grpo.num_iterations={gc.num_iterations} must be >= 1")
  names = list(gc.rewards)
  weights = list(gc.get("reward_weights") or [1.0] * len(names))
  if not names or len(weights) != len(names):
    raise UserError(f"grpo.rewards={names} with reward_weights={weights}: give one or more"
                    " rewards and one weight each (or no weights)")
  for name in names:
    rewards_lib.get(name)
  p, c = int(gc.max_prompt_length), int(gc.max_completion_length)
  if int(config.data.seq_len) != p + c:
    raise UserError(f"data.seq_len={config.data.seq_len} must be grpo.max_prompt_length +"
                    f" max_completion_length = {p + c}; set it so")


def _pack(arrays: dict[str, np.ndarray]) -> str:
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  return base64.b64encode(buf.getvalue()).decode("ascii")


def _unpack(text: str) -> dict[str, np.ndarray]:
  with np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


class Rollouts:
  """The GRPO batch source: ``batch(params, step) -> (batch, metrics or None)``; checkpointable
  (``get_state`` / ``set_state``) like a data iterator."""

  def __init__(self, config: Any, *, prompts: Any, val_prompts: rl_prompts.PromptSet,
               train_prompts: rl_prompts.PromptSet, model: Any, logp_fn: Callable[..., Any],
               put: Callable[[dict], Any], ref_params: Callable[[], Any] | None):
    self.gc, self.seed = config.grpo, int(config.seed)
    self.beta = float(config.loss.get("beta", 0.04))
    self.mu = int(self.gc.get("num_iterations", 1))
    self.g = int(self.gc.num_generations)
    self.p, self.c = int(self.gc.max_prompt_length), int(self.gc.max_completion_length)
    self.prompts, self.train_set, self.val_set = prompts, train_prompts, val_prompts
    self.model, self.logp_fn, self.put = model, logp_fn, put
    self.ref_params = ref_params
    names = list(self.gc.rewards)
    self.rewards = [(n, rewards_lib.get(n), float(w)) for n, w in zip(
        names, list(self.gc.get("reward_weights") or [1.0] * len(names)))]
    self.batch_size = int(config.train.batch_size)
    self.k0 = -1
    self.buffer: dict[str, np.ndarray] | None = None

  # ----------------------------------------------------------------- state --
  def get_state(self) -> dict[str, Any]:
    return {"prompts": self.prompts.get_state(), "k0": self.k0,
            "buffer": None if self.buffer is None else _pack(self.buffer)}

  def set_state(self, state: dict[str, Any]) -> None:
    self.prompts.set_state(state["prompts"])
    self.k0 = int(state["k0"])
    self.buffer = None if state.get("buffer") is None else _unpack(state["buffer"])

  # ------------------------------------------------------------- sampling --
  def _knobs(self, temperature: float) -> dict[str, Any]:
    gc = self.gc
    if gc.sampler == "llada":  # d1's names -> LLaDA's
      knobs = {"gen_length": self.c, "steps": int(gc.diffusion_steps),
               "block_length": int(gc.block_length), "temperature": temperature,
               "cfg_scale": float(gc.cfg_scale), "remasking": str(gc.remasking)}
    else:
      from dlm.sample import engine
      knobs = {engine.resolve(gc.sampler).length: self.c, "temperature": temperature}
    knobs.update(dict(gc.get("sampler_knobs", {}) or {}))
    return knobs

  def _generate(self, params: Any, ids: np.ndarray, attention: np.ndarray, seed: int,
                temperature: float) -> np.ndarray:
    """Completions [B, C] (EOS after a row's end) of left-padded prompts [B, P]."""
    self.model.params = params
    eos = int(self.model.ids["eos"])
    out = np.full((ids.shape[0], self.c), eos, np.int32)
    chunk = int(self.gc.get("generation_batch_size", 0) or 0) or ids.shape[0]
    for start in range(0, ids.shape[0], chunk):
      rows = slice(start, start + chunk)
      seqs = np.asarray(self.model.generate(
          ids[rows], attention[rows], sampler=self.gc.sampler, seed=seed + start,
          **self._knobs(temperature)).sequences)[:, self.p:]
      out[rows, :seqs.shape[1]] = seqs
    return out

  def _score(self, texts: list[str], columns: list[dict[str, Any]], completions: np.ndarray
             ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({"reward": weighted total [B], "reward_NAME": each reward [B], "completion_length" [B]},
    completion mask [B, C]) of this process's rows."""
    eos = int(self.model.ids["eos"])
    is_eos = completions == eos
    first = np.where(is_eos.any(1), is_eos.argmax(1), completions.shape[1] - 1)
    mask = (np.arange(completions.shape[1])[None] <= first[:, None]).astype(np.float32)
    tok = self.model.tokenizer
    done = [tok.decode(row[:f + (0 if e else 1)]) for row, f, e in
            zip(completions, first, is_eos.any(1))]
    cols = {k: [c.get(k) for c in columns] for k in {k for c in columns for k in c}}
    total = np.zeros(len(done), np.float64)
    per_row: dict[str, np.ndarray] = {}
    for name, fn, w in self.rewards:
      r = np.asarray(fn(prompts=texts, completions=done, **cols), np.float64)
      if r.shape != (len(done),) or not np.all(np.isfinite(r)):
        raise UserError(f"reward {name!r} returned {r.shape} values (finite: "
                        f"{bool(np.all(np.isfinite(r)))}) for {len(done)} completions; it must"
                        " return one finite float per completion")
      per_row[f"reward_{name}"] = r
      total += w * r
    per_row.update(reward=total, completion_length=mask.sum(1).astype(np.float64))
    return per_row, mask

  def _local(self, rows: np.ndarray) -> np.ndarray:
    """This process's slice of global rows (process order, as ``parallel.global_batch``)."""
    n = rows.shape[0] // jax.process_count()
    return rows[jax.process_index() * n:(jax.process_index() + 1) * n]

  def _rollout(self, params: Any, step: int) -> dict[str, float]:
    raw = next(self.prompts)  # this process's prompts; the groups of its rows are its own
    index = np.asarray(raw["index"])[:, 0]
    ids = np.repeat(self.train_set.ids[index], self.g, axis=0)
    attention = np.repeat(self.train_set.attention[index], self.g, axis=0)
    texts = [self.train_set.texts[i] for i in index for _ in range(self.g)]
    columns = [self.train_set.columns[i] for i in index for _ in range(self.g)]
    comp = self._generate(params, ids, attention, self.seed * 1_000_003 + step,
                          float(self.gc.temperature))
    per_row, comp_mask = self._score(texts, columns, comp)
    groups = per_row["reward"].reshape(-1, self.g)
    adv = groups - groups.mean(1, keepdims=True)
    if bool(self.gc.get("scale_rewards", False)):
      adv = adv / (groups.std(1, keepdims=True) + 1e-4)
    per_row["zero_std"] = np.repeat((groups.std(1) < 1e-6).astype(np.float64), self.g)
    length = self.p + self.c
    local = {"tokens": np.concatenate([ids, comp], 1),
             "loss_mask": np.concatenate([np.zeros_like(ids, np.float32), comp_mask], 1),
             "prompt_mask": np.concatenate([attention.astype(np.float32),
                                            np.zeros_like(comp, np.float32)], 1),
             "attention_mask": np.concatenate([attention, np.ones_like(comp)], 1),
             "advantages": np.repeat(adv.reshape(-1, 1), length, 1).astype(np.float32)}
    random = bool(self.gc.get("random_masking", True))
    seeds = np.asarray([(self.seed * 7919 + (step + i if random else 0)) % (2**31 - 1)
                        for i in range(self.mu)], np.int64)
    b = ids.shape[0]
    for key, want, p in (("old_logp", self.mu > 1, lambda: params),
                         ("ref_logp", bool(self.beta), self.ref_params)):
      if want:
        theta = p()
        local[key] = np.stack([parallel.local_rows(self.logp_fn(theta, self.put(
            dict({k: local[k] for k in BUFFER_KEYS},
                 mask_seed=np.full((b, length), s, np.int32))))) for s in seeds], 1)
    # the buffer holds every process's rows: the checkpoint (written by process 0) resumes all
    buf = {k: parallel.gather_rows(v) for k, v in local.items()}
    for key in ("old_logp", "ref_logp"):
      if key in buf:
        buf[key] = np.swapaxes(buf[key], 0, 1)  # [mu, B, L]
    buf["mask_seeds"] = seeds
    self.buffer, self.k0 = buf, step
    rows = {k: parallel.gather_rows(v) for k, v in per_row.items()}
    metrics = {k: float(v.mean()) for k, v in rows.items() if k != "zero_std"}
    metrics.update(reward_std=float(rows["reward"].std()),
                   zero_std_ratio=float(rows["zero_std"].mean()))
    return metrics

  def batch(self, params: Any, step: int) -> tuple[dict[str, np.ndarray], dict[str, float] | None]:
    """This process's rows of step ``step``'s batch (0-based): a new rollout every
    ``num_iterations`` steps."""
    metrics = None
    if self.buffer is None or step - self.k0 >= self.mu or step < self.k0:
      metrics = self._rollout(params, step)
    i = step - self.k0
    buf = self.buffer
    out = {k: self._local(buf[k]) for k in BUFFER_KEYS}
    b, length = out["tokens"].shape
    out["mask_seed"] = np.full((b, length), int(buf["mask_seeds"][i]), np.int32)
    if "old_logp" in buf:
      out["old_logp"] = self._local(buf["old_logp"][i])
    if "ref_logp" in buf:
      out["ref_logp"] = self._local(buf["ref_logp"][i])
    return out, metrics

  def evaluate(self, params: Any) -> dict[str, float]:
    """Mean rewards of one greedy completion (temperature 0) of each validation prompt."""
    vs = self.val_set
    n = vs.ids.shape[0]
    b = math.ceil(n / self.batch_size) * self.batch_size  # whole batches: they shard as training
    take = self._local(np.arange(b) % n)  # this process's share
    comp = self._generate(params, vs.ids[take], vs.attention[take], 0, 0.0)
    per_row, _ = self._score([vs.texts[i] for i in take], [vs.columns[i] for i in take], comp)
    return {k: float(parallel.gather_rows(v)[:n].mean()) for k, v in per_row.items()}


def logp_fn(apply: Any, mask_id: int, p_mask_prompt: float, param_shardings: Any, mesh: Any,
            rules: Any, keys: tuple[str, ...]) -> Callable[..., Any]:
  """``completion_logp`` jitted over the mesh like the train step."""
  import functools

  from dlm import losses, parallel
  row = parallel.batch_sharding(mesh, rules)
  fn = parallel.traced_in_mesh(functools.partial(
      losses.completion_logp, apply, mask_id=mask_id, p_mask_prompt=p_mask_prompt), mesh, rules)
  return jax.jit(fn, in_shardings=(param_shardings, {k: row for k in keys}), out_shardings=row)
