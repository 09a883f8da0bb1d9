"""diffu-GRPO (configs/grpo.py): the loss's closed forms, the one-step estimate's masks, the
rewards, a seeded run whose reward rises, exact resume mid-cycle, one-line errors."""

from __future__ import annotations

import json
import pathlib
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import recipes
from dlm import losses
from dlm.errors import UserError
from dlm.train import grpo, rewards

ROOT = pathlib.Path(__file__).resolve().parents[1]
GRPO_SMOKE = f"{ROOT}/configs/grpo.py:smoke"
V, MASK = 16, 15


dlm = recipes.dlm


def _batch(b: int = 4, p: int = 6, c: int = 5, seed: int = 3) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, MASK, (b, p + c)).astype(np.int32)
  attention = np.ones((b, p + c), np.int32)
  attention[:, :2] = 0  # left padding
  prompt = np.zeros((b, p + c), np.float32)
  prompt[:, 2:p] = 1
  comp = np.zeros((b, p + c), np.float32)
  comp[:, p:] = 1
  comp[0, p + 3:] = 0  # row 0 ended (EOS) early
  adv = np.repeat(rng.normal(size=(b, 1)), p + c, 1).astype(np.float32)
  return {"tokens": tokens, "loss_mask": comp, "prompt_mask": prompt, "attention_mask": attention,
          "advantages": adv, "mask_seed": np.full((b, p + c), 7, np.int32)}


def _table_model():
  """A 'denoiser' whose logits are a parameter table [L, V] plus a term of what it sees."""
  seen = []

  def model(params, x, t, attention_mask=None):
    seen.append(np.asarray(x))
    return params[None] + 0.1 * jax.nn.one_hot(x, V), None

  return model, seen


def test_completion_logp_masks_the_completion_and_some_prompt_tokens():
  batch = _batch(b=64, p=40, c=5)
  model, seen = _table_model()
  params = jnp.zeros((45, V))
  logp = losses.completion_logp(model, params, batch, mask_id=MASK, p_mask_prompt=0.25)
  x = seen[-1]
  comp, prompt = batch["loss_mask"] > 0, batch["prompt_mask"] > 0
  assert (x[comp] == MASK).all()
  assert (x[batch["attention_mask"] == 0] == batch["tokens"][batch["attention_mask"] == 0]).all()
  frac = (x[prompt] == MASK).mean()
  assert 0.2 < frac < 0.3, frac  # each real prompt token masked with probability p_mask_prompt
  want = -np.log(V - 1 + np.exp(0.1))  # the table is 0; the masked input adds 0.1 at MASK
  np.testing.assert_allclose(np.asarray(logp)[comp], want, rtol=1e-5)
  again = losses.completion_logp(model, params, batch, mask_id=MASK, p_mask_prompt=0.25)
  np.testing.assert_array_equal(seen[-1], x)  # the mask is the seed's: pi_old saw the same one
  np.testing.assert_array_equal(np.asarray(again), np.asarray(logp))
  # a row keeps its mask when the batch is split (microbatches): it follows row_ids
  half = {k: v[32:] for k, v in batch.items()}
  losses.completion_logp(model, params, dict(half, row_ids=jnp.arange(32, 64)), mask_id=MASK,
                         p_mask_prompt=0.25)
  np.testing.assert_array_equal(seen[-1], x[32:])


def _loss(params, batch, **cfg):
  model, _ = _table_model()
  return losses.get_loss("grpo")(params, batch, jax.random.key(0), model=model, process=None,
                                 config={"epsilon": 0.2, "beta": 0.0, "p_mask_prompt": 0.1,
                                         "mask_id": MASK, **cfg})


def test_grpo_loss_closed_forms():
  batch = _batch()
  params = jnp.asarray(np.random.default_rng(0).normal(size=(11, V)), jnp.float32)
  comp, adv = batch["loss_mask"], batch["advantages"]
  # pi_old = pi: the value is -sum(A) / tokens, the gradient the policy gradient of A
  loss, m = _loss(params, batch)
  np.testing.assert_allclose(float(loss), -(adv * comp).sum() / comp.sum(), rtol=1e-5)
  model, _ = _table_model()

  def pg(p):
    lp = losses.completion_logp(model, p, batch, mask_id=MASK, p_mask_prompt=0.1)
    return -jnp.sum(lp * adv * comp) / comp.sum()

  g1 = jax.grad(lambda p: _loss(p, batch)[0])(params)
  np.testing.assert_allclose(np.asarray(g1), np.asarray(jax.grad(pg)(params)), atol=1e-6)
  # ratio 2 (old logp - log 2): clipped to 1 + eps where A > 0, kept where A < 0
  logp = losses.completion_logp(model, params, batch, mask_id=MASK, p_mask_prompt=0.1)
  old = dict(batch, old_logp=np.asarray(logp) - np.log(2.0))
  loss, m = _loss(params, old)
  per = np.where(adv > 0, -1.2 * adv, -2.0 * adv)
  np.testing.assert_allclose(float(loss), (per * comp).sum() / comp.sum(), rtol=1e-5)
  assert float(m["clip_ratio"]) == 1.0
  # the KL to the reference: 0 at the reference, > 0 elsewhere; k3 = e^d - d - 1
  ref = dict(batch, ref_logp=np.asarray(logp))
  assert abs(float(_loss(params, ref, beta=0.5)[1]["kl"])) < 1e-7
  d = -0.3
  loss_kl, m = _loss(params, dict(batch, ref_logp=np.asarray(logp) + d), beta=0.5)
  k3 = np.exp(d) - d - 1
  np.testing.assert_allclose(float(m["kl"]), k3, rtol=1e-4)
  np.testing.assert_allclose(float(loss_kl) - float(_loss(params, batch)[0]), 0.5 * k3, rtol=1e-4)


