"""D3PM: discrete-time diffusion with general transition matrices (Austin+ 2021).

T = num_steps grid steps; a time t in [0, 1] is grid step i = ceil(t T) (t in ((i-1)/T, i/T]
is step i, with a 1e-3-step slack for float32 rounding, and any t > 0 is at least step 1;
t = 0 is step 0, the clean data).  Every transition gives Q_{t|s} for ANY two grid steps
j < i, not only adjacent ones, so samplers may walk a coarser grid than T:

  uniform, absorbing, knn:  Q_{t|s} = expm((c_i - c_j) R),  c_i = -log alpha(i / T)  (c_0 = 0),
    uniform    R = 11^T/V - I        expm(cR) = e^{-c} I + (1 - e^{-c}) 1 pi^T, pi uniform,
    absorbing  R = 1 e_mask^T - I    the same with pi = onehot(mask_id),
    knn        R = (A - diag(A 1)) / knn_k, A the symmetrized kNN graph of the token
               embeddings (cosine similarity, D3PM sec. 3 "nearest-neighbour" matrices), a
               symmetric generator with uniform stationary law: expm(cR) = U diag(e^{c lam}) U^T;
  matrix:  Q_{t|s} = M^{i-j} for the user's one-step matrix M (the schedule is unused).

So Qbar_i = Q_{i|0} and Qbar_j Q_{i|j} = Qbar_i exactly (a semigroup).  Absorbing sets
alpha(1) := 0 at the last step, as D3PM's text code does (``state[-1] = 0``), so q(x_T | x_0)
is exactly the all-mask prior and the prior KL is finite.

DiffusionBERT's "spindle noise schedule" (He+ 2023; absorbing only): a token v is masked at
its own rate, alpha_i(v) = clip(alpha_i + lambda sin(pi i / T) (h(v) - hbar), 0, 0.999),
h(v) = log(count(v) + 1) / max_w log(count(w) + 1).  DiffusionBERT centres h by the mean
over the tokens of each sequence; here hbar is the frequency-weighted mean of h over the
vocabulary, so each position's forward process stays independent of the others.
alpha_i(v) must be non-increasing in i: this is checked on the grid at construction.

Data files (``knn_embeddings``, ``matrix``, ``word_freq``) are untrusted ``.npy`` arrays,
loaded with ``allow_pickle=False``; anything wrong with them is a one-line UserError.  The
knn and matrix transitions keep [V, V] arrays (matrix: [T + 1, V, V] powers), so they are
meant for vocabularies of up to a few thousand tokens.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import chex
import jax
import jax.numpy as jnp
import numpy as np

from dlm.errors import UserError
from dlm.processes import common
from dlm.processes.base import PROCESSES
from dlm.processes.schedules import Schedule
from dlm.processes.uniform import generalized_kl

Array = jnp.ndarray

TRANSITIONS = ("uniform", "absorbing", "knn", "matrix")
_STEP_SLACK = 1e-3  # grid steps: t T within this of an integer i counts as step i
_SPINDLE_MAX = 0.999  # DiffusionBERT's clip of the per-token alpha
_ROW_SUM_TOL = 1e-4
_MAX_TABLE = 2**28  # float32 entries of the matrix-power table (1 GiB)


def _one_line(err: BaseException) -> str:
  return " ".join(str(err).split()) or type(err).__name__


def load_npy(what: str, path: str) -> np.ndarray:
  """A numeric ndarray from an untrusted .npy file (no pickles), or a one-line UserError."""
  try:
    arr = np.load(path, allow_pickle=False)
  except (OSError, ValueError, EOFError) as err:
    raise UserError(f"d3pm {what} {path}: cannot read it as a .npy array ({_one_line(err)}):"
                    " save a numeric array with numpy.save") from None
  if not isinstance(arr, np.ndarray):
    raise UserError(f"d3pm {what} {path}: holds several arrays (.npz), not one: save a single"
                    " array with numpy.save")
  if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
    raise UserError(f"d3pm {what} {path}: dtype {arr.dtype} is not numeric: save an int or"
                    " float array")
  arr = arr.astype(np.float64)
  if not np.all(np.isfinite(arr)):
    raise UserError(f"d3pm {what} {path}: has NaN or infinite entries: every entry must be"
                    " finite")
  return arr


def check_stochastic(path: str, m: np.ndarray, vocab_size: int) -> np.ndarray:
  """The user's one-step matrix, validated and rows renormalized (float64 [V, V])."""
  if m.shape != (vocab_size, vocab_size):
    raise UserError(f"d3pm matrix {path}: shape {m.shape}, not ({vocab_size}, {vocab_size}):"
                    " give a [vocab_size, vocab_size] transition matrix")
  neg = np.argwhere(m < 0)
  if len(neg):
    r, c = neg[0]
    raise UserError(f"d3pm matrix {path}: entry ({r}, {c}) is {m[r, c]:.4g} < 0: transition"
                    " probabilities are non-negative")
  sums = m.sum(-1)
  bad = np.flatnonzero(np.abs(sums - 1.0) > _ROW_SUM_TOL)
  if len(bad):
    raise UserError(f"d3pm matrix {path}: row {bad[0]} sums to {sums[bad[0]]:.6g}, not 1:"
                    " every row of a transition matrix is a distribution")
  return m / sums[:, None]


