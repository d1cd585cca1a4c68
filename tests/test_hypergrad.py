"""Neumann solve and certified hyper-gradients against dense oracles (float64)."""

import functools

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from modalimmune_jax import hypergrad as hg

pytestmark = pytest.mark.usefixtures("x64")

# Rounding in float64 on these problem sizes; the bounds hold in exact arithmetic.
ROUNDING = 1e-11


def _spd(rng, n, cond=20.0):
  q, _ = np.linalg.qr(rng.normal(size=(n, n)))
  return q @ np.diag(np.geomspace(1.0, cond, n)) @ q.T


def test_neumann_solve_converges_to_dense_solve():
  rng = np.random.default_rng(0)
  a = _spd(rng, 6)
  b = rng.normal(size=6)
  exact = np.linalg.solve(a, b)
  alpha = 1.0 / np.linalg.eigvalsh(a).max()
  errors = []
  for k in (1, 10, 50, 200, 800):
    x, info = hg.neumann_solve(lambda v: a @ v, jnp.asarray(b), alpha=alpha, num_terms=k)
    errors.append(np.linalg.norm(np.asarray(x) - exact))
    assert int(info.num_terms) == k
    np.testing.assert_allclose(info.residual_norm, np.linalg.norm(b - a @ np.asarray(x)),
                               rtol=1e-8, atol=1e-14)
  assert all(e1 > e2 for e1, e2 in zip(errors, errors[1:]))
  assert errors[-1] < 1e-8
  # rho estimate approaches ||I - alpha A|| = 1 - lambda_min / lambda_max
  assert float(info.rho) == pytest.approx(1 - 1 / 20.0, rel=1e-3)


def _pytree_problem(seed, cond):
  """An SPD ``a``, a pytree ``b``, its flat form, the matvec on pytrees, lambda_min."""
  rng = np.random.default_rng(seed)
  a = _spd(rng, 5, cond=cond)
  b = {"u": jnp.asarray(rng.normal(size=3)), "v": jnp.asarray(rng.normal(size=2))}
  flat_b, unravel = jax.flatten_util.ravel_pytree(b)
  mv = lambda t: unravel(a @ jax.flatten_util.ravel_pytree(t)[0])
  return a, b, flat_b, mv, np.linalg.eigvalsh(a).min()


def test_neumann_solve_pytree_and_tolerance():
  a, b, flat_b, mv, mu = _pytree_problem(1, cond=5.0)
  x, info = jax.jit(lambda b: hg.neumann_solve(
      mv, b, alpha=0.15, tol=1e-6, max_terms=500, min_eigenvalue=mu))(b)
  err = np.linalg.norm(jax.flatten_util.ravel_pytree(x)[0] - np.linalg.solve(a, flat_b))
  assert err <= float(info.residual_norm) / mu + ROUNDING
  assert float(info.residual_norm) / mu <= 1e-6
  # and it is the smallest such K
  _, prev = hg.neumann_solve(mv, b, alpha=0.15, num_terms=int(info.num_terms) - 1)
  assert float(prev.residual_norm) / mu > 1e-6
  with pytest.raises(ValueError, match="exactly one"):
    hg.neumann_solve(mv, b, alpha=0.1)


# ---------------------------------------------------------------- ridge ----

def _ridge_problem(seed, n=30, d=4, m=20):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d))
  y = x @ rng.normal(size=d) + 0.3 * rng.normal(size=n)
  xv = rng.normal(size=(m, d))
  yv = xv @ rng.normal(size=d)
  return x, y, xv, yv, np.log(rng.uniform(0.05, 2.0))


def ridge_inner(w, h, x, y):
  return 0.5 * jnp.mean((x @ w - y) ** 2) + 0.5 * jnp.exp(h) * jnp.sum(w ** 2)


def ridge_outer(w, h, x, y):
  return 0.5 * jnp.mean((x @ w - y) ** 2)


def _ridge_closed_form(x, y, xv, yv, h):
  n, d = x.shape
  lam = np.exp(h)
  a = x.T @ x / n + lam * np.eye(d)
  w = np.linalg.solve(a, x.T @ y / n)
  grad_val = xv.T @ (xv @ w - yv) / len(yv)
  dw_dlam = -np.linalg.solve(a, w)
  return w, lam * grad_val @ dw_dlam, a


