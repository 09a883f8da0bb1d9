"""D3PM with general transitions (dlm/processes/d3pm.py): exact math on enumerable problems.

V = 5 tokens (mask_id = 4), T = 4 grid steps, L <= 2 positions, so every x_t sequence and
every reverse chain is enumerated exactly (float64 sums of the process's float32 outputs).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.stats

from dlm.errors import UserError
from dlm.processes import LinearSchedule
from dlm.processes.d3pm import D3PMProcess
from dlm.sample import engine, samplers

V, MASK, T = 5, 4, 4
NAMES = ["uniform", "absorbing", "knn", "matrix", "spindle"]
DATA_TOKENS = 4  # data never contain mask_id


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
  """Random knn embeddings, a row-stochastic matrix and token counts as .npy files."""
  d = tmp_path_factory.mktemp("d3pm")
  rng = np.random.default_rng(0)
  arrays = {"emb": rng.normal(size=(V, 4)), "mat": rng.dirichlet(np.full(V, 2.0), V),
            "freq": np.array([500, 40, 3, 0, 0])}
  for name, arr in arrays.items():
    np.save(d / f"{name}.npy", arr)
  return {name: str(d / f"{name}.npy") for name in arrays}


def make(name: str, files: dict[str, str], eps: float = 0.0, num_steps: int = T,
         **kw) -> D3PMProcess:
  fields = {"uniform": {}, "absorbing": {"transition": "absorbing"},
            "knn": {"transition": "knn", "knn_embeddings": files.get("emb"), "knn_k": 2},
            "matrix": {"transition": "matrix", "matrix": files.get("mat")},
            "spindle": {"transition": "absorbing", "word_freq": files.get("freq"),
                        "word_freq_lambda": 0.3}}[name]
  return D3PMProcess(V, MASK, LinearSchedule(eps=eps), num_steps=num_steps, **{**fields, **kw})


def times(*values: float, n: int = 1) -> jnp.ndarray:
  return jnp.asarray(np.repeat(np.asarray(values, np.float64), n), jnp.float32)


def qbar(p: D3PMProcess, i: int) -> np.ndarray:
  """Qbar_i [V, V] materialized through `marginal` (rows x0 = 0..V-1)."""
  return np.asarray(p.marginal(jnp.arange(V)[None], times(i / p.num_steps)), np.float64)[0]


def qstep(p: D3PMProcess, i: int, j: int) -> np.ndarray:
  """Q_{i|j} [V, V] through `transition_probs`."""
  n = p.num_steps
  return np.asarray(p.transition_probs(jnp.arange(V)[None], times(i / n), times(j / n)),
                    np.float64)[0]


def prior(p: D3PMProcess, files: dict[str, str]) -> np.ndarray:
  """p(x_T), computed here from the definitions."""
  if p.transition == "absorbing":
    return np.eye(V)[MASK]
  if p.transition == "matrix":
    return np.linalg.matrix_power(np.load(files["mat"]), p.num_steps).mean(0)
  return np.full(V, 1.0 / V)


def kl(q: np.ndarray, p: np.ndarray) -> np.ndarray:
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.sum(np.where(q > 0, q * np.log(q / p), 0.0), -1)


# --- forward process ------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_transitions_are_stochastic_and_compose(name, files):
  """Rows of Qbar_i and Q_{i|j} sum to one; Qbar_0 = I; Qbar_j Q_{i|j} = Qbar_i for all j < i."""
  p = make(name, files, eps=0.01)
  bars = [qbar(p, i) for i in range(T + 1)]
  np.testing.assert_allclose(bars[0], np.eye(V), atol=1e-6)
  for i in range(T + 1):
    assert np.all(bars[i] >= 0)
    np.testing.assert_allclose(bars[i].sum(-1), 1.0, atol=1e-6)
    for j in range(i):
      step = qstep(p, i, j)
      np.testing.assert_allclose(step.sum(-1), 1.0, atol=1e-6)
      np.testing.assert_allclose(bars[j] @ step, bars[i], atol=1e-6, err_msg=f"{i}|{j}")


def rate_matrix(name: str, files: dict[str, str], k: int = 2) -> np.ndarray:
  """R built here from the definitions (uniform, absorbing, knn)."""
  if name == "uniform":
    return np.full((V, V), 1.0 / V) - np.eye(V)
  if name == "absorbing":
    return np.tile(np.eye(V)[MASK], (V, 1)) - np.eye(V)
  emb = np.load(files["emb"])
  unit = emb / np.linalg.norm(emb, axis=-1, keepdims=True)
  adj = np.zeros((V, V))
  for v in range(V):
    others = sorted((u for u in range(V) if u != v), key=lambda u: -unit[v] @ unit[u])
    adj[v, others[:k]] = 1.0
  adj = np.maximum(adj, adj.T)
  return (adj - np.diag(adj.sum(-1))) / k


@pytest.mark.parametrize("name", ["uniform", "absorbing", "knn", "matrix", "spindle"])
def test_qbar_matches_definition(name, files):
  """Qbar_i = expm(c_i R), c_i = -log alpha(i/T) (uniform, absorbing, knn); M^i (matrix);
  DiffusionBERT's per-token alpha_i(v) (spindle).  Absorbing's last step is all-mask."""
  p = make(name, files, eps=0.01)
  alpha = 0.01 + 0.98 * (1.0 - np.arange(T + 1) / T)
  for i in range(1, T + 1):
    if name in ("uniform", "knn") or (name == "absorbing" and i < T):
      want = scipy.linalg.expm(-np.log(alpha[i]) * rate_matrix(name, files))
    elif name == "absorbing":
      want = np.tile(np.eye(V)[MASK], (V, 1))
    elif name == "matrix":
      want = np.linalg.matrix_power(np.load(files["mat"]), i)
    else:
      h = np.log1p(np.load(files["freq"]).astype(np.float64))
      h /= h.max()
      counts = np.load(files["freq"])
      a = np.clip(alpha[i] + 0.3 * np.sin(np.pi * i / T) * (h - counts @ h / counts.sum()),
                  0.0, 0.999)
      a = np.zeros(V) if i == T else a
      want = np.diag(a) + np.outer(1.0 - a, np.eye(V)[MASK])
      want[MASK] = np.eye(V)[MASK]
    np.testing.assert_allclose(qbar(p, i), want, atol=2e-6, err_msg=str(i))


@pytest.mark.parametrize("name", NAMES)
def test_corrupt_matches_marginal(name, files):
  """Empirical frequencies of corrupt over 4000 rows x V positions (x0 = 0..V-1) at two times."""
  p, n = make(name, files, eps=0.01), 4000
  x0 = jnp.broadcast_to(jnp.arange(V, dtype=jnp.int32), (n, V))
  for k, t in enumerate([0.3, 0.75]):
    x_t = np.asarray(p.corrupt(jax.random.key(k), x0, times(t, n=n)))
    want = np.asarray(p.marginal(x0[:1], times(t)), np.float64)[0]  # [V (x0), V]
    for v in range(V):
      freq = np.bincount(x_t[:, v], minlength=V) / n
      tol = 5.0 * np.sqrt(want[v] * (1 - want[v]) / n) + 1e-6
      assert np.all(np.abs(freq - want[v]) <= tol), (t, v, freq, want[v])


@pytest.mark.parametrize("name", NAMES)
def test_sample_prior(name, files):
  p = make(name, files)
  np.testing.assert_allclose(np.asarray(p.prior_probs()), prior(p, files), atol=1e-6)
  draws = np.asarray(p.sample_prior(jax.random.key(0), (400, 10)))
  assert draws.dtype == np.int32
  np.testing.assert_allclose(np.bincount(draws.ravel(), minlength=V) / draws.size,
                             prior(p, files), atol=0.03)


# --- bad input ------------------------------------------------------------------


def _matrix(kind: str) -> np.ndarray:
  m = np.full((V, V), 1.0 / V)
  if kind == "row_sum":
    m[3] *= 0.9
  elif kind == "negative":
    m[1, :2] = [-0.1, 0.3]
  elif kind == "shape":
    m = np.full((V, V + 1), 1.0 / (V + 1))
  elif kind == "nan":
    m[0, 0] = np.nan
  return m


@pytest.mark.parametrize("kind,says", [("row_sum", "row 3 sums to 0.9"), ("negative", "< 0"),
                                       ("shape", "shape (5, 6)"), ("nan", "NaN"),
                                       ("pickle", "cannot read"), ("missing", "cannot read")])
def test_bad_matrix_file_is_one_line_user_error(kind, says, tmp_path):
  path = tmp_path / "m.npy"
  if kind == "pickle":
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
  elif kind != "missing":
    np.save(path, _matrix(kind))
  with pytest.raises(UserError) as err:
    D3PMProcess(V, MASK, LinearSchedule(), transition="matrix", matrix=str(path))
  msg = str(err.value)
  assert "\n" not in msg and str(path) in msg and says in msg, msg
  assert msg.count(":") >= 2  # "d3pm matrix PATH: what: fix"


@pytest.mark.parametrize("fields,says", [
    ({"transition": "gaussian"}, "unknown"),
    ({"transition": "knn"}, "needs knn_embeddings"),
    ({"transition": "matrix"}, "needs matrix"),
    ({"word_freq": "/x.npy", "word_freq_lambda": 0.1}, "needs transition 'absorbing'"),
    ({"num_steps": 0}, "num_steps"),
    ({"transition": "absorbing", "word_freq_lambda": 0.1}, "needs word_freq"),
])
def test_bad_fields_are_user_errors(fields, says):
  with pytest.raises(UserError, match=says) as err:
    D3PMProcess(V, MASK, LinearSchedule(), **fields)
  assert "\n" not in str(err.value)
  with pytest.raises(UserError, match="mask_id"):
    D3PMProcess(V, V, LinearSchedule())


def test_bad_knn_and_spindle_files(files, tmp_path):
  np.save(tmp_path / "emb.npy", np.ones((V + 1, 3)))
  with pytest.raises(UserError, match="one embedding row per token"):
    make("knn", {"emb": str(tmp_path / "emb.npy")})
  two = np.array([[1.0, 0], [1, 0.1], [1, -0.1], [-1, 0], [-1, 0.1]])  # two clusters, k = 1
  np.save(tmp_path / "two.npy", two)
  with pytest.raises(UserError, match="disconnected.*raise knn_k"):
    make("knn", {"emb": str(tmp_path / "two.npy")}, knn_k=1)
  # Rare tokens' alpha_i = alpha_i - c sin(pi i/T) rises near t = 1 once c pi > 0.98 (eps > 0).
  make("spindle", files, eps=0.01, num_steps=64, word_freq_lambda=0.3)
  with pytest.raises(UserError, match="word_freq_lambda=0.4: token 3's alpha rises.*lower"):
    make("spindle", files, eps=0.01, num_steps=64, word_freq_lambda=0.4)


# --- posteriors ---------------------------------------------------------------------


PAIRS = [(1, 0), (2, 1), (3, 0), (4, 2), (4, 1), (4, 3)]  # (i_t, i_s), coarse gaps included


@pytest.mark.parametrize("name", NAMES)
def test_exact_posterior_is_bayes(name, files):
  """q(x_s | x_t, x0) = Q_{t|s}[x_s, x_t] Qbar_s[x0, x_s] / Qbar_t[x0, x_t] for all x0, x_t."""
  p = make(name, files, eps=0.01)
  x0, x_t = (jnp.asarray(a.reshape(-1, 1)) for a in np.meshgrid(np.arange(V), np.arange(V),
                                                                    indexing="ij"))
  for i, j in PAIRS:
    post = np.asarray(p.exact_posterior(x0, x_t, times(i / T, n=V * V), times(j / T, n=V * V)),
                      np.float64)[:, 0]  # [V * V, V]
    bar_s, bar_t, step = qbar(p, j), qbar(p, i), qstep(p, i, j)
    np.testing.assert_allclose(post.sum(-1), 1.0, atol=1e-5)
    for a, b in itertools.product(range(V), range(V)):
      if bar_t[a, b] > 1e-6:  # x_t reachable from x0
        want = step[:, b] * bar_s[a] / bar_t[a, b]
        np.testing.assert_allclose(post[a * V + b], want, atol=2e-5, err_msg=f"{i}|{j} {a} {b}")


# --- NELBO --------------------------------------------------------------------------


def all_seqs(length: int) -> np.ndarray:
  return np.array(list(itertools.product(range(V), repeat=length)), np.int32)  # [S, length]


def table_logits(seed: int, length: int) -> np.ndarray:
  """A random conditional model: logits [T + 1, S, length, V] indexed by step and all of x_t."""
  rng = np.random.default_rng(seed)
  return 2.0 * rng.normal(size=(T + 1, V**length, length, V))


def state_probs(p: D3PMProcess, x0: tuple[int, ...], i: int) -> np.ndarray:
  """q(x_i = state | x0) for every state: float64 [S]."""
  seqs, bar = all_seqs(len(x0)), qbar(p, i)
  return np.prod([bar[x0[l], seqs[:, l]] for l in range(len(x0))], 0)


def expected_nelbo(p: D3PMProcess, logits: np.ndarray, x0: tuple[int, ...]) -> float:
  """E_{t ~ U(0,1]} E_{x_t ~ q(.|x0)} nelbo = (1/T) sum_i sum_{x_t} q(x_t|x0) nelbo(i/T)."""
  seqs = all_seqs(len(x0))
  n = len(seqs)
  x_t = jnp.asarray(np.tile(seqs, (T, 1)))
  t = times(*(np.arange(1, T + 1) / T), n=n)
  vals = np.asarray(p.nelbo(jnp.asarray(logits[1:].reshape(T * n, len(x0), V), jnp.float32),
                            jnp.broadcast_to(jnp.asarray(x0, jnp.int32), x_t.shape), x_t, t),
                    np.float64).reshape(T, n)
  return float(np.mean([vals[i - 1] @ state_probs(p, x0, i) for i in range(1, T + 1)]))


def chain_nll(p: D3PMProcess, logits: np.ndarray, x0: tuple[int, ...],
              files: dict[str, str]) -> float:
  """-log p(x0) of the T-step model: prior, then S x S kernels from `posterior`, i = T..1."""
  seqs = all_seqs(len(x0))
  dist = np.prod([prior(p, files)[seqs[:, l]] for l in range(len(x0))], 0)
  for i in range(T, 0, -1):
    n = len(seqs)
    post = np.asarray(p.posterior(jnp.asarray(logits[i], jnp.float32), jnp.asarray(seqs),
                                  times(i / T, n=n), times((i - 1) / T, n=n)), np.float64)
    trans = np.prod([post[:, l, seqs[:, l]] for l in range(len(x0))], 0)  # [S, S]
    np.testing.assert_allclose(trans.sum(-1), 1.0, atol=1e-5)
    dist = dist @ trans
  return float(-np.log(dist[int(np.ravel_multi_index(x0, (V,) * len(x0)))]))


@pytest.mark.parametrize("name", NAMES)
def test_nelbo_bounds_exact_chain_nll(name, files):
  """E_t[nelbo] >= -log p_T(x0) of the T-step reverse chain, for a random table model."""
  p = make(name, files, eps=0.01)
  logits = table_logits(seed=1, length=2)
  for x0 in [(0, 1), (2, 2), (3, 0)]:
    bound, nll = expected_nelbo(p, logits, x0), chain_nll(p, logits, x0, files)
    assert np.isfinite(bound) and np.isfinite(nll)
    assert bound >= nll - 1e-4, (x0, bound, nll)
    assert bound > nll + 1e-3  # a random model has a real gap


@pytest.mark.parametrize("eps", [0.0, 0.05])
@pytest.mark.parametrize("name", NAMES)
def test_data_law_denoiser_is_exact(name, eps, files):
  """x_hat = p_data (ignoring x_t) makes D3PM eq. 4 the true reverse kernel q(x_s | x_t):
  sum_x0 q(x_s, x_t | x0) p_data(x0) = q(x_s, x_t).  The model is then q except for its prior,
  so for every x0 (L = 1)

    E_t[nelbo] = -log p_data(x0) + sum_y Qbar_T[x0, y] log(q_T(y) / p(y)),  q_T = p_data Qbar_T,

  and with eps = 0 (q_T = prior for uniform, absorbing, knn) the chain's NLL is the data NLL.
  (The Bayes posterior p(x0 | x_t) is NOT this denoiser, except for absorbing: eq. 4 weighs x0
  by the joint q(x_s, x_t | x0), not by q(x_s | x_t, x0).)
  """
  p = make(name, files, eps=eps)
  p_data = np.zeros(V)
  p_data[:DATA_TOKENS] = np.random.default_rng(5).dirichlet(np.ones(DATA_TOKENS))
  logits = np.broadcast_to(np.log(np.maximum(p_data, 1e-30)), (T + 1, V, 1, V))
  bar_T, pi = qbar(p, T), prior(p, files)
  q_T = p_data @ bar_T
  for x0 in range(DATA_TOKENS):
    with np.errstate(divide="ignore", invalid="ignore"):
      want = -np.log(p_data[x0]) + np.sum(bar_T[x0] * np.log(q_T / pi), where=bar_T[x0] > 0)
    np.testing.assert_allclose(expected_nelbo(p, logits, (x0,)), want, rtol=2e-5, atol=2e-5)
    if eps == 0.0 and name != "matrix":
      np.testing.assert_allclose(chain_nll(p, logits, (x0,), files), -np.log(p_data[x0]),
                                 rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("per_position", [False, True])
@pytest.mark.parametrize("name", NAMES)
def test_nelbo_is_scaled_step_kl_plus_prior(name, per_position, files):
  """nelbo = T * discrete_nelbo(t, t - 1/T) + sum_counted KL(q(x_T|x0) || p(x_T)), on and off
  the grid, per-row or per-position times, with a loss mask.  At grid step 1 the step term is
  the reconstruction -log p(x_0 = x0 | x_t), the x0 entry of posterior(logits, x_t, t, 0)."""
  p, b, length = make(name, files, eps=0.01), 6, 3
  k = jax.random.split(jax.random.key(3), 4)
  x0 = jax.random.randint(k[0], (b, length), 0, DATA_TOKENS)
  shape = (b, length) if per_position else (b,)
  grid = jax.random.randint(k[1], shape, 1, T + 1) / T
  t = jnp.where(jnp.arange(b).reshape((b,) + (1,) * (len(shape) - 1)) % 2 == 0, grid,
                jax.random.uniform(k[1], shape, minval=1e-3, maxval=1.0)).astype(jnp.float32)
  t = t.at[0].set(1.0 / T)  # row 0: grid step 1
  x_t = p.corrupt(k[2], x0, t)
  logits = 2.0 * jax.random.normal(k[3], (b, length, V))
  mask = jnp.asarray(np.random.default_rng(0).uniform(size=(b, length)) > 0.3, jnp.float32)
  got = np.asarray(p.nelbo(logits, x0, x_t, t, mask), np.float64)
  steps = np.asarray(p.discrete_nelbo(logits, x0, x_t, t, t - 1.0 / T, mask), np.float64)
  prior_kl = np.sum(np.asarray(mask) * kl(qbar(p, T)[np.asarray(x0)], prior(p, files)), -1)
  np.testing.assert_allclose(np.asarray(p.prior_kl(x0, mask)), prior_kl, atol=1e-5)
  np.testing.assert_allclose(got, T * steps + prior_kl, rtol=1e-5, atol=1e-5)
  assert np.all(steps >= 0)
  post = np.asarray(p.posterior(logits, x_t, t, jnp.zeros_like(t)), np.float64)
  recon = -np.log(np.take_along_axis(post, np.asarray(x0)[..., None], -1)[..., 0])
  np.testing.assert_allclose(steps[0], np.sum(np.asarray(mask)[0] * recon[0]), rtol=1e-5)


# --- the ancestral sampler on a coarse grid -----------------------------------------------


def sample(p: D3PMProcess, law: np.ndarray, steps: int, n: int = 4000) -> np.ndarray:
  """n one-token draws of `samplers.ancestral` with the data-law denoiser x_hat = law."""
  logits = jnp.asarray(np.log(np.maximum(law, 1e-30)), jnp.float32)
  den = engine.denoiser_of_logits(
      lambda x, t: jnp.broadcast_to(logits, x.shape + (V,)), mask_id=MASK, vocab_size=V)
  given = jnp.zeros((n, 1), jnp.int32)
  run = jax.jit(lambda key: engine.run(samplers.ancestral(den, p, steps=steps), key, given,
                                       jnp.zeros((n, 1), bool)).x)
  return np.asarray(run(jax.random.key(0)))[:, 0]


@pytest.mark.parametrize("name", ["knn", "matrix"])
def test_ancestral_sampler_on_coarse_grid_reproduces_data(name, files):
  """T = 8 grid steps walked in 4 sampler steps (Q_{t|s} two grid steps apart): with the exact
  denoiser the samples pass a chi-square test against p_data; a wrong law fails it."""
  p = make(name, files, num_steps=8)
  p_data = np.zeros(V)
  p_data[:DATA_TOKENS] = np.random.default_rng(7).dirichlet(np.full(DATA_TOKENS, 2.0))
  wrong = np.roll(p_data, 1)
  crit = scipy.stats.chi2.ppf(1 - 1e-3, DATA_TOKENS - 1)
  for law, passes in [(p_data, True), (wrong, False)]:
    draws = sample(p, law, steps=4)
    counts = np.bincount(draws, minlength=V)
    if passes:
      assert counts[DATA_TOKENS:].sum() == 0, counts  # p_data never draws mask_id
    keep = p_data > 0
    stat = np.sum((counts[keep] - len(draws) * p_data[keep])**2 / (len(draws) * p_data[keep]))
    assert (stat < crit) == passes, (law, counts, stat, crit)
