import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from modalimmune_jax import spectral

SHAPES = [(32, 8), (5, 12), (12, 12), (3, 2)]


def _np_spectrum(z):
  zc = z - z.mean(0, keepdims=True)
  return np.linalg.svd(zc, compute_uv=False)


@pytest.mark.parametrize("shape", SHAPES)
def test_spectrum_matches_numpy_svd(shape):
  z = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  s = np.asarray(spectral.singular_spectrum(z))
  ref = _np_spectrum(z.astype(np.float64))
  # Gram eigenvalues in float32: absolute error ~ sqrt(eps) * s_max
  np.testing.assert_allclose(s[:len(ref)], ref, rtol=1e-4, atol=1e-3 * ref[0])
  p = ref ** 2 / np.sum(ref ** 2)
  erank = np.exp(-np.sum(p[p > 0] * np.log(p[p > 0])))
  np.testing.assert_allclose(spectral.effective_rank(z), erank, rtol=1e-4)
  r = min(shape[0] - 1, shape[1])
  if r >= 2:
    np.testing.assert_allclose(spectral.collapse_severity(z),
                               1 - (erank - 1) / (r - 1), atol=1e-4)


def test_uncentred_spectrum():
  z = np.random.default_rng(1).normal(size=(7, 4))
  np.testing.assert_allclose(spectral.singular_spectrum(z, center=False),
                             np.linalg.svd(z, compute_uv=False), rtol=1e-4)


DEGENERATE = {
    "zero": jnp.zeros((6, 4)),
    "rank1": jnp.outer(jnp.arange(6.0), jnp.array([1.0, -2.0, 0.5, 3.0])),
    "b_lt_k": jax.random.normal(jax.random.key(0), (4, 9)),
    "b_gt_k": jax.random.normal(jax.random.key(1), (40, 3)),
    "repeated": jnp.concatenate([jnp.eye(4), -jnp.eye(4)]),
}
FUNCS = {
    "erank": spectral.effective_rank,
    "severity": spectral.collapse_severity,
    "penalty": lambda z: spectral.collapse_penalty(z, 0.7, 0.05),
    "singular": lambda z: jnp.sum(spectral.singular_spectrum(z)),
    "view": lambda z: jnp.sum(spectral.collapsed_view(z, 0.6) ** 2),
}


@jax.jit
def _all_values_and_grads(z):
  return {name: jax.value_and_grad(f)(z) for name, f in FUNCS.items()}


@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_finite_values_and_gradients(case):
  for name, (value, grad) in _all_values_and_grads(DEGENERATE[case]).items():
    assert np.isfinite(value), name
    assert np.all(np.isfinite(grad)), name


def test_limits_of_severity():
  assert float(spectral.collapse_severity(DEGENERATE["rank1"])) == pytest.approx(1.0, abs=1e-5)
  assert float(spectral.collapse_severity(DEGENERATE["zero"])) == pytest.approx(1.0)
  iso = jnp.concatenate([jnp.eye(4), -jnp.eye(4)]) * 3.0
  assert float(spectral.collapse_severity(iso)) == pytest.approx(0.0, abs=1e-5)
  with pytest.raises(ValueError, match="rank"):
    spectral.collapse_severity(jnp.ones((2, 5)))


def test_vmap_over_modalities():
  z = jax.random.normal(jax.random.key(2), (3, 16, 5))
  batched = jax.vmap(spectral.collapse_penalty)(z)
  single = jnp.stack([spectral.collapse_penalty(zi) for zi in z])
  np.testing.assert_allclose(batched, single, rtol=1e-5)


def test_tail_weights_and_penalty_value():
  p = jnp.array([0.5, 0.3, 0.15, 0.05])
  w = spectral.tail_weights(p, 0.75, 1e-4)
  np.testing.assert_allclose(w, [0, 0, 1, 1], atol=1e-6)  # c = 0, .5, .8, .95
  z = jnp.diag(jnp.sqrt(p)) * 10.0
  pen = spectral.collapse_penalty(z, 0.75, 1e-4, center=False)
  assert float(pen) == pytest.approx(0.2, abs=1e-5)


def test_penalty_is_differentiable_in_kappa_and_eta():
  z = jax.random.normal(jax.random.key(3), (32, 8))
  u = jax.random.normal(jax.random.key(4), (32, 8))
  mixed = jax.grad(lambda k, e: jnp.sum(
      jax.grad(spectral.collapse_penalty)(z, k, e) * u), argnums=(0, 1))(0.8, 0.05)
  assert all(np.isfinite(m) and abs(m) > 1e-6 for m in mixed)