@pytest.mark.parametrize("seed", range(3))
def test_ridge_closed_form_hypergradient(seed):
  x, y, xv, yv, h = _ridge_problem(seed)
  w, exact, a = _ridge_closed_form(x, y, xv, yv, h)
  alpha = 1.0 / np.linalg.eigvalsh(a).max()
  fn = jax.jit(lambda w, h: hg.neumann_hypergrad(
      ridge_inner, ridge_outer, w, h, inner_args=(x, y), outer_args=(xv, yv),
      alpha=alpha, num_terms=300, strong_convexity=jnp.exp(h)))
  g, cert = fn(jnp.asarray(w), jnp.asarray(h))
  np.testing.assert_allclose(g, exact, rtol=1e-7, atol=1e-10)
  assert bool(cert.certified) and bool(cert.rigorous) and not bool(cert.diverging)
  assert abs(float(g) - exact) <= float(cert.error_bound) + ROUNDING
  # also against autodiff through the dense solve
  solve_w = lambda h: jnp.linalg.solve(x.T @ x / len(y) + jnp.exp(h) * jnp.eye(x.shape[1]),
                                       x.T @ y / len(y))
  np.testing.assert_allclose(g, jax.grad(lambda h: ridge_outer(solve_w(h), h, xv, yv))(h),
                             rtol=1e-7)


# ------------------------------------------------------------- logistic ----

def _logistic_problem(seed, n=40, d=3):
  rng = np.random.default_rng(100 + seed)
  x = rng.normal(size=(n, d))
  y = (x @ rng.normal(size=d) + 0.5 * rng.normal(size=n) > 0).astype(float)
  xv = rng.normal(size=(n, d))
  yv = (xv @ rng.normal(size=d) > 0).astype(float)
  return x, y, xv, yv


def _bce(logits, y):
  return jnp.mean(jax.nn.softplus(logits) - y * logits)


def logistic_inner(w, h, x, y):
  return _bce(x @ w, y) + 0.5 * jnp.exp(h) * jnp.sum(w ** 2)


def logistic_outer(w, h, x, y):
  return _bce(x @ w, y)


@jax.jit
def _newton_fit(h, x, y):
  """Newton's method: converges quadratically in 10 steps here."""
  def step(w, _):
    g = jax.grad(logistic_inner)(w, h, x, y)
    return w - jnp.linalg.solve(jax.hessian(logistic_inner)(w, h, x, y), g), None
  return jax.lax.scan(step, jnp.zeros(x.shape[1]), None, length=10)[0]


LOGISTIC_GN = hg.GaussNewton(
    model_fn=lambda w, h, x, y: (x @ w, w),
    output_loss=lambda o, h, x, y: _bce(o[0], y) + 0.5 * jnp.exp(h) * jnp.sum(o[1] ** 2))


@pytest.mark.parametrize("inner", ["hessian", "gauss_newton"])
def test_logistic_matches_finite_differences(inner):
  x, y, xv, yv = _logistic_problem(0)
  h = np.log(0.1)
  w = _newton_fit(h, x, y)
  eps = 1e-5
  fd = (logistic_outer(_newton_fit(h + eps, x, y), 0.0, xv, yv)
        - logistic_outer(_newton_fit(h - eps, x, y), 0.0, xv, yv)) / (2 * eps)
  loss = logistic_inner if inner == "hessian" else LOGISTIC_GN
  g, cert = hg.neumann_hypergrad(
      loss, logistic_outer, w, jnp.asarray(h), inner_args=(x, y),
      outer_args=(xv, yv), alpha=2.0, num_terms=200, strong_convexity=np.exp(h))
  np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)
  assert bool(cert.certified)
  assert abs(float(g - fd)) <= float(cert.error_bound) + 1e-8  # fd error ~ eps^2


def _sin_inner(w, hp, x, y):
  return logistic_inner(w, hp["log_l2"], x, y) + hp["shift"] * jnp.sum(jnp.sin(w))


SIN_GN = hg.GaussNewton(  # a loss convex in its outputs: G is PSD
    model_fn=lambda w, hp, x, y: (x @ w, w),
    output_loss=lambda o, hp, x, y: _bce(o[0], y)
    + 0.5 * jnp.exp(hp["log_l2"]) * jnp.sum(o[1] ** 2)
    + 0.05 * jnp.exp(hp["shift"]) * jnp.mean(o[0] ** 2))


