"""hypergrad.implicit_solution: certified implicit differentiation as a transformation.

Oracles: autodiff through a closed form (ridge) and a dense solve with
``jax.hessian`` (logistic regression, jaxopt's example), in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from modalimmune_jax.hypergrad import SolveReport, implicit_solution, neumann_hypergrad


def _data(n=40, d=5, nv=30, seed=0, classify=False):
  k = jax.random.split(jax.random.key(seed), 4)
  w = jnp.linspace(-1.0, 1.0, d)
  x, xv = jax.random.normal(k[0], (n, d)), jax.random.normal(k[2], (nv, d))
  y, yv = x @ w + jax.random.normal(k[1], (n,)), xv @ w + jax.random.normal(k[3], (nv,))
  if classify:
    y, yv = (y > 0).astype(x.dtype), (yv > 0).astype(x.dtype)
  return x, y, xv, yv


def ridge_inner(w, h, x, y):
  return jnp.mean((x @ w - y) ** 2) / 2 + jnp.exp(h) / 2 * w @ w


def ridge_closed_form(h, x, y):
  d = x.shape[1]
  return jnp.linalg.solve(x.T @ x / len(y) + jnp.exp(h) * jnp.eye(d, dtype=x.dtype),
                          x.T @ y / len(y))


def ridge(**settings):
  settings.setdefault("strong_convexity", lambda h, x, y: jnp.exp(h))
  return implicit_solution(ridge_inner, **settings)(ridge_closed_form)


def _val(solution, x, y, xv, yv):
  return lambda h, report: jnp.mean((xv @ solution(h, report, x, y) - yv) ** 2)


def _exact(x, y, xv, yv):
  return jax.grad(lambda h: jnp.mean((xv @ ridge_closed_form(h, x, y) - yv) ** 2))


@pytest.mark.parametrize("solver,terms", [("cg", dict(tol=1e-9)), ("cg", dict(num_terms=2)),
                                          ("neumann", dict(num_terms=30)),
                                          ("neumann", dict(rel_tol=1e-6))])
def test_ridge_gradient_equals_the_closed_form_within_the_certified_bound(x64, solver, terms):
  x, y, xv, yv = _data()
  val = _val(ridge(solver=solver, **terms), x, y, xv, yv)
  for h in (-2.0, 0.0, 1.0):
    g, report = jax.jit(jax.grad(val, argnums=(0, 1)))(h, SolveReport.zeros())
    exact = float(_exact(x, y, xv, yv)(h))
    assert bool(report.certified) and int(report.solves) == 1, report
    assert abs(float(g) - exact) <= float(report.error_bound) * (1 + 1e-6) + 1e-12
    if "tol" in terms:
      assert float(report.error_bound) <= terms["tol"]
  # a two-step CG leaves a visible error, and the bound still covers it
  if terms == dict(num_terms=2):
    assert abs(float(g) - exact) > 1e-8


def test_logistic_gradient_equals_a_dense_solve_within_the_bound(x64):
  """L2-regularised logistic regression (jaxopt's implicit-differentiation
  example): the inner solver is 30 Newton steps; the oracle is the implicit
  function theorem with the dense Hessian and ``jnp.linalg.solve``."""
  x, y, xv, yv = _data(classify=True)

  def inner(w, h, x, y):
    z = x @ w
    return jnp.mean(jnp.logaddexp(0.0, z) - y * z) + jnp.exp(h) / 2 * w @ w

  def newton(h, x, y):
    w = jnp.zeros(x.shape[1], x.dtype)
    step = lambda w, _: (w - jnp.linalg.solve(jax.hessian(inner)(w, h, x, y),
                                              jax.grad(inner)(w, h, x, y)), None)
    return jax.lax.scan(step, w, None, length=30)[0]

  outer = lambda w: jnp.mean(jnp.logaddexp(0.0, xv @ w) - yv * (xv @ w))
  solution = implicit_solution(inner, solver="cg", tol=1e-10,
                               strong_convexity=lambda h, x, y: jnp.exp(h))(newton)
  for h in (-3.0, -1.0):
    g, report = jax.grad(lambda h, r: outer(solution(h, r, x, y)), argnums=(0, 1))(
        h, SolveReport.zeros())
    w = newton(h, x, y)
    hess = jax.hessian(inner)(w, h, x, y)
    mixed = jax.jacobian(jax.grad(inner), argnums=1)(w, h, x, y)
    dense = -mixed @ jnp.linalg.solve(hess, jax.grad(outer)(w))
    assert bool(report.certified)
    assert abs(float(g) - float(dense)) <= float(report.error_bound) + 1e-12
    assert float(report.error_bound) <= 1e-10


def test_jit_and_vmap_over_hyperparameters_give_each_its_own_report():
  x, y, xv, yv = _data()
  val = _val(ridge(tol=1e-5), x, y, xv, yv)
  hs = jnp.array([-2.0, -0.5, 0.0, 1.0])
  reports = jax.tree.map(lambda z: jnp.zeros(hs.shape), SolveReport.zeros())
  gs, rep = jax.jit(jax.vmap(jax.grad(val, argnums=(0, 1))))(hs, reports)
  exact = np.array([float(_exact(x, y, xv, yv)(h)) for h in hs])
  assert rep.solves.shape == hs.shape and np.all(np.asarray(rep.solves) == 1)
  assert np.all(np.asarray(rep.uncertified) == 0)
  np.testing.assert_allclose(gs, exact, rtol=1e-4, atol=1e-5)
  one = [jax.grad(val, argnums=(0, 1))(h, SolveReport.zeros()) for h in hs]
  np.testing.assert_allclose(gs, [float(g) for g, _ in one], rtol=1e-5, atol=1e-6)


def test_pytree_params_and_hyperparameters(x64):
  """Weights and a bias in a dict, one L2 coefficient each: the oracle is autodiff
  through the closed form of the same block-penalised ridge."""
  x, y, xv, yv = _data(d=4)

  def inner(p, h, x, y):
    r = x @ p["w"] + p["b"] - y
    return (jnp.mean(r ** 2) / 2 + jnp.exp(h["w"]) / 2 * p["w"] @ p["w"]
            + jnp.exp(h["b"]) / 2 * p["b"] ** 2)

  def closed(h, x, y):
    a = jnp.concatenate([x, jnp.ones((len(y), 1))], 1)
    pen = jnp.diag(jnp.concatenate([jnp.full(x.shape[1], jnp.exp(h["w"])),
                                    jnp.exp(h["b"])[None]]))
    sol = jnp.linalg.solve(a.T @ a / len(y) + pen, a.T @ y / len(y))
    return {"w": sol[:-1], "b": sol[-1]}

  mu = lambda h, x, y: jnp.minimum(jnp.exp(h["w"]), jnp.exp(h["b"]))
  solution = implicit_solution(inner, tol=1e-9, strong_convexity=mu)(closed)
  val = lambda h, p: jnp.mean((xv @ p["w"] + p["b"] - yv) ** 2)
  h = {"w": jnp.array(-1.0), "b": jnp.array(0.5)}
  g, report = jax.grad(lambda h, r: val(h, solution(h, r, x, y)), argnums=(0, 1))(
      h, SolveReport.zeros())
  exact = jax.grad(lambda h: val(h, closed(h, x, y)))(h)
  assert bool(report.certified)
  err = np.sqrt(sum((float(g[k]) - float(exact[k])) ** 2 for k in h))
  assert err <= float(report.error_bound) + 1e-12
  assert set(g) == {"w", "b"}


def test_solves_add_up_in_a_sum_over_tasks(x64):
  """A meta-objective over two tasks calls the solution twice: the report counts
  two solves, and the summed bound covers the total gradient's error."""
  tasks = [_data(seed=s) for s in (0, 1)]
  solution = ridge(solver="cg", num_terms=3)
  meta = lambda h, r: sum(_val(solution, *t)(h, r) for t in tasks)
  g, report = jax.grad(meta, argnums=(0, 1))(0.0, SolveReport.zeros())
  exact = sum(float(_exact(*t)(0.0)) for t in tasks)
  assert int(report.solves) == 2 and int(report.products) >= 2 * 3
  assert abs(float(g) - exact) <= float(report.error_bound)
  assert abs(float(g) - exact) > 1e-9  # three CG steps on 5 unknowns: an error to cover


