"""DDPM and DDIM sampling of continuous embedding diffusion (``dlm.processes.gaussian``), in the one
sampling contract (``dlm/sample/engine.py``).

The state's ``x`` is the current rounding (argmax of p(x0 | z_t), int32 [B, L]: what streams and
what ``committed_at`` follows); the continuous state z_t [B, L, D] rides in ``aux``.  Given
positions are clamped to their clean embeddings, as training keeps conditioning positions clean.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from dlm.sample import engine

Array = jax.Array


def _knobs(eta: float) -> dict[str, engine.Knob]:
  return {
      "steps": engine.Knob(128, "denoising steps on t = 1, 1 - 1/T, ..., 0"),
      "gen_length": engine.Knob(64, "tokens generated after a prompt (generate)"),
      "eta": engine.Knob(eta, "DDIM's eta: 1 = DDPM's ancestral step, 0 = deterministic"),
      "clamp": engine.Knob(False, "Diffusion-LM's clamping: x0_hat -> the embedding of its"
                                  " argmax at every step"),
      "temperature": engine.Knob(1.0, "softmax temperature of p(x0 | z_t) in x0_hat"),
  }


def make(denoiser: engine.Denoiser, process: Any, *, steps: int, gen_length: int = 64,
         eta: float = 1.0, clamp: bool = False, temperature: float = 1.0) -> engine.Sampler:
  """z_s = DDIM(z_t, x0_hat) on t = 1, 1 - 1/T, ..., 0 (Song et al. 2021, eq. 12; eta = 1 is
  DDPM, Ho et al. 2020, eq. 7), x0_hat = softmax(logits / temperature) @ e (CDCD) or, with
  ``clamp``, e(argmax) (Li et al. 2022, sec. 4.2); self-conditioned on the previous step's
  probabilities when the process is."""
  del gen_length  # sizes the template in engine.generate
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  if not 0.0 <= eta <= 1.0 or temperature <= 0.0:
    raise ValueError(f"need 0 <= eta <= 1 and temperature > 0, got eta={eta},"
                     f" temperature={temperature}")
  self_cond = bool(getattr(process, "self_condition", False))

  def call(z: Array, t: Array, probs: Array | None) -> Array:
    kw = {"inputs_embeds": z}
    if self_cond:
      kw["self_cond"] = probs
    return denoiser(None, t, **kw)[0].astype(jnp.float32)

  def init(rng: Array, given: Array, fixed: Array, am: Array | None) -> engine.State:
    del am  # registered with pads=False
    rng, prior_rng = jax.random.split(rng)
    z = process.sample_prior(prior_rng, given.shape)
    z = jnp.where(fixed[..., None], process.clean(given), z)
    aux: dict[str, Any] = {"step": jnp.zeros((), jnp.int32), "z": z}
    if self_cond:
      aux["probs"] = jnp.zeros(given.shape + (process.vocab_size,), jnp.float32)
    blank = jnp.full(given.shape, denoiser.mask_id, jnp.int32)
    return engine.initial_state(rng, given, fixed, blank, **aux)

  def step(state: engine.State) -> engine.State:
    b = state.x.shape[0]
    i = state.aux["step"]
    t = jnp.full((b,), 1.0 - i / steps, jnp.float32)
    s = jnp.full((b,), 1.0 - (i + 1) / steps, jnp.float32)
    z = state.aux["z"]
    logits = call(z, t, state.aux.get("probs"))
    probs = process.x0_probs(logits / temperature)
    best = jnp.argmax(probs, axis=-1).astype(jnp.int32)
    x0_hat = jnp.take(process.embeddings(), best, axis=0) if clamp else process.x0_estimate(probs)
    rng, noise_rng = jax.random.split(state.rng)
    z = process.ddim_step(z, x0_hat, t, s, eta, jax.random.normal(noise_rng, z.shape))
    z = jnp.where(state.fixed[..., None], process.clean(state.given), z)
    x = jnp.where(state.fixed, state.given, best)
    committed = jnp.where(x != state.x, state.nfe, state.committed_at)
    aux = dict(state.aux, step=i + 1, z=z)
    if self_cond:
      aux["probs"] = process.x0_probs(logits)
    return state.replace(x=x, rng=rng, nfe=state.nfe + 1, committed_at=committed, aux=aux)

  def done(state: engine.State) -> Array:
    return state.aux["step"] >= steps

  return engine.Sampler(init, step, done)


@engine.register("ddpm", knobs=_knobs(1.0), pads=False, infill=True, kinds=("gaussian",))
def ddpm(denoiser: engine.Denoiser, process: Any, *, steps: int, gen_length: int = 64,
         eta: float = 1.0, clamp: bool = False, temperature: float = 1.0) -> engine.Sampler:
  """DDPM's ancestral sampling of embedding diffusion (Ho+ 2020, eq. 7; DDIM with eta = 1)."""
  return make(denoiser, process, steps=steps, gen_length=gen_length, eta=eta, clamp=clamp,
              temperature=temperature)


@engine.register("ddim", knobs=_knobs(0.0), pads=False, infill=True, kinds=("gaussian",))
def ddim(denoiser: engine.Denoiser, process: Any, *, steps: int, gen_length: int = 64,
         eta: float = 0.0, clamp: bool = False, temperature: float = 1.0) -> engine.Sampler:
  """DDIM sampling of embedding diffusion (Song+ 2021, eq. 12; eta = 0 deterministic)."""
  return make(denoiser, process, steps=steps, gen_length=gen_length, eta=eta, clamp=clamp,
              temperature=temperature)