def _val(w, hp, x, y):
  return logistic_outer(w, 0.0, x, y)


def _dense_hypergrad(loss, use_gn, w, hp, x, y, xv, yv, damping):
  """Dense oracle: the hyper-gradient with A = (G or H) + damping I, and A."""
  flat_h, unravel_h = jax.flatten_util.ravel_pytree(hp)
  f = lambda fw, fh: loss(fw, unravel_h(fh), x, y)
  g_w, g_h = jax.grad(lambda fw, fh: _val(fw, unravel_h(fh), xv, yv),
                      argnums=(0, 1))(w, flat_h)
  mixed = jax.jacobian(jax.grad(f, argnums=0), argnums=1)(w, flat_h)  # (w, h)
  if use_gn:
    out, unravel_o = jax.flatten_util.ravel_pytree(loss.model_fn(w, hp, x, y))
    jac = jax.jacobian(lambda fw: jax.flatten_util.ravel_pytree(
        loss.model_fn(fw, hp, x, y))[0])(w)
    a = jac.T @ jax.hessian(lambda o: loss.output_loss(unravel_o(o), hp, x, y))(out) @ jac
  else:
    a = jax.hessian(f)(w, flat_h)
  a = a + damping * jnp.eye(len(w))
  return g_h - mixed.T @ jnp.linalg.solve(a, g_w), a


def test_error_bound_never_below_actual_error():
  """Many random problems and truncations: bound >= |neumann - dense|."""
  solvers, dense_fns = {}, {}
  for use_gn in (True, False):
    dense_fns[use_gn] = jax.jit(functools.partial(
        _dense_hypergrad, SIN_GN if use_gn else _sin_inner, use_gn))
    for k in (1, 3, 10, 40):
      loss = SIN_GN if use_gn else _sin_inner
      solvers[use_gn, k] = jax.jit(
          lambda w, hp, x, y, xv, yv, alpha, damping, sc, loss=loss, k=k:
          hg.neumann_hypergrad(loss, _val, w, hp, inner_args=(x, y),
                               outer_args=(xv, yv), alpha=alpha, damping=damping,
                               num_terms=k, strong_convexity=sc))
  checked = 0
  for seed in range(12):
    x, y, xv, yv = _logistic_problem(seed, n=25, d=3)
    rng = np.random.default_rng(seed)
    hp = {"log_l2": jnp.asarray(np.log(rng.uniform(0.01, 1.0))),
          "shift": jnp.asarray(0.1 * seed)}
    w = _newton_fit(hp["log_l2"], x, y) + 0.05  # near, not at, the optimum
    for use_gn, damping in ((True, 0.05), (True, 0.5), (False, 0.0)):
      dense, a = dense_fns[use_gn](w, hp, x, y, xv, yv, damping)
      eig = np.linalg.eigvalsh(np.asarray(a))
      if eig.min() <= 0:
        continue
      # G is PSD, so damping alone is a proven bound (sc = 0); for the Hessian
      # we pass a valid lower bound, as a user who proved one would.
      sc = 0.0 if use_gn else 0.9 * eig.min()
      for k in (1, 3, 10, 40):
        g, cert = solvers[use_gn, k](w, hp, x, y, xv, yv, 1.0 / eig.max(), damping, sc)
        err = float(jnp.linalg.norm(jax.flatten_util.ravel_pytree(g)[0] - dense))
        assert bool(cert.rigorous)
        assert err <= float(cert.error_bound) * (1 + 1e-9) + ROUNDING, (seed, use_gn, k)
        checked += 1
  assert checked >= 100


def test_uncertifiable_hessian_says_so():
  x, y, xv, yv = _logistic_problem(3)
  w = _newton_fit(0.0, x, y)
  g, cert = hg.neumann_hypergrad(logistic_inner, logistic_outer, w, jnp.asarray(0.0),
                                 inner_args=(x, y), outer_args=(xv, yv), alpha=1.0,
                                 num_terms=20)
  assert not bool(cert.rigorous) and not bool(cert.certified)
  assert np.isinf(float(cert.solve_error_bound))
  assert np.isfinite(float(cert.error_bound))  # an estimate from rho
  _, cert = hg.neumann_hypergrad(logistic_inner, logistic_outer, w, jnp.asarray(0.0),
                                 inner_args=(x, y), outer_args=(xv, yv), num_terms=2,
                                 solver="cg")
  assert not bool(cert.rigorous) and not bool(cert.certified)
  assert 0 < float(cert.error_bound) < np.inf  # from CG's Rayleigh quotients
  # a too-large step diverges and is flagged
  _, cert = hg.neumann_hypergrad(logistic_inner, logistic_outer, w, jnp.asarray(0.0),
                                 inner_args=(x, y), outer_args=(xv, yv), alpha=100.0,
                                 num_terms=20, strong_convexity=1.0)
  assert bool(cert.diverging)
  assert np.isinf(float(cert.a_priori_bound))