def test_builtin_rewards():
  heads = ['def f(x):\n    """Return x."""\n    ']
  assert rewards.python_parses(heads, ["return x\n    y = ("]) == [1.0]  # unfinished last line cut
  assert rewards.python_parses(heads, ["return (\n"]) == [0.0]
  assert rewards.python_parses(heads, ["return x"]) == [0.0]  # no complete line
  assert rewards.python_parses(heads, ["# a comment\n  # another\n"]) == [0.0]  # no code
  assert rewards.exact_match(["q"] * 3, ["<answer> 4 </answer>", "4", "5"], answer=[4, 4, 4]) == [
      1.0, 1.0, 0.0]
  assert rewards.format_reward(["q"], ["<reasoning>a</reasoning>\n<answer>b</answer>"]) == [1.0]
  assert rewards.length(["q", "q"], ["x" * 64, "x" * 32]) == [1.0, 0.5]
  with pytest.raises(UserError, match="grpo.rewards: unknown reward 'nope'"):
    rewards.get("nope")


def test_bad_grpo_configs_get_one_line_errors(tmp_path):
  sys.path.insert(0, str(ROOT))
  try:
    from configs import grpo as recipe  # noqa: PLC0415
  finally:
    sys.path.remove(str(ROOT))
  c = recipe.get_config("smoke")
  c.grpo.num_generations = 3
  with pytest.raises(UserError, match="num_generations=3 must be >= 2 and divide train.batch_size=8"):
    grpo.check(c)
  c = recipe.get_config("smoke")
  c.grpo.rewards = ("python_parses", "no_such_module:f")
  c.grpo.reward_weights = (1.0, 1.0)
  with pytest.raises(UserError, match="cannot import module 'no_such_module'"):
    grpo.check(c)
  c.grpo.rewards = ("python_parses",)
  with pytest.raises(UserError, match="one weight each"):
    grpo.check(c)


REWARD_FILE = textwrap.dedent("""
    def spaces(prompts, completions, **columns):
      return [sum(ch == " " for ch in c) / max(len(c), 1) for c in completions]
""")


@pytest.fixture(scope="module")
def base(tmp_path_factory, smoke_base) -> pathlib.Path:
  d = tmp_path_factory.mktemp("grpo")
  (d / "base").symlink_to(smoke_base)
  (d / "test_local_rewards.py").write_text(REWARD_FILE)
  return d


def test_grpo_raises_a_learnable_reward(base):
  wd = base / "rl"
  r = dlm("train", f"--config={GRPO_SMOKE}", f"--workdir={wd}", f"--init_from={base / 'base'}",
          "--config.grpo.rewards=test_local_rewards:spaces", "--config.train.steps=30",
          "--config.optim.lr=1e-3", "--config.grpo.num_iterations=1", "--config.train.eval_every=30",
          "--config.seed=3", pythonpath=str(base))
  records = [json.loads(l) for l in (wd / "metrics.jsonl").read_text().splitlines()]
  reward = [x["reward"] for x in records if "reward" in x]
  assert len(reward) == 30  # a rollout per step (one inner iteration)
  assert np.mean(reward[-8:]) > np.mean(reward[:4]) + 0.15, reward
  assert any("kl" in x for x in records) and any("val_reward" in x for x in records)
  assert "val reward" in r.stdout + r.stderr
  out = dlm("plot", f"--workdir={wd}").stdout.strip().splitlines()[-1]
  assert out.endswith("curves.png") and pathlib.Path(out).stat().st_size > 10_000


def test_grpo_resumes_exactly_after_sigkill_mid_cycle_with_every_d1_knob(base, tmp_path):
  knobs = {  # each of d1's knobs given explicitly, off its default where it is cheap
      "grpo.num_generations": 4, "grpo.max_prompt_length": 32, "grpo.max_completion_length": 16,
      "grpo.num_iterations": 2, "grpo.diffusion_steps": 8, "grpo.block_length": 8,
      "grpo.temperature": 0.7, "grpo.cfg_scale": 0.5, "grpo.remasking": "random",
      "grpo.random_masking": False, "grpo.generation_batch_size": 4, "grpo.scale_rewards": True,
      "loss.epsilon": 0.3, "loss.beta": 0.05, "loss.p_mask_prompt": 0.2}
  data = recipes.killed_then_resumed_is_exact(  # checkpoint 3 ends inside a two-step cycle
      [f"--config={GRPO_SMOKE}", f"--init_from={base / 'base'}", "--config.train.steps=4",
       "--config.train.checkpoint_every=3", "--config.train.log_every=2",
       "--config.train.eval_every=100", "--config.grpo.rewards=length",
       *[f"--config.{k}={v}" for k, v in knobs.items()]], tmp_path, 4, kill_after=3)
  cfg = json.loads((tmp_path / "a" / "config.json").read_text())
  for k, v in knobs.items():
    section, name = k.split(".")
    assert cfg[section][name] == v, k
  buf = grpo._unpack(data["buffer"])
  groups = (buf["advantages"][:, 0]).reshape(-1, 4)
  np.testing.assert_allclose(groups.sum(1), 0.0, atol=1e-4)  # A = (r - group mean) / std
  std = groups.std(1)
  assert np.all((std < 1e-3) | (np.abs(std - 1.0) < 1e-2)), std  # scale_rewards
  assert buf["old_logp"].shape[0] == buf["ref_logp"].shape[0] == 2  # one per inner iteration
  assert len(set(buf["mask_seeds"].tolist())) == 1  # random_masking=False: one prompt mask
  comp = buf["loss_mask"][:, 32:]
  assert (np.diff(comp, axis=1) <= 0).all()  # the completion mask stops after the first EOS
