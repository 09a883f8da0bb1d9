"""The process contract (issue 22, part 1): processes declare their kind and parameterization
(no attribute probes), losses and samplers say which they take (a mismatch is one line naming
both), and times may be per row [B] or per position [B, L]."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from dlm import losses, processes
from dlm.errors import UserError
from dlm.models import loader, transformer
from dlm.processes import base
from dlm.processes.schedules import CosineSchedule, LinearSchedule
from dlm.sample import engine

V, MASK = 8, 7


def _masked():
  return processes.MaskedProcess(V, MASK, CosineSchedule())


def _uniform():
  return processes.UniformProcess(V, MASK, LinearSchedule())


def test_builtins_declare_kind_and_parameterization():
  assert base.describe(_masked()) == ("absorbing", "x0")
  assert base.describe(_uniform()) == ("uniform", "x0")
  ar = processes.AutoregressiveProcess(V, MASK, LinearSchedule())
  assert base.describe(ar) == ("identity", "x0")


def test_an_undeclared_process_is_one_line():
  @dataclasses.dataclass(frozen=True)
  class Bare:  # a user process that forgot its declarations
    vocab_size: int
    mask_id: int
    schedule: object

  with pytest.raises(UserError, match="declares no `kind`") as e:
    base.describe(Bare(V, MASK, LinearSchedule()))
  assert "\n" not in str(e.value)

  @dataclasses.dataclass(frozen=True)
  class Odd(Bare):
    kind = "sideways"
    parameterization = "x0"

  with pytest.raises(UserError, match="kind 'sideways' is not one of"):
    base.describe(Odd(V, MASK, LinearSchedule()))


def test_a_loss_names_the_process_it_cannot_take():
  with pytest.raises(UserError, match="loss 'nelbo_count' cannot take process 'UniformProcess'"
                                      " \\(kind uniform") as e:
    losses.check_process("nelbo_count", _uniform())
  assert "\n" not in str(e.value) and "absorbing" in str(e.value)
  losses.check_process("nelbo_count", _masked())
  losses.check_process("nelbo", _uniform())
  losses.check_process("my_pkg.mod:loss", _uniform())  # user losses declare nothing: any process


def test_a_sampler_names_the_process_it_cannot_take():
  cfg = transformer.ModelConfig(vocab_size=V, d_model=16, num_layers=1, num_heads=2, mlp_dim=32,
                                time_conditioning=True, cond_dim=16)
  graphdef, state = nnx.split(transformer.init_model(cfg, 0))
  config = ml_collections.ConfigDict({"process": {"name": "uniform",
                                                  "schedule": {"name": "linear"}}})
  model = loader.DiffusionLM(config=config, model_cfg=cfg, params=nnx.to_pure_dict(state),
                             ids={"mask": MASK, "eos": None, "pad": None, "bos": None},
                             tokenizer=None, apply=transformer.apply_fn(graphdef))
  prompt = np.array([[1, 2]], np.int32)
  with pytest.raises(UserError, match="sampler 'llada' cannot take process 'UniformProcess'"
                                      " \\(kind uniform") as e:
    model.generate(prompt, sampler="llada", steps=2, gen_length=2)
  assert "\n" not in str(e.value) and "ancestral" in str(e.value)
  out = model.generate(prompt, sampler="ancestral", steps=2, gen_length=2)
  assert out.sequences.shape == (1, 4)
  assert engine.resolve("ancestral").kinds == ("absorbing", "uniform", "general")


@pytest.mark.parametrize("make", [_masked, _uniform])
def test_per_position_times_equal_per_row_times_when_equal(make):
  p = make()
  rng = np.random.default_rng(0)
  x0 = jnp.asarray(rng.integers(0, V - 1, (3, 5)), jnp.int32)
  t = jnp.asarray([0.2, 0.5, 0.9], jnp.float32)
  t_pos = jnp.broadcast_to(t[:, None], x0.shape)
  key = jax.random.key(1)
  np.testing.assert_array_equal(p.corrupt(key, x0, t), p.corrupt(key, x0, t_pos))
  x_t = p.corrupt(key, x0, t)
  logits = jnp.asarray(rng.normal(size=(3, 5, V)), jnp.float32)
  np.testing.assert_allclose(p.nelbo(logits, x0, x_t, t), p.nelbo(logits, x0, x_t, t_pos),
                             rtol=1e-6)
  np.testing.assert_allclose(p.marginal(x0, t), p.marginal(x0, t_pos), rtol=1e-6)
  s = t * 0.5
  np.testing.assert_allclose(p.posterior(logits, x_t, t, s),
                             p.posterior(logits, x_t, t_pos, jnp.broadcast_to(s[:, None], x0.shape)),
                             rtol=1e-6)


@pytest.mark.parametrize("make", [_masked, _uniform])
def test_per_position_nelbo_is_the_sum_of_its_positions(make):
  """Each position's term is that of a per-row time equal to its own, counted alone."""
  p = make()
  rng = np.random.default_rng(1)
  x0 = jnp.asarray(rng.integers(0, V - 1, (2, 4)), jnp.int32)
  t_pos = jnp.asarray(rng.uniform(0.05, 0.95, (2, 4)), jnp.float32)
  x_t = p.corrupt(jax.random.key(2), x0, t_pos)
  logits = jnp.asarray(rng.normal(size=(2, 4, V)), jnp.float32)
  got = p.nelbo(logits, x0, x_t, t_pos)
  want = np.zeros(2)
  for pos in range(4):
    only = jnp.zeros((2, 4)).at[:, pos].set(1.0)
    want += np.asarray(p.nelbo(logits, x0, x_t, t_pos[:, pos], loss_mask=only))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_a_time_conditioned_model_takes_per_position_times():
  cfg = transformer.ModelConfig(vocab_size=V, d_model=16, num_layers=1, num_heads=2, mlp_dim=32,
                                time_conditioning=True, cond_dim=16)
  model = transformer.init_model(cfg, 0)
  graphdef, state = nnx.split(model)
  params = jax.tree.map(lambda a: a + 0.1, nnx.to_pure_dict(state))  # adaLN away from zero
  apply = transformer.apply_fn(graphdef)
  x = jnp.asarray([[1, 2, 3, 4], [4, 3, 2, 1]], jnp.int32)
  t = jnp.asarray([0.3, 0.8], jnp.float32)
  per_row, _ = apply(params, x, t)
  per_pos, _ = apply(params, x, jnp.broadcast_to(t[:, None], x.shape))
  np.testing.assert_allclose(per_row, per_pos, rtol=1e-5, atol=1e-5)
  mixed, _ = apply(params, x, jnp.asarray([[0.3, 0.3, 0.9, 0.9], [0.8] * 4], jnp.float32))
  assert not np.allclose(mixed[0], per_row[0], atol=1e-4)  # the times reach each position
  np.testing.assert_allclose(mixed[1], per_row[1], rtol=1e-5, atol=1e-5)