def test_adaptive_terms_meet_tolerance_under_jit():
  x, y, xv, yv, h = _ridge_problem(7)
  w, exact, a = _ridge_closed_form(x, y, xv, yv, h)
  alpha = 1.0 / np.linalg.eigvalsh(a).max()
  for tol in (1e-3, 1e-6, 1e-9):
    g, cert = jax.jit(lambda w, h: hg.neumann_hypergrad(
        ridge_inner, ridge_outer, w, h, inner_args=(x, y), outer_args=(xv, yv),
        alpha=alpha, tol=tol, max_terms=2000, strong_convexity=jnp.exp(h)))(
            jnp.asarray(w), jnp.asarray(h))
    assert bool(cert.certified)
    assert float(cert.error_bound) <= tol
    assert abs(float(g) - exact) <= tol
  # the cap is respected and reported
  _, cert = hg.neumann_hypergrad(
      ridge_inner, ridge_outer, jnp.asarray(w), jnp.asarray(h), inner_args=(x, y),
      outer_args=(xv, yv), alpha=alpha, tol=1e-30, max_terms=5,
      strong_convexity=np.exp(h))
  assert int(cert.num_terms) == 5 and not bool(cert.certified)


@pytest.mark.parametrize("solver", ["neumann", "cg"])
def test_relative_tolerance_stops_at_the_first_k_within_rel_tol_of_g(solver):
  """``rel_tol``: the bound is certified within ``rel_tol * |g|`` (and the true
  error within the bound, against the dense solve), at the first such K: one
  term fewer is not within it; a tighter rel_tol takes more terms."""
  x, y, xv, yv = _logistic_problem(3, n=25, d=3)
  hp = {"log_l2": jnp.asarray(np.log(0.3)), "shift": jnp.asarray(0.2)}
  w = _newton_fit(hp["log_l2"], x, y) + 0.05
  damping = 0.05
  dense, a = jax.jit(functools.partial(_dense_hypergrad, SIN_GN, True))(
      w, hp, x, y, xv, yv, damping)
  alpha = 1.0 / np.linalg.eigvalsh(np.asarray(a)).max()
  solve = jax.jit(lambda w, hp, **kw: hg.neumann_hypergrad(
      SIN_GN, _val, w, hp, inner_args=(x, y), outer_args=(xv, yv), alpha=alpha,
      damping=damping, solver=solver, max_terms=500, **kw),
      static_argnames=("rel_tol", "num_terms"))
  terms = []
  for rel_tol in (0.5, 1e-2, 1e-4):
    g, cert = solve(w, hp, rel_tol=rel_tol)
    g_norm = float(jnp.linalg.norm(jax.flatten_util.ravel_pytree(g)[0]))
    err = float(jnp.linalg.norm(jax.flatten_util.ravel_pytree(g)[0] - dense))
    assert bool(cert.certified)
    assert float(cert.error_bound) <= rel_tol * g_norm
    assert err <= float(cert.error_bound) * (1 + 1e-9) + ROUNDING
    k = int(cert.num_terms)
    if k > 1:  # the first such K: one fewer term is not within rel_tol of its g
      g1, c1 = solve(w, hp, num_terms=k - 1)
      assert float(c1.error_bound) > rel_tol * float(
          jnp.linalg.norm(jax.flatten_util.ravel_pytree(g1)[0]))
    terms.append(k)
  assert terms[0] <= terms[1] <= terms[2] and terms[0] < terms[2]


# ------------------------------------------------ divergence detection ----

def _eig_problem(seed, n=6, cond=20.0):
  rng = np.random.default_rng(seed)
  a = _spd(rng, n, cond)
  return a, rng.normal(size=n), np.linalg.eigvalsh(a)