def knn_generator(path: str, emb: np.ndarray, vocab_size: int, k: int) -> np.ndarray:
  """R = (A - diag(A 1)) / k for the symmetrized cosine kNN graph A (float64 [V, V])."""
  if emb.ndim != 2 or emb.shape[0] != vocab_size or emb.shape[1] < 1:
    raise UserError(f"d3pm knn_embeddings {path}: shape {emb.shape}, not ({vocab_size}, D):"
                    " give one embedding row per token")
  norms = np.linalg.norm(emb, axis=-1)
  if np.any(norms == 0):
    raise UserError(f"d3pm knn_embeddings {path}: row {int(np.argmin(norms))} is all zeros:"
                    " cosine similarity needs non-zero embeddings")
  unit = emb / norms[:, None]
  sim = unit @ unit.T
  np.fill_diagonal(sim, -np.inf)
  nbrs = np.argsort(-sim, axis=-1, kind="stable")[:, :k]  # ties: lower id first
  adj = np.zeros((vocab_size, vocab_size))
  adj[np.arange(vocab_size)[:, None], nbrs] = 1.0
  adj = np.maximum(adj, adj.T)
  parts = _components(adj)
  if parts > 1:
    raise UserError(f"d3pm knn_embeddings {path}: the {k}-nearest-neighbour graph has {parts}"
                    " disconnected parts, so noise never mixes them: raise knn_k")
  return (adj - np.diag(adj.sum(-1))) / k


def _components(adj: np.ndarray) -> int:
  seen = np.zeros(len(adj), bool)
  parts = 0
  for start in range(len(adj)):
    if seen[start]:
      continue
    parts += 1
    frontier = np.zeros(len(adj), bool)
    frontier[start] = True
    while frontier.any():
      seen |= frontier
      frontier = (adj[frontier].sum(0) > 0) & ~seen
  return parts


