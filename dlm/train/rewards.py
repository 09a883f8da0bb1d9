"""Reward functions for reinforcement learning (``configs/grpo.py``), TRL's and d1's contract:

  reward(prompts: list[str], completions: list[str], **columns) -> list[float]

``columns`` are the prompt file's other fields (e.g. ``answer``), one list entry per
completion.  A config names rewards by registered name or ``module:function``
(``config.grpo.rewards``, weighted by ``config.grpo.reward_weights``).
"""

from __future__ import annotations

import ast
import re
import warnings
from typing import Any, Callable, Sequence

from dlm.errors import UserError
from dlm.registry import Registry

RewardFn = Callable[..., Sequence[float]]
REWARDS: Registry[RewardFn] = Registry("reward")

ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
FORMAT = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)


def get(name: str) -> RewardFn:
  try:
    fn = REWARDS.get(name)
  except ValueError as e:
    raise UserError(f"grpo.rewards: {e}") from None
  if not callable(fn):
    raise UserError(f"grpo.rewards: {name!r} is not a function")
  return fn


def _answer(completion: str) -> str:
  m = ANSWER.search(completion)
  return (m.group(1) if m else completion).strip()


@REWARDS.register("exact_match")
def exact_match(prompts: list[str], completions: list[str], answer: list[Any] | None = None,
                **_: Any) -> list[float]:
  """1 when the completion's ``<answer>...</answer>`` (else the whole completion, stripped)
  equals the prompt file's ``answer`` (d1's correctness reward, scaled to 1)."""
  if answer is None:
    raise UserError("reward 'exact_match' needs an \"answer\" field in every prompt line")
  return [float(_answer(c) == str(a).strip()) for c, a in zip(completions, answer)]


@REWARDS.register("format")
def format_reward(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
  """1 when the completion is ``<reasoning>...</reasoning> <answer>...</answer>`` (d1's soft
  format reward, scaled to 1)."""
  return [float(bool(FORMAT.search(c))) for c in completions]


@REWARDS.register("length")
def length(prompts: list[str], completions: list[str], target_length: list[Any] | None = None,
           **_: Any) -> list[float]:
  """1 - |len - target| / target over characters (target: the prompt's ``target_length``,
  else 64), floored at 0."""
  targets = target_length or [64] * len(completions)
  return [max(0.0, 1.0 - abs(len(c) - float(t)) / float(t)) for c, t in zip(completions, targets)]


def _parses(code: str) -> bool:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # SyntaxWarnings of odd escapes in generated code
    try:
      ast.parse(code)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
      return False
  return True


@REWARDS.register("python_parses")
def python_parses(prompts: list[str], completions: list[str], **_: Any) -> list[float]:
  """1 when prompt + completion, cut after its last complete line, parses as Python and the
  completion adds at least one line of code (not blank, not only a comment); else 0.  (The
  embedded default's reward: the prompts are stdlib function headers, the completions their
  bodies; without the code-line rule a policy learns to write comments.)"""
  out = []
  for p, c in zip(prompts, completions):
    body = c[:c.rfind("\n") + 1] if "\n" in c else ""
    code = any(line.strip() and not line.strip().startswith("#") for line in body.splitlines())
    out.append(float(code and _parses(p + body)))
  return out