@pytest.mark.parametrize("mode", ["num_terms", "tol"])
def test_diverging_series_stops_at_once_and_is_flagged(mode):
  a, b, eig = _eig_problem(2)
  terms = {"num_terms": 1000} if mode == "num_terms" else {"tol": 1e-8, "max_terms": 1000}
  # Too large a step: |1 - alpha lambda_max| = 2. Then barely too large (1.05),
  # where the residual first shrinks for many terms before it grows.
  for alpha, at_most in ((3.0 / eig.max(), 3), (2.05 / eig.max(), 200)):
    x, info = hg.neumann_solve(lambda v: a @ v, jnp.asarray(b), alpha=alpha, **terms)
    assert bool(info.diverging)
    assert int(info.num_terms) <= at_most
    assert int(info.num_products) == int(info.num_terms) + 1  # the rejected term
    assert float(info.rho) > 1
    # x is the partial sum with the smallest residual: the term that grew is not taken
    k = int(info.num_terms)
    norms = [np.linalg.norm(np.linalg.matrix_power(np.eye(6) - alpha * a, j) @ b)
             for j in range(k + 2)]
    assert norms[k + 1] > norms[k] == pytest.approx(min(norms), rel=1e-9)
    np.testing.assert_allclose(np.linalg.norm(b - a @ np.asarray(x)), norms[k], rtol=1e-8)
    np.testing.assert_allclose(float(info.residual_norm), norms[k], rtol=1e-8)


def test_converging_series_is_not_flagged():
  """Oscillating (alpha near 2 / lambda_max), and stalled at rounding level."""
  a, b, eig = _eig_problem(3)
  x, info = hg.neumann_solve(lambda v: a @ v, jnp.asarray(b), alpha=1.98 / eig.max(),
                             num_terms=1500)
  assert not bool(info.diverging) and int(info.num_terms) == 1500
  np.testing.assert_allclose(x, np.linalg.solve(a, b), rtol=1e-9)
  # One eigenvalue so small that 1 - alpha lambda_min rounds to 1: the residual
  # stalls and wobbles by ~eps, which must not read as divergence.
  rng = np.random.default_rng(4)
  q, _ = np.linalg.qr(rng.normal(size=(40, 40)))
  for dtype, slow in ((jnp.float32, 1e-9), (jnp.float64, 1e-18)):
    a = jnp.asarray(q @ np.diag(np.r_[slow, rng.uniform(0.1, 1.0, 39)]) @ q.T, dtype)
    _, info = hg.neumann_solve(lambda v: a @ v, jnp.asarray(rng.normal(size=40), dtype),
                               alpha=1.0, num_terms=500)
    assert not bool(info.diverging) and int(info.num_terms) == 500
  assert hg.growth_tolerance(jnp.float64) == 1e-6
  assert hg.growth_tolerance(jnp.float32) == pytest.approx(3.45e-4, rel=1e-2)


@pytest.mark.parametrize("mode", ["num_terms", "tol"])
def test_diverging_hypergrad_is_never_certified(mode):
  """The reported failure: a too-large step with Gauss-Newton was certified."""
  x, y, xv, yv = _logistic_problem(0)
  h = np.log(0.1)
  w = _newton_fit(h, x, y)
  terms = {"num_terms": 100} if mode == "num_terms" else {"tol": 1e-6, "max_terms": 300}
  for loss, extra in ((LOGISTIC_GN, {"damping": 0.05}),
                      (logistic_inner, {"strong_convexity": 0.1})):
    g, cert = hg.neumann_hypergrad(loss, logistic_outer, w, jnp.asarray(h),
                                   inner_args=(x, y), outer_args=(xv, yv),
                                   alpha=50.0, **terms, **extra)
    assert bool(cert.rigorous) and bool(cert.diverging)
    assert not bool(cert.certified)
    assert int(cert.num_products) <= 3
    assert np.isfinite(float(g)) and np.isfinite(float(cert.error_bound))
    assert np.isinf(float(cert.a_priori_bound))


