"""A sampler written outside dlm (test-local): greedy confidence with a temperature schedule.

Each call commits the ceil(masks left / calls left) most confident masked
positions to a Gumbel-perturbed argmax whose temperature goes linearly from
``t0`` to ``t1``.  At t0 = t1 = 0 with ``steps == gen_length`` it is LLaDA's
low-confidence remasking with one block and one token per call.
"""

import jax
import jax.numpy as jnp

from dlm.sample import categorical, engine, llada

KNOBS = {"steps": engine.Knob(8, "denoiser calls"), "gen_length": engine.Knob(8, "new tokens"),
         "t0": engine.Knob(1.0, "temperature of the first call"),
         "t1": engine.Knob(0.0, "temperature of the last call")}


def make(denoiser, process, *, steps, gen_length, t0, t1):
  del process, gen_length

  def init(rng, given, fixed, attention_mask):
    start = jnp.full(given.shape, denoiser.mask_id, jnp.int32)
    return engine.initial_state(rng, given, fixed, start, step=jnp.zeros((), jnp.int32),
                                am=attention_mask)

  def step(s):
    i = s.aux["step"]
    logits, _ = denoiser(s.x, None, attention_mask=s.aux["am"])
    rng, key = jax.random.split(s.rng)
    temp = t0 + (t1 - t0) * i / max(steps - 1, 1)
    x0 = jnp.argmax(logits + temp * categorical.gumbel(key, logits.shape), -1).astype(jnp.int32)
    probs = jax.nn.softmax(logits, -1)
    open_ = (s.x == denoiser.mask_id) & ~s.fixed
    conf = jnp.where(open_, jnp.take_along_axis(probs, x0[..., None], -1)[..., 0], -jnp.inf)
    k = -(-jnp.sum(open_, 1) // (steps - i))  # ceil: every mask filled by the last call
    commit = open_ & (llada.descending_rank(conf) < k[:, None])
    return s.replace(x=jnp.where(commit, x0, s.x), rng=rng, nfe=s.nfe + 1,
                     committed_at=jnp.where(commit, s.nfe, s.committed_at),
                     aux=dict(s.aux, step=i + 1))

  return engine.Sampler(init, step, lambda s: s.aux["step"] >= steps)


engine.declare(make, knobs=KNOBS)