def symmetric_expm_basis(rate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(U, lam) with rate = U diag(lam) U^T, lam <= 0, the stationary mode exactly 1/sqrt(V)
  with lam = 0 (so e^{c lam} stays 1 for c = inf)."""
  lam, u = np.linalg.eigh(rate)  # ascending: lam[-1] ~ 0 is the constant vector
  lam = np.minimum(lam, 0.0)
  lam[-1] = 0.0
  u[:, -1] = 1.0 / math.sqrt(len(rate))
  return u, lam


def spindle_offsets(path: str, counts: np.ndarray, mask_id: int) -> np.ndarray:
  """h(v) - hbar for DiffusionBERT's spindle (0 at mask_id): float64 [V]."""
  if counts.ndim != 1 or np.any(counts < 0) or counts.sum() <= 0:
    raise UserError(f"d3pm word_freq {path}: must be non-negative token counts,"
                    " not all zero: count each token id in the data")
  h = np.log1p(counts)
  h = h / h.max()
  off = h - np.sum(counts * h) / counts.sum()
  off[mask_id] = 0.0
  return off


def spindle_alphas(alpha: np.ndarray, lam: float, offsets: np.ndarray) -> np.ndarray:
  """DiffusionBERT's per-token alpha_i(v) on the grid: [T + 1, len(offsets)], row 0 ones,
  row T zeros (alpha(1) := 0): clip(alpha_i + lam sin(pi i / T) offsets, 0, 0.999)."""
  num_steps = len(alpha) - 1
  i = np.arange(num_steps + 1)[:, None]
  a = np.clip(alpha[:, None] + lam * np.sin(np.pi * i / num_steps) * offsets[None],
              0.0, _SPINDLE_MAX)
  return np.where(i == 0, 1.0, np.where(i == num_steps, 0.0, a))


def check_spindle(alpha: np.ndarray, lam: float, offsets: np.ndarray, mask_id: int) -> None:
  """UserError unless every token's alpha_i(v) is non-increasing in i."""
  for lo in range(0, len(offsets), 4096):
    a = spindle_alphas(alpha, lam, offsets[lo:lo + 4096])
    rise = np.argwhere(np.diff(a, axis=0) > 1e-7)
    rise = rise[rise[:, 1] + lo != mask_id]
    if len(rise):
      step, tok = rise[0]
      raise UserError(f"d3pm word_freq_lambda={lam}: token {tok + lo}'s alpha rises from step"
                      f" {step} to {step + 1} ({a[step, tok]:.4g} -> {a[step + 1, tok]:.4g}),"
                      " so noise would unmask it: lower word_freq_lambda")


def _opt(default: Any = None) -> Any:
  return dataclasses.field(init=False, repr=False, compare=False, default=default)


@PROCESSES.register("d3pm")
@dataclasses.dataclass(frozen=True)
class D3PMProcess:
  """D3PM (Austin+ 2021, eqs. 1-4): x0-parameterized discrete-time process, general Q_t.

  Logits are [B, L, vocab_size] over every id (mask_id included): x_hat = softmax(logits)
  and p(x_s | x_t) is D3PM eq. 4, sum_x0 q(x_s, x_t | x0) x_hat(x0) renormalized.
  """

  kind: ClassVar[str] = "general"
  parameterization: ClassVar[str] = "x0"

  vocab_size: int
  mask_id: int
  schedule: Schedule
  num_steps: int = 1000  # T: times t = i / T, i = ceil(t T) in 1..T
  transition: str = "uniform"  # uniform | absorbing | knn | matrix
  knn_embeddings: str = ""  # .npy [V, D] token embeddings (knn)
  knn_k: int = 10  # neighbours per token (knn)
  matrix: str = ""  # .npy [V, V] one-step transition matrix, rows sum to one (matrix)
  word_freq: str = ""  # .npy [V] token counts: DiffusionBERT's spindle (absorbing)
  word_freq_lambda: float = 0.0  # DiffusionBERT's lambda (0: no spindle)

  _alpha: Any = _opt()  # float32 [T + 1]: alpha(i / T), 1 at i = 0
  _spindle: Any = _opt()  # float32 [V]: lambda (h(v) - hbar), 0 at mask_id (absorbing)
  _eig: Any = _opt()  # (U float32 [V, V], lam float32 [V]) (knn)
  _powers: Any = _opt()  # float32 [T + 1, V, V]: M^i (matrix)
  _prior: Any = _opt()  # float32 [V]: the stationary / prior law of x_T

  def __post_init__(self):
    self._validate()
    v, num = self.vocab_size, self.num_steps
    alpha = np.asarray(self.schedule.alpha(np.arange(num + 1) / num), np.float64)
    alpha[0] = 1.0
    if self.transition == "absorbing":
      alpha[-1] = 0.0
    put = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731
    put("_alpha", alpha.astype(np.float32))
    prior = np.full(v, 1.0 / v)
    if self.transition == "absorbing":
      prior = np.eye(v)[self.mask_id]
      if self.word_freq and self.word_freq_lambda != 0.0:
        counts = load_npy("word_freq", self.word_freq)
        if counts.shape != (v,):
          raise UserError(f"d3pm word_freq {self.word_freq}: shape {counts.shape}, not ({v},):"
                          " give one count per token id")
        offsets = spindle_offsets(self.word_freq, counts, self.mask_id)
        lam = float(self.word_freq_lambda)
        check_spindle(alpha, lam, offsets, self.mask_id)
        put("_spindle", (lam * offsets).astype(np.float32))
    elif self.transition == "knn":
      rate = knn_generator(self.knn_embeddings, load_npy("knn_embeddings", self.knn_embeddings),
                           v, self.knn_k)
      u, lam = symmetric_expm_basis(rate)
      put("_eig", (u.astype(np.float32), lam.astype(np.float32)))
    elif self.transition == "matrix":
      m = check_stochastic(self.matrix, load_npy("matrix", self.matrix), v)
      powers = [np.eye(v)]
      for _ in range(num):
        powers.append(powers[-1] @ m)
      put("_powers", np.stack(powers).astype(np.float32))
      prior = powers[-1].mean(0)  # law of x_T for a uniform x_0
    put("_prior", (prior / prior.sum()).astype(np.float32))

  def _validate(self) -> None:
    if self.transition not in TRANSITIONS:
      raise UserError(f"d3pm transition {self.transition!r} is unknown: use one of"
                      f" {', '.join(TRANSITIONS)}")
    if not 0 <= self.mask_id < self.vocab_size:
      raise UserError(f"d3pm mask_id={self.mask_id} must be in [0, vocab_size="
                      f"{self.vocab_size})")
    if self.num_steps < 1:
      raise UserError(f"d3pm num_steps={self.num_steps}: give at least 1 step")
    needs = {"knn": ("knn_embeddings", self.knn_embeddings),
             "matrix": ("matrix", self.matrix)}
    for transition, (field, value) in needs.items():
      if self.transition == transition and not value:
        raise UserError(f"d3pm transition {transition!r} needs {field}: the path of a .npy"
                        " array")
      if self.transition != transition and value:
        raise UserError(f"d3pm {field} is only used by transition {transition!r}, not"
                        f" {self.transition!r}: remove it or set transition={transition!r}")
    if self.word_freq and self.transition != "absorbing":
      raise UserError(f"d3pm word_freq (the spindle schedule) needs transition 'absorbing',"
                      f" not {self.transition!r}: remove word_freq or change transition")
    if self.word_freq_lambda != 0.0 and not self.word_freq:
      raise UserError("d3pm word_freq_lambda needs word_freq: the path of a .npy of token"
                      " counts")
    if not math.isfinite(self.word_freq_lambda):
      raise UserError(f"d3pm word_freq_lambda={self.word_freq_lambda} must be finite")
    if self.transition == "knn" and not 1 <= self.knn_k < self.vocab_size:
      raise UserError(f"d3pm knn_k={self.knn_k} must be in [1, vocab_size={self.vocab_size})")
    if self.transition == "matrix" and (self.num_steps + 1) * self.vocab_size**2 > _MAX_TABLE:
      raise UserError(f"d3pm matrix: num_steps={self.num_steps} powers of a {self.vocab_size}"
                      f"-token matrix exceed {_MAX_TABLE} floats: lower num_steps")

  # --- grid ------------------------------------------------------------------

  def step_index(self, t: Array) -> Array:
    """Grid step i = ceil(t T) of float times (int32, same shape), 0 only for t <= 0."""
    t = jnp.asarray(t, jnp.float32)
    i = jnp.ceil(t * self.num_steps - _STEP_SLACK).astype(jnp.int32)
    i = jnp.where(t > 0, jnp.maximum(i, 1), 0)
    return jnp.clip(i, 0, self.num_steps)

  # --- forward process -------------------------------------------------------

  def corrupt(self, rng: chex.PRNGKey, x0: Array, t: Array) -> Array:
    """x_t ~ q(x_t | x_0) = Cat(Qbar_t[x_0, :]) (D3PM eq. 3): [B, L]."""
    probs = self.marginal(x0, t)
    logp = jnp.where(probs > 0, jnp.log(jnp.maximum(probs, common.TINY)), -jnp.inf)
    return jax.random.categorical(rng, logp, axis=-1).astype(x0.dtype)

  def marginal(self, x0: Array, t: Array) -> Array:
    """q(x_t | x_0) = Qbar_t[x_0, :] (D3PM eq. 3): probs [B, L, V]."""
    common.check_tokens_and_times(x0, t)
    return self._rows(x0, self.step_index(t), jnp.zeros_like(self.step_index(t)))

  def transition_probs(self, x_s: Array, t: Array, s: Array) -> Array:
    """q(x_t | x_s) = Q_{t|s}[x_s, :] for grid times s <= t (D3PM eq. 2, many steps): [B, L, V]."""
    common.check_tokens_and_times(x_s, t)
    chex.assert_equal_shape([t, s])
    return self._rows(x_s, self.step_index(t), self.step_index(s))

  def prior_probs(self) -> Array:
    """p(x_T) [V]: uniform (uniform, knn), onehot(mask_id) (absorbing), mean row of M^T
    (matrix: the law of x_T for a uniform x_0)."""
    return jnp.asarray(self._prior)

  def sample_prior(self, rng: chex.PRNGKey, shape: tuple[int, ...]) -> Array:
    """x_T ~ p(x_T) = prior_probs(), iid per position: int32 ``shape``."""
    if self.transition == "absorbing":
      return jnp.full(shape, self.mask_id, jnp.int32)
    if self.transition in ("uniform", "knn"):
      return jax.random.randint(rng, shape, 0, self.vocab_size, jnp.int32)
    logp = jnp.log(jnp.maximum(self.prior_probs(), common.TINY))
    return jax.random.categorical(rng, logp, shape=shape).astype(jnp.int32)

  # --- losses ----------------------------------------------------------------

  def prior_kl(self, x0: Array, loss_mask: Array | None = None) -> Array:
    """sum_l KL(q(x_T | x_0) || p(x_T)) over counted positions (D3PM eq. 1, L_T): nats [B]."""
    chex.assert_rank(x0, 2)
    last = jnp.full(x0.shape, self.num_steps, jnp.int32)
    q_T = self._rows(x0, last, jnp.zeros_like(last))
    log_prior = jnp.log(jnp.maximum(self.prior_probs(), common.TINY))
    log_q = jnp.where(q_T > 0, jnp.log(jnp.maximum(q_T, common.TINY)), -jnp.inf)
    per_pos = jnp.sum(generalized_kl(log_q, log_prior), -1)  # [B, L]
    counted = common.loss_mask_or_ones(loss_mask, x0) > 0
    return jnp.sum(jnp.where(counted, per_pos, 0.0), -1)

  def nelbo(self, logits: Array, x0: Array, x_t: Array, t: Array,
            loss_mask: Array | None = None) -> Array:
    """Unbiased one-time estimate of D3PM's T-step NELBO (eq. 1), nats [B]:

      T * L_{i-1}(x_t) + L_T,   i = ceil(t T),

    L_{i-1} the step (i -> i-1) KL (reconstruction -log p(x_0 | x_1) at i = 1), L_T the exact
    prior KL.  For t ~ U(0, 1], i ~ U{1..T} and E_t[nelbo] = L_T + sum_i L_{i-1}.
    """
    self._check(logits, x0, x_t, t)
    i_t = jnp.maximum(self.step_index(t), 1)
    per_pos = self._step_terms(logits, x0, x_t, i_t, i_t - 1)
    counted = common.loss_mask_or_ones(loss_mask, x0) > 0
    steps = self.num_steps * jnp.sum(jnp.where(counted, per_pos, 0.0), -1)
    return steps + self.prior_kl(x0, loss_mask)

  def discrete_nelbo(self, logits: Array, x0: Array, x_t: Array, t: Array,
                     s: Array, loss_mask: Array | None = None) -> Array:
    """sum_l KL(q(x_s|x_t,x0) || p(x_s|x_t)) per sequence [B], s < t (D3PM eq. 1, L_{t-1});
    at grid step s = 0 the reconstruction -log p(x_0 = x0 | x_t) (D3PM's L_0)."""
    self._check(logits, x0, x_t, t)
    chex.assert_equal_shape([t, s])
    per_pos = self._step_terms(logits, x0, x_t, self.step_index(t), self.step_index(s))
    counted = common.loss_mask_or_ones(loss_mask, x0) > 0
    return jnp.sum(jnp.where(counted, per_pos, 0.0), -1)

  # --- reverse process -------------------------------------------------------

  def posterior(self, logits: Array, x_t: Array, t: Array, s: Array) -> Array:
    """Model step p(x_s | x_t) probs [B, L, V] (D3PM eq. 4 with x_hat = softmax(logits))."""
    common.check_logits(logits, x_t, self.vocab_size)
    return self.posterior_from_x0_probs(
        jax.nn.softmax(logits.astype(jnp.float32), axis=-1), x_t, t, s)

  def posterior_from_x0_probs(self, x0_probs: Array, x_t: Array, t: Array,
                              s: Array) -> Array:
    """p(x_s | x_t) propto Q_{t|s}[x_s, x_t] sum_x0 x0_probs(x0) Qbar_s[x0, x_s] (D3PM eq. 4).

    x0_probs [B, L, V] are renormalized first; the result's rows sum to one.
    """
    common.check_tokens_and_times(x_t, t)
    common.check_logits(x0_probs, x_t, self.vocab_size)
    chex.assert_equal_shape([t, s])
    return jnp.exp(self._log_posterior(x0_probs, x_t, self.step_index(t),
                                       self.step_index(s)))

  def exact_posterior(self, x0: Array, x_t: Array, t: Array, s: Array) -> Array:
    """q(x_s | x_t, x_0) = Q_{t|s}[x_s, x_t] Qbar_s[x_0, x_s] / Qbar_t[x_0, x_t] (D3PM eq. 3)."""
    chex.assert_equal_shape([x0, x_t])
    return self.posterior_from_x0_probs(
        jax.nn.one_hot(x0, self.vocab_size, dtype=jnp.float32), x_t, t, s)

  # --- helpers ---------------------------------------------------------------

  def _check(self, logits: Array, x0: Array, x_t: Array, t: Array) -> None:
    common.check_tokens_and_times(x0, t)
    chex.assert_equal_shape([x0, x_t])
    common.check_logits(logits, x0, self.vocab_size)

  def _step_terms(self, logits: Array, x0: Array, x_t: Array, i_t: Array,
                  i_s: Array) -> Array:
    """Per-position KL(q(x_s | x_t, x0) || p(x_s | x_t)), or -log p(x_0 = x0 | x_t) where
    i_s = 0: [B, L]."""
    x_hat = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    log_q = self._log_posterior(x_hat, x_t, i_t, i_s)
    log_p = self._log_posterior(jax.nn.one_hot(x0, self.vocab_size, dtype=jnp.float32), x_t,
                                i_t, i_s)
    kl = jnp.sum(generalized_kl(log_p, log_q), -1)
    recon = -common.gather_last(log_q, x0)
    return jnp.where(self._full(i_s, x0) == 0, recon, kl)

  def _log_posterior(self, x0_probs: Array, x_t: Array, i_t: Array, i_s: Array) -> Array:
    """log of D3PM eq. 4 between grid steps i_s <= i_t: [B, L, V] (finite: floored at TINY)."""
    p = x0_probs.astype(jnp.float32)
    p = common.safe_div(p, jnp.sum(p, axis=-1, keepdims=True))
    lik = self._cols(x_t, i_t, i_s)  # q(x_t | x_s = y) over y
    prior_s = self._vecmat(p, i_s, jnp.zeros_like(i_s))  # sum_x0 p(x0) Qbar_s[x0, y]
    log_joint = (jnp.log(jnp.maximum(lik, common.TINY))
                 + jnp.log(jnp.maximum(prior_s, common.TINY)))
    return jax.nn.log_softmax(log_joint, axis=-1)

  def _full(self, i: Array, x: Array) -> Array:
    """Grid steps per row [B] or per position [B, L] -> [B, L]."""
    return jnp.broadcast_to(common.bcast_time(i, 2), x.shape)

  def _ratio(self, i_hi: Array, i_lo: Array) -> Array:
    """e^{-(c_hi - c_lo)} = alpha_hi / alpha_lo in [0, 1] (1 where hi = lo), i's shape."""
    a = jnp.asarray(self._alpha)
    r = jnp.clip(common.safe_div(a[i_hi], a[i_lo]), 0.0, 1.0)
    return jnp.where(i_hi == i_lo, 1.0, r)

  def _token_alpha(self, i: Array) -> Array:
    """Absorbing with the spindle: alpha_i(v) per token [..., V] (spindle_alphas)."""
    a = jnp.asarray(self._alpha)[i][..., None]
    phase = jnp.sin(jnp.pi * i.astype(jnp.float32) / self.num_steps)[..., None]
    a = jnp.clip(a + phase * jnp.asarray(self._spindle), 0.0, _SPINDLE_MAX)
    return jnp.where((i == 0)[..., None], 1.0, jnp.where((i == self.num_steps)[..., None],
                                                         0.0, a))

  def _token_ratio(self, i_hi: Array, i_lo: Array) -> Array:
    """Absorbing: alpha_hi(v) / alpha_lo(v) per token, [..., V] (1 at mask_id)."""
    if self._spindle is None:
      r = self._ratio(i_hi, i_lo)[..., None]
    else:
      r = jnp.clip(common.safe_div(self._token_alpha(i_hi), self._token_alpha(i_lo)), 0.0, 1.0)
      r = jnp.where((i_hi == i_lo)[..., None], 1.0, r)
    return jnp.where(jnp.arange(self.vocab_size) == self.mask_id, 1.0, r)

  def _knn_weights(self, i_hi: Array, i_lo: Array) -> Array:
    """e^{(c_hi - c_lo) lam} = ratio^{-lam}: [..., V] eigenvalue weights (knn)."""
    lam = jnp.asarray(self._eig[1])
    return jnp.power(self._ratio(i_hi, i_lo)[..., None], -lam)

  def _rows(self, x: Array, i_hi: Array, i_lo: Array) -> Array:
    """Q_{hi|lo}[x, :]: [B, L, V] for tokens x [B, L] and steps [B] or [B, L]."""
    i_hi, i_lo = self._full(i_hi, x), self._full(i_lo, x)
    onehot = jax.nn.one_hot(x, self.vocab_size, dtype=jnp.float32)
    if self.transition == "uniform":
      r = self._ratio(i_hi, i_lo)[..., None]
      return r * onehot + (1.0 - r) / self.vocab_size
    if self.transition == "absorbing":
      r = common.gather_last(self._token_ratio(i_hi, i_lo), x)[..., None]
      mask = jax.nn.one_hot(self.mask_id, self.vocab_size, dtype=jnp.float32)
      return r * onehot + (1.0 - r) * mask
    if self.transition == "knn":
      u = jnp.asarray(self._eig[0])
      return jnp.maximum((u[x] * self._knn_weights(i_hi, i_lo)) @ u.T, 0.0)
    return jnp.asarray(self._powers)[i_hi - i_lo, x]

  def _cols(self, x: Array, i_hi: Array, i_lo: Array) -> Array:
    """Q_{hi|lo}[:, x] (the likelihood q(x_hi = x | x_lo = y) over y): [B, L, V]."""
    i_hi, i_lo = self._full(i_hi, x), self._full(i_lo, x)
    if self.transition in ("uniform", "knn"):  # symmetric
      return self._rows(x, i_hi, i_lo)
    if self.transition == "absorbing":
      r = self._token_ratio(i_hi, i_lo)  # [B, L, V]
      onehot = jax.nn.one_hot(x, self.vocab_size, dtype=jnp.float32)
      return jnp.where((x == self.mask_id)[..., None], 1.0 - r + r * onehot, r * onehot)
    return jnp.asarray(self._powers)[i_hi - i_lo, :, x]  # [B, L, V]: columns x

  def _vecmat(self, p: Array, i_hi: Array, i_lo: Array) -> Array:
    """p @ Q_{hi|lo} for distributions p [B, L, V] (rows sum to one): [B, L, V]."""
    if self.transition == "matrix":  # per-row steps gather [B, V, V], per-position [B, L, V, V]
      powers = jnp.asarray(self._powers)[i_hi - i_lo]
      return jnp.einsum("blv,bvw->blw" if powers.ndim == 3 else "blv,blvw->blw", p, powers)
    i_hi, i_lo = self._full(i_hi, p[..., 0]), self._full(i_lo, p[..., 0])
    if self.transition == "uniform":
      r = self._ratio(i_hi, i_lo)[..., None]
      return r * p + (1.0 - r) / self.vocab_size
    if self.transition == "absorbing":
      r = self._token_ratio(i_hi, i_lo)
      mask = jax.nn.one_hot(self.mask_id, self.vocab_size, dtype=jnp.float32)
      return r * p + jnp.sum((1.0 - r) * p, -1, keepdims=True) * mask
    u = jnp.asarray(self._eig[0])  # knn
    return jnp.maximum(((p @ u) * self._knn_weights(i_hi, i_lo)) @ u.T, 0.0)