def test_nonfinite_hypergrad_is_never_certified():
  x, y, xv, yv, h = _ridge_problem(0)
  w, _, _ = _ridge_closed_form(x, y, xv, yv, h)
  # a direct term d_phi L_val that is nan (sqrt of a negative number)
  outer = lambda w, h, x, y: ridge_outer(w, h, x, y) + 0.0 * jnp.sqrt(h - 100.0)
  for solver in hg.SOLVERS:
    g, cert = hg.neumann_hypergrad(ridge_inner, outer, jnp.asarray(w), jnp.asarray(h),
                                   inner_args=(x, y), outer_args=(xv, yv), alpha=0.5,
                                   num_terms=10, strong_convexity=np.exp(h),
                                   solver=solver)
    assert np.isnan(float(g))
    assert bool(cert.rigorous) and np.isfinite(float(cert.error_bound))
    assert not bool(cert.diverging) and not bool(cert.certified)


# ------------------------------------------------- conjugate gradients ----

def test_cg_solve_matches_dense_solve():
  a, b, eig = _eig_problem(5, n=8, cond=50.0)
  exact = np.linalg.solve(a, b)
  a_errors, lam_estimates = [], []
  for k in (2, 4, 8):
    x, info = hg.cg_solve(lambda v: a @ v, jnp.asarray(b), num_terms=k)
    x = np.asarray(x)
    assert int(info.num_terms) == k and int(info.num_products) == k + 1
    assert not bool(info.diverging) and np.isnan(float(info.rho))
    res = np.linalg.norm(b - a @ x)
    np.testing.assert_allclose(float(info.residual_norm), res, rtol=1e-8, atol=1e-14)
    assert np.linalg.norm(x - exact) <= res / eig.min() + ROUNDING
    # Rayleigh quotients of the search directions lie in the spectrum
    assert eig.min() * (1 - 1e-9) <= float(info.lambda_min_estimate) <= eig.max()
    lam_estimates.append(float(info.lambda_min_estimate))
    a_errors.append(np.sqrt((x - exact) @ a @ (x - exact)))
  # CG minimises the A-norm of the error over growing Krylov spaces; exact at n
  assert all(e1 > e2 for e1, e2 in zip(a_errors, a_errors[1:]))
  assert a_errors[-1] < 1e-10
  # the smallest Rayleigh quotient so far: from b's (24 here) down towards lambda_min
  assert lam_estimates[-1] < lam_estimates[0] < 0.2 * (b @ a @ b) / (b @ b)


def test_cg_solve_pytree_and_tolerance_under_jit():
  a, b, flat_b, mv, mu = _pytree_problem(6, cond=30.0)
  x, info = jax.jit(lambda b: hg.cg_solve(mv, b, tol=1e-9, max_terms=50,
                                          min_eigenvalue=mu))(b)
  err = np.linalg.norm(jax.flatten_util.ravel_pytree(x)[0] - np.linalg.solve(a, flat_b))
  assert err <= float(info.residual_norm) / mu + ROUNDING
  assert float(info.residual_norm) / mu <= 1e-9
  _, prev = hg.cg_solve(mv, b, num_terms=int(info.num_terms) - 1)
  assert float(prev.residual_norm) / mu > 1e-9  # the smallest such K
  with pytest.raises(ValueError, match="exactly one"):
    hg.cg_solve(mv, b)


def test_cg_breakdown_on_indefinite_matrix():
  q, _ = np.linalg.qr(np.random.default_rng(7).normal(size=(4, 4)))
  a = q @ np.diag([1.0, 2.0, -3.0, 0.5]) @ q.T
  b = q @ np.ones(4)  # p^T A p = 0.5 > 0 on b; negative curvature comes later
  x, info = hg.cg_solve(lambda v: a @ v, jnp.asarray(b), num_terms=4)
  assert bool(info.diverging) and int(info.num_products) == int(info.num_terms) + 2
  assert int(info.num_terms) < 4 and np.all(np.isfinite(np.asarray(x)))
  b = q @ np.array([0.0, 0.0, 1.0, 0.0])  # straight into the negative eigenvalue
  x, info = hg.cg_solve(lambda v: a @ v, jnp.asarray(b), tol=1e-8)
  assert bool(info.diverging) and int(info.num_terms) == 0
  np.testing.assert_array_equal(x, np.zeros(4))