def test_minimising_penalty_lowers_effective_rank():
  z = jax.random.normal(jax.random.key(5), (64, 8))
  loss = lambda z: spectral.collapse_penalty(z, 0.6, 0.05)
  opt = optax.adam(0.05)
  state = opt.init(z)
  step = jax.jit(lambda z, s: (lambda g: (lambda u, s: (optax.apply_updates(z, u), s))(
      *opt.update(g, s, z)))(jax.grad(loss)(z)))
  before = float(spectral.effective_rank(z))
  pen0 = float(loss(z))
  for _ in range(150):
    z, state = step(z, state)
  assert float(loss(z)) < 0.5 * pen0
  assert float(spectral.effective_rank(z)) < 0.6 * before


def test_collapsed_view_keeps_kappa_energy():
  z = jax.random.normal(jax.random.key(6), (50, 6)) * jnp.array([5, 3, 2, 1, 0.5, 0.1])
  p = np.asarray(spectral.energy_shares(z))
  for kappa in (0.3, 0.6, 0.9, 0.99):
    n_keep = int(np.sum((np.cumsum(p) - p) < kappa))
    view = spectral.collapsed_view(z, kappa)
    assert np.linalg.matrix_rank(np.asarray(view - view.mean(0)), tol=1e-3) == n_keep
    # projection: the mean is kept and applying it twice changes nothing
    np.testing.assert_allclose(view.mean(0), z.mean(0), atol=1e-4)
    np.testing.assert_allclose(spectral.collapsed_view(view, kappa), view, atol=1e-3)


@pytest.mark.usefixtures("x64")
def test_energy_derivatives_match_eigvalsh_in_both_modes():
  """The SVD-based spectrum's custom JVP against autodiff of jnp.linalg.eigvalsh:
  reverse mode (gradients) and forward mode (what jax.linearize uses for the
  Gauss-Newton hyper-gradient)."""
  z = jax.random.normal(jax.random.key(1), (12, 5))
  w = jnp.linspace(1.0, 2.0, 5)

  def reference(z):
    zc = z - z.mean(0)
    return jnp.linalg.eigvalsh(zc.T @ zc)[::-1]

  f = lambda z: jnp.sum(w * spectral.energy_spectrum(z))
  g_ref = jax.grad(lambda z: jnp.sum(w * reference(z)))(z)
  np.testing.assert_allclose(jax.grad(f)(z), g_ref, rtol=1e-8, atol=1e-10)
  v = jax.random.normal(jax.random.key(2), z.shape)
  _, t = jax.jvp(spectral.energy_spectrum, (z,), (v,))
  _, t_ref = jax.jvp(reference, (z,), (v,))
  np.testing.assert_allclose(t, t_ref, rtol=1e-8, atol=1e-10)
  _, lin = jax.linearize(spectral.energy_spectrum, z)
  np.testing.assert_allclose(lin(v), t_ref, rtol=1e-8, atol=1e-10)


def test_tiny_and_numerically_zero_energy():
  """Regression: shares divided by max(total, 1e-12), an absolute floor. A batch
  of tiny genuine energy now has shares summing to 1 (scale-free); a constant
  batch, whose float32 centring leaves a residue of ~1e-14, has numerically
  zero energy: exact zeros, effective rank 1, severity 1, finite gradients."""
  tiny = jnp.array([[0.0], [1e-6]])
  np.testing.assert_allclose(spectral.energy_shares(tiny), [1.0])
  assert float(spectral.effective_rank(tiny)) == pytest.approx(1.0)  # was 1.41 > max_rank 1
  z = jax.random.normal(jax.random.key(7), (16, 4))
  np.testing.assert_allclose(spectral.energy_shares(1e-9 * z), spectral.energy_shares(z),
                             rtol=1e-4, atol=1e-7)
  assert np.all(np.isfinite(jax.grad(lambda z: spectral.collapse_penalty(1e-9 * z))(z)))
  for scale in (1e-3, 1.0, 1e3):
    const = jnp.tile(jnp.array([0.34558418, 0.82161814, -1.3]) * scale, (5, 1))
    assert not np.any(spectral.energy_spectrum(const))
    assert not np.any(spectral.energy_shares(const))
    assert float(spectral.effective_rank(const)) == 1.0
    assert float(spectral.collapse_severity(const)) == 1.0  # was 0.941 at scale 1
    np.testing.assert_allclose(spectral.collapsed_view(const, 0.5), const, rtol=1e-6)
    for f in (spectral.effective_rank, spectral.collapse_penalty):
      assert np.all(np.isfinite(jax.grad(f)(const)))
  # one row a few hundred ulps off: real spread, not residue
  near = jnp.tile(jnp.array([1.0, 2.0, 3.0]), (5, 1)).at[2, 0].add(1e-4)
  assert float(jnp.sum(spectral.energy_spectrum(near))) > 0
  assert float(spectral.collapse_severity(near)) == pytest.approx(1.0, abs=1e-4)