def test_equals_neumann_hypergrad_on_the_same_problem():
  """The transformation and the routine share their solve: same answer, same bound
  (the routine adds the direct term, zero here)."""
  x, y, xv, yv = _data()
  outer = lambda w, h: jnp.mean((xv @ w - yv) ** 2)
  h = jnp.array(-0.5)
  w = ridge_closed_form(h, x, y)
  g_routine, cert = neumann_hypergrad(ridge_inner, outer, w, h, inner_args=(x, y),
                                      solver="cg", num_terms=3, strong_convexity=jnp.exp(h))
  g, report = jax.grad(_val(ridge(solver="cg", num_terms=3), x, y, xv, yv),
                       argnums=(0, 1))(h, SolveReport.zeros())
  np.testing.assert_allclose(float(g), float(g_routine), rtol=1e-6)
  np.testing.assert_allclose(float(report.error_bound), float(cert.error_bound), rtol=1e-6)


def test_a_diverging_backward_solve_is_reported_and_not_certified():
  x, y, xv, yv = _data()
  lam_max = float(jnp.linalg.eigvalsh(x.T @ x / len(y)).max()) + 1.0
  val = _val(ridge(solver="neumann", alpha=5.0 / lam_max, num_terms=50), x, y, xv, yv)
  g, report = jax.grad(val, argnums=(0, 1))(0.0, SolveReport.zeros())
  assert float(report.diverging) == 1.0 and float(report.uncertified) == 1.0
  assert not bool(report.certified)


def test_without_a_proven_convexity_the_hessian_solve_is_not_certified():
  x, y, xv, yv = _data()
  val = _val(ridge(strong_convexity=None, tol=1e-6), x, y, xv, yv)
  g, report = jax.grad(val, argnums=(0, 1))(0.0, SolveReport.zeros())
  assert float(report.uncertified) == 1.0 and not bool(report.certified)
  assert np.isfinite(float(g))


def test_bad_settings_name_the_argument_when_decorating():
  with pytest.raises(ValueError, match="solver"):
    implicit_solution(ridge_inner, solver="lu")
  with pytest.raises(ValueError, match="num_terms, tol and rel_tol"):
    implicit_solution(ridge_inner, tol=1e-3, num_terms=3)


def test_data_arguments_are_constants_integers_included():
  """``args`` get zero cotangents (integer labels: float0), as documented."""
  x, y, xv, yv = _data()
  labels = (y > 0).astype(jnp.int32)
  inner = lambda w, h, x, lab: ridge_inner(w, h, x, lab.astype(x.dtype))
  solution = implicit_solution(inner, tol=1e-4,
                               strong_convexity=lambda h, x, lab: jnp.exp(h))(
      lambda h, x, lab: ridge_closed_form(h, x, lab.astype(x.dtype)))
  gx = jax.grad(lambda x: jnp.sum(solution(0.0, SolveReport.zeros(), x, labels)))(x)
  assert float(jnp.abs(gx).max()) == 0.0