def test_cg_needs_sqrt_kappa_where_neumann_needs_kappa():
  """cond 1e3: CG reaches the tolerance in a small fraction of the products."""
  a, b, eig = _eig_problem(8, n=50, cond=1e3)
  exact = np.linalg.solve(a, b)
  mv = jax.jit(lambda v: a @ v)
  tol = 1e-6 * np.linalg.norm(b)
  x_n, info_n = hg.neumann_solve(mv, jnp.asarray(b), alpha=1.0 / eig.max(), tol=tol,
                                 max_terms=30000)
  x_c, info_c = hg.cg_solve(mv, jnp.asarray(b), tol=tol, max_terms=30000)
  for x, info in ((x_n, info_n), (x_c, info_c)):
    assert not bool(info.diverging)
    assert float(info.residual_norm) <= tol * (1 + 1e-6)
    assert np.linalg.norm(np.asarray(x) - exact) <= float(info.residual_norm) / eig.min() + ROUNDING
  # Neumann: about kappa log(1 / 1e-6) ~ 1.4e4 terms; CG: O(sqrt(kappa)) <= n
  assert int(info_n.num_terms) > 5000
  assert int(info_c.num_products) <= 0.2 * int(info_n.num_products)
  assert int(info_c.num_terms) <= 100


# ------------------------------------------- solvers in the hypergradient ----

@pytest.mark.parametrize("solver", hg.SOLVERS)
def test_both_solvers_certified_on_gauss_newton_and_ridge(solver):
  """Error <= bound on the small damped Gauss-Newton problems, both solvers."""
  k = {"neumann": 10, "cg": 2}[solver]  # not yet converged: the bound is not vacuous
  fn = jax.jit(lambda w, hp, x, y, xv, yv, alpha, damping: hg.neumann_hypergrad(
      SIN_GN, _val, w, hp, inner_args=(x, y), outer_args=(xv, yv), alpha=alpha,
      damping=damping, num_terms=k, solver=solver))
  dense_fn = jax.jit(functools.partial(_dense_hypergrad, SIN_GN, True))
  for seed in range(4):
    x, y, xv, yv = _logistic_problem(seed, n=25, d=3)
    hp = {"log_l2": jnp.asarray(np.log(0.1 + 0.2 * seed)), "shift": jnp.asarray(0.1 * seed)}
    w = _newton_fit(hp["log_l2"], x, y) + 0.05
    for damping in (0.05, 0.5):
      dense, a = dense_fn(w, hp, x, y, xv, yv, damping)
      g, cert = fn(w, hp, x, y, xv, yv, 1.0 / np.linalg.eigvalsh(np.asarray(a)).max(),
                   damping)
      err = float(jnp.linalg.norm(jax.flatten_util.ravel_pytree(g)[0] - dense))
      assert bool(cert.certified) and not bool(cert.diverging)
      assert 1e-12 < err <= float(cert.error_bound) * (1 + 1e-9) + ROUNDING, (seed, damping)
  # adaptive, under jit, against the closed form
  x, y, xv, yv, h = _ridge_problem(7)
  w, exact, a = _ridge_closed_form(x, y, xv, yv, h)
  g, cert = jax.jit(lambda w, h: hg.neumann_hypergrad(
      ridge_inner, ridge_outer, w, h, inner_args=(x, y), outer_args=(xv, yv),
      alpha=1.0 / np.linalg.eigvalsh(a).max(), tol=1e-9, max_terms=2000,
      strong_convexity=jnp.exp(h), solver=solver))(jnp.asarray(w), jnp.asarray(h))
  assert bool(cert.certified) and float(cert.error_bound) <= 1e-9
  assert abs(float(g) - exact) <= float(cert.error_bound) + ROUNDING
  extra = 1 if solver == "cg" else 0
  assert int(cert.num_products) == int(cert.num_terms) + extra


def test_alpha_none_estimates_the_step():
  a, b, eig = _eig_problem(9, cond=30.0)
  a = 250.0 * a  # the default-looking alpha = 1 would diverge
  x, info = hg.neumann_solve(lambda v: a @ v, jnp.asarray(b), tol=1e-10, max_terms=2000)
  assert not bool(info.diverging)
  np.testing.assert_allclose(x, np.linalg.solve(a, b), rtol=1e-8)
  lam_max = 250.0 * eig.max()
  # power iteration under-estimates lambda_max, so alpha >= 1 / (1.1 lambda_max)
  assert 1.0 / (1.1 * lam_max) * (1 - 1e-12) <= float(info.alpha) <= 1.0 / lam_max
  assert int(info.num_products) == int(info.num_terms) + hg.POWER_ITERATIONS
  x, y, xv, yv, h = _ridge_problem(1)
  w, exact, _ = _ridge_closed_form(x, y, xv, yv, h)
  g, cert = hg.neumann_hypergrad(ridge_inner, ridge_outer, jnp.asarray(w), jnp.asarray(h),
                                 inner_args=(x, y), outer_args=(xv, yv), tol=1e-9,
                                 max_terms=3000, strong_convexity=np.exp(h))
  assert bool(cert.certified) and abs(float(g) - exact) <= 1e-9
  assert int(cert.num_products) == int(cert.num_terms) + hg.POWER_ITERATIONS