def _small(**kw):
  cfg = transformer.ModelConfig(vocab_size=V, d_model=16, num_layers=1, num_heads=2, mlp_dim=32,
                                **kw)
  graphdef, state = nnx.split(transformer.init_model(cfg, 0))
  return cfg, transformer.apply_fn(graphdef), nnx.to_pure_dict(state)


def test_continuous_inputs_are_the_embedding_path():
  """inputs_embeds = embed[x_t] is the token path; any vectors go through the same network."""
  _, apply, params = _small()
  x = jnp.asarray([[1, 2, 3, 4]], jnp.int32)
  by_ids, _ = apply(params, x)
  by_vectors, _ = apply(params, None, inputs_embeds=params["embed"][x])
  np.testing.assert_allclose(by_ids, by_vectors, rtol=1e-6, atol=1e-6)
  noisy = params["embed"][x] + 0.5
  assert not np.allclose(apply(params, None, inputs_embeds=noisy)[0], by_ids, atol=1e-3)


def test_self_conditioning_input():
  """Zero-initialised: no effect at init; trained weights make the previous estimate count;
  probabilities [B, L, V] enter as their expected embedding, vectors [B, L, D] as they are."""
  _, apply, params = _small(self_conditioning=True)
  x = jnp.asarray([[1, 2, 3, 4]], jnp.int32)
  probs = jax.nn.softmax(jnp.asarray(np.random.default_rng(0).normal(size=(1, 4, V)),
                                     jnp.float32), -1)
  plain, _ = apply(params, x)
  np.testing.assert_allclose(apply(params, x, self_cond=probs)[0], plain, atol=1e-6)
  params = dict(params, self_cond=params["self_cond"] + 0.3)
  with_p, _ = apply(params, x, self_cond=probs)
  assert not np.allclose(with_p, plain, atol=1e-3)
  np.testing.assert_allclose(apply(params, x, self_cond=probs @ params["embed"])[0], with_p,
                             rtol=1e-5, atol=1e-5)
  _, apply_plain, params_plain = _small()
  with pytest.raises(UserError, match="self-conditioning was asked of a denoiser without it") as e:
    apply_plain(params_plain, x, self_cond=probs)
  assert "\n" not in str(e.value) and "model.self_conditioning=True" in str(e.value)


def test_the_engine_runs_continuous_states():
  """A sampler whose state is vectors [B, L, D] (embedding diffusion) runs in the one loop;
  clamped positions keep their given vectors."""
  def make(denoiser, process, *, steps):
    del denoiser, process

    def init(rng, given, fixed, am):
      del am
      return engine.initial_state(rng, given, fixed, jnp.zeros(given.shape, jnp.float32),
                                  step=jnp.zeros((), jnp.int32))

    def step(s):
      x = jnp.where(s.fixed[..., None], s.given, s.x + 1.0)
      return s.replace(x=x, nfe=s.nfe + 1, aux=dict(s.aux, step=s.aux["step"] + 1))

    return engine.Sampler(init, step, lambda s: s.aux["step"] >= steps)

  given = jnp.full((2, 3, 4), 7.0, jnp.float32)
  fixed = jnp.asarray([[True, False, False], [False, False, True]])
  final = jax.jit(lambda g, f: engine.run(make(None, None, steps=5), jax.random.key(0), g, f))(
      given, fixed)
  assert final.x.dtype == jnp.float32 and final.x.shape == (2, 3, 4) and int(final.nfe) == 5
  np.testing.assert_array_equal(final.x[fixed], 7.0)
  np.testing.assert_array_equal(final.x[~fixed], 5.0)
  assert final.committed_at.shape == (2, 3)