def test_argument_validation():
  x, y, xv, yv, h = _ridge_problem(0)
  w, _, _ = _ridge_closed_form(x, y, xv, yv, h)
  call = functools.partial(hg.neumann_hypergrad, ridge_inner, ridge_outer, jnp.asarray(w),
                           jnp.asarray(h), inner_args=(x, y), outer_args=(xv, yv),
                           num_terms=3)
  with pytest.raises(ValueError, match="solver must be 'neumann' or 'cg'"):
    call(solver="gmres")
  with pytest.raises(ValueError, match="alpha must be > 0"):
    call(alpha=-0.1)
  with pytest.raises(ValueError, match="alpha must be > 0"):
    hg.neumann_solve(lambda v: v, jnp.ones(2), alpha=0.0, num_terms=3)
  assert hg.implicit_hypergrad is hg.neumann_hypergrad


def test_mixed_term_through_outputs_equals_the_general_one():
  """GaussNewton(model_uses_hparams=False) takes the mixed term through the
  outputs' linearisation; it must give the same hyper-gradient and norm."""
  rng = np.random.default_rng(5)
  x, y = jnp.asarray(rng.normal(size=(30, 4))), jnp.asarray(rng.normal(size=30))
  xv, yv = jnp.asarray(rng.normal(size=(20, 4))), jnp.asarray(rng.normal(size=20))
  model_fn = lambda w, h, x, y: (jnp.tanh(x @ w), w)
  out_loss = lambda o, h, x, y: (jnp.mean((o[0] - y) ** 2) / 2
                                 + jnp.exp(h["l2"]) / 2 * jnp.sum(o[1] ** 2)
                                 + h["shift"] * jnp.mean(o[0]))
  outer = lambda w, h, xv, yv: jnp.mean((jnp.tanh(xv @ w) - yv) ** 2)
  w = jnp.asarray(rng.normal(size=4))
  h = {"l2": jnp.asarray(-1.0), "shift": jnp.asarray(0.3)}
  kw = dict(inner_args=(x, y), outer_args=(xv, yv), solver="cg", damping=1e-2, num_terms=10)
  g1, c1 = hg.neumann_hypergrad(hg.GaussNewton(model_fn, out_loss), outer, w, h, **kw)
  g2, c2 = hg.neumann_hypergrad(hg.GaussNewton(model_fn, out_loss, model_uses_hparams=False),
                                outer, w, h, **kw)
  for k in h:
    np.testing.assert_allclose(g2[k], g1[k], rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(c2.mixed_norm, c1.mixed_norm, rtol=1e-10)
  assert float(c1.mixed_norm) > 0


@pytest.mark.parametrize("solver", ["neumann", "cg"])
def test_a_traced_number_of_terms_compiles_once_for_every_k(solver):
  """``num_terms`` as a ``jit`` argument: one program, the same answers as static K."""
  x, y, xv, yv, h = _ridge_problem(0)
  w, _, _ = _ridge_closed_form(x, y, xv, yv, h)
  w, h = jnp.asarray(w, jnp.float32), jnp.asarray(h, jnp.float32)
  call = lambda k: hg.neumann_hypergrad(
      ridge_inner, ridge_outer, w, h, inner_args=(x, y), outer_args=(xv, yv), solver=solver,
      alpha=0.5, num_terms=k, strong_convexity=jnp.exp(h))
  traced = jax.jit(call)
  for k in (0, 1, 3):
    (g1, c1), (g2, c2) = traced(jnp.asarray(k)), call(k)
    np.testing.assert_allclose(float(g1), float(g2), rtol=1e-6)
    assert int(c1.num_terms) == int(c2.num_terms)
  assert traced._cache_size() == 1
