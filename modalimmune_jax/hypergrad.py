"""Certified implicit hyper-gradients: Neumann series or conjugate gradients (BHGD, part 5).

For an inner problem ``theta*(phi) = argmin_theta L_tr(theta, phi)`` and an
outer objective ``L_val(theta, phi)``, the implicit function theorem gives

    dL_val/dphi = d_phi L_val - (d^2 L_tr / dphi dtheta) A^{-1} grad_theta L_val

with ``A`` the curvature of ``L_tr`` in ``theta``. ``A^{-1} v`` is
approximated either by the truncated Neumann series ``alpha * sum_{k<K} (I -
alpha A)^k v`` (Lorraine et al., 2020), one matrix-vector product per term, or
by ``K`` steps of conjugate gradients (:func:`cg_solve`), which need about
``sqrt(kappa)`` products where the series needs about ``kappa`` (Grazzi et al.,
2020). Whatever the solver, the error of its solution ``p_K`` is bounded a
posteriori from its residual ``r_K = v - A p_K``:

    ||p_K - A^{-1} v|| <= ||r_K|| / mu,     mu <= lambda_min(A).

For the series ``r_K`` is the next term, so it comes with the last product; CG
recomputes it with one more product at the end. ``mu`` is known when ``A = G +
damping I`` with ``G`` the Gauss-Newton matrix of a loss that is convex in the
model's outputs (``mu = damping``), or when the user guarantees strong
convexity of the inner loss. Multiplied by the exact spectral norm of the mixed
term it bounds the hyper-gradient error. Without a known ``mu`` (plain
Hessian), the certificate says so (``certified=False``) and reports an estimate
instead. A solve that diverges (the series grows: ``alpha`` too large, or ``A``
not positive definite; CG meets ``p^T A p <= 0``) stops at once, is reported
``diverging=True``, and is never certified.

Example:
  >>> g, cert = neumann_hypergrad(inner, outer, w_star, h, inner_args=(x, y),
  ...                             outer_args=(xv, yv), solver="cg", tol=1e-6,
  ...                             strong_convexity=jnp.exp(h))
  >>> # cert.certified: |g - exact| <= cert.error_bound <= 1e-6

See ``docs/method.md`` for the equations as implemented.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
import optax.tree_utils as otu

from modalimmune_jax import linalg
from modalimmune_jax.curvature import hvp_operator
from modalimmune_jax.finite import all_finite

__all__ = [
    "NeumannInfo",
    "SolveInfo",
    "neumann_solve",
    "cg_solve",
    "GaussNewton",
    "HypergradCertificate",
    "neumann_hypergrad",
    "implicit_hypergrad",
    "SolveReport",
    "implicit_solution",
    "growth_tolerance",
    "RHO_SAFETY",
    "POWER_ITERATIONS",
    "ALPHA_SAFETY",
    "SOLVERS",
]

PyTree = Any

# Power iteration under-estimates a spectral radius: the a priori bound uses
# rho * RHO_SAFETY.
RHO_SAFETY = 1.05
# ``alpha=None``: ``alpha = 1 / (ALPHA_SAFETY * lambda_max)`` with lambda_max
# estimated by POWER_ITERATIONS products. The series converges for any
# estimate above lambda_max / (2 * ALPHA_SAFETY).
POWER_ITERATIONS = 20
ALPHA_SAFETY = 1.1
SOLVERS = ("neumann", "cg")


def growth_tolerance(dtype) -> float:
  """Relative growth of a Neumann residual that counts as divergence.

  For a symmetric ``A`` the residual norms ``||(I - alpha A)^k b||`` are
  log-convex in ``k`` (``sum_i c_i^2 (1 - alpha lambda_i)^{2k}``): they never
  increase while the series converges, and once they increase they keep
  increasing. Any growth beyond rounding is thus divergence; this is the
  rounding allowance, ``max(1e-6, sqrt(eps))`` (``1e-6`` in float64,
  ``3.5e-4`` in float32), far above the ``~eps`` wobble of a residual that
  has stalled at rounding level. (A non-symmetric ``matvec`` can grow
  transiently and is outside this rule and the certificate.)
  """
  if not jnp.issubdtype(dtype, jnp.floating):
    dtype = jnp.float32
  return max(1e-6, math.sqrt(float(jnp.finfo(dtype).eps)))


class NeumannInfo(NamedTuple):
  """Diagnostics of :func:`neumann_solve` and :func:`cg_solve` (alias ``SolveInfo``).

  Attributes:
    num_terms: series terms summed into ``x``, or CG steps in ``x`` (one
      matrix-vector product each).
    residual_norm: ``||b - A x||``. Neumann: the next series term, exact in
      exact arithmetic. CG: recomputed with one extra product at the end (the
      recursive CG residual drifts from the true one in floating point).
    rho: Neumann: ``||t_K|| / ||t_{K-1}||``, an estimate of ``||I - alpha A||``
      from the last two terms (a free power iteration started at ``b``; nan
      before the first term); after a divergence, the growth ratio of the
      rejected term (``> 1``). CG: nan (its residual is not monotone and it
      has no fixed contraction).
    diverging: the solve was stopped as diverging: a non-finite residual
      (including a non-finite ``b``), or, Neumann, a term that grew by more
      than :func:`growth_tolerance` (``rho > 1``); CG, a breakdown ``p^T A p <=
      0`` (``A`` is not positive definite). The offending term or step is not
      taken: ``x`` is the Neumann partial sum with the smallest residual, or
      the last CG iterate, finite, with its residual reported.
    num_products: matrix-vector products taken in all: ``num_terms``, plus the
      term or step rejected as diverging, plus the power iterations of
      ``alpha=None`` (Neumann) or the final residual (CG).
    lambda_min_estimate: an estimate (not a bound) of ``lambda_min(A)`` from
      the solve: Neumann ``(1 - rho) / alpha`` (0 unless ``rho < 1``), CG the
      smallest Rayleigh quotient ``p^T A p / p^T p`` of its search directions
      (nan before the first step). Optimistic: in exact arithmetic CG's is
      ``>= lambda_min``, and so is Neumann's when ``alpha <= 2 / (lambda_min +
      lambda_max)`` (``rho`` under-estimates ``||I - alpha A||``).
    alpha: the Neumann step used (given or estimated); nan for CG.
  """
  num_terms: chex.Array
  residual_norm: chex.Array
  rho: chex.Array
  diverging: chex.Array
  num_products: chex.Array
  lambda_min_estimate: chex.Array
  alpha: chex.Array


SolveInfo = NeumannInfo


def _safe_div(num, den):
  """``num / den``, 0 where ``den == 0`` (no nan from ``0 / 0``)."""
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def _terms_taken(num_iters, diverging):
  """Iterations less the last one when it was rejected as diverging."""
  return num_iters - (diverging & (num_iters > 0)).astype(num_iters.dtype)


def _unit(v):
  n = otu.tree_norm(v)
  return otu.tree_scale(1.0 / jnp.where(n > 0, n, 1.0), v)


def _estimate_lambda_max(matvec, like, num_iters=POWER_ITERATIONS):
  """Power-iteration estimate ``||A v_k||`` of ``max |lambda(A)|`` (a lower one).

  Starts from a fixed pseudo-random pytree like ``like`` (key 0), so it is
  deterministic and jit-safe; costs ``num_iters`` products.
  """
  def body(_, carry):
    v, _ = carry
    av = matvec(v)
    return _unit(av), otu.tree_norm(av)

  v0 = _unit(otu.tree_random_like(jax.random.PRNGKey(0), like))
  _, lam = jax.lax.fori_loop(0, num_iters, body, (v0, otu.tree_norm(v0)))
  return lam


def _auto_alpha(matvec, b):
  """``alpha = 1 / (ALPHA_SAFETY * lambda_max estimate)``, 1 if that is not > 0."""
  lam = _estimate_lambda_max(matvec, b)
  return jnp.where(lam > 0, 1.0 / (ALPHA_SAFETY * jnp.where(lam > 0, lam, 1.0)), 1.0)


def _check_alpha(alpha):
  if isinstance(alpha, (int, float)) and not alpha > 0:
    raise ValueError(f"alpha must be > 0 (or None to estimate it), got {alpha}")


def _neumann_loop(matvec, b, alpha, max_terms, keep_going):
  """Sums ``alpha * sum_k (I - alpha A)^k b`` while ``keep_going`` and not diverging.

  ``keep_going(k, residual_norm, lambda_min_estimate, x)`` (``x`` the partial
  solution); the loop also stops at the first term whose residual is
  non-finite or grew (see :func:`growth_tolerance`).
  """
  b_norm = otu.tree_norm(b)
  growth = 1.0 + growth_tolerance(b_norm.dtype)
  lam_est = lambda rho: jnp.where(rho < 1, (1.0 - rho) / alpha, 0.0)

  def cond(carry):
    k, acc, _, res_norm, rho, diverging = carry
    return ((k < max_terms) & ~diverging
            & keep_going(k, res_norm, lam_est(rho), otu.tree_scale(alpha, acc)))

  def body(carry):
    k, acc, term, res_norm, _, _ = carry
    new_acc = otu.tree_add(acc, term)
    new_term = otu.tree_sub(term, otu.tree_scale(alpha, matvec(term)))
    new_norm = otu.tree_norm(new_term)
    diverging = ~jnp.isfinite(new_norm) | (new_norm > growth * res_norm)
    # A term that grew is not taken: x stays the partial sum with the smallest
    # residual seen, and that residual stays exact and finite.
    keep = lambda new, old: otu.tree_where(diverging, old, new)
    return (k + 1, keep(new_acc, acc), keep(new_term, term),
            keep(new_norm, res_norm), _safe_div(new_norm, res_norm), diverging)

  init = (jnp.zeros([], jnp.int32), otu.tree_zeros_like(b), b, b_norm,
          jnp.full([], jnp.nan, b_norm.dtype), ~jnp.isfinite(b_norm))
  k, acc, _, res_norm, rho, diverging = jax.lax.while_loop(cond, body, init)
  info = NeumannInfo(num_terms=_terms_taken(k, diverging), residual_norm=res_norm,
                     rho=rho, diverging=diverging, num_products=k,
                     lambda_min_estimate=lam_est(rho),
                     alpha=jnp.asarray(alpha, b_norm.dtype))
  return otu.tree_scale(alpha, acc), info


def _cg_loop(matvec, b, max_terms, keep_going):
  """Conjugate gradients from ``x = 0`` while ``keep_going`` and no breakdown.

  ``keep_going(k, residual_norm, lambda_min_estimate, x)`` sees the recursive
  residual and the iterate; the returned ``residual_norm`` is recomputed as
  ``||b - A x||``.
  Stops at an exactly zero residual (the solution is exact).
  """
  b_norm = otu.tree_norm(b)
  rr0 = otu.tree_norm(b, squared=True)

  def cond(carry):
    k, x, _, _, rr, lam, bad = carry
    return (k < max_terms) & ~bad & (rr > 0) & keep_going(k, jnp.sqrt(rr), lam, x)

  def body(carry):
    k, x, r, p, rr, lam, _ = carry
    ap = matvec(p)
    pap = otu.tree_vdot(p, ap)
    step = _safe_div(rr, pap)
    x_new = otu.tree_add_scale(x, step, p)
    r_new = otu.tree_add_scale(r, -step, ap)
    rr_new = otu.tree_norm(r_new, squared=True)
    p_new = otu.tree_add_scale(r_new, rr_new / rr, p)
    lam_new = jnp.fmin(lam, pap / otu.tree_norm(p, squared=True))
    # Breakdown: A is not positive definite along p, or the numbers overflowed.
    bad = ~(pap > 0) | ~jnp.isfinite(pap) | ~jnp.isfinite(rr_new)
    keep = lambda new, old: otu.tree_where(bad, old, new)
    return (k + 1, keep(x_new, x), keep(r_new, r), keep(p_new, p),
            keep(rr_new, rr), keep(lam_new, lam), bad)

  init = (jnp.zeros([], jnp.int32), otu.tree_zeros_like(b), b, b, rr0,
          jnp.full([], jnp.nan, b_norm.dtype), ~jnp.isfinite(b_norm))
  k, x, _, _, _, lam, bad = jax.lax.while_loop(cond, body, init)
  res_norm = otu.tree_norm(otu.tree_sub(b, matvec(x)))
  info = NeumannInfo(num_terms=_terms_taken(k, bad), residual_norm=res_norm,
                     rho=jnp.full([], jnp.nan, b_norm.dtype),
                     diverging=bad | ~jnp.isfinite(res_norm), num_products=k + 1,
                     lambda_min_estimate=lam,
                     alpha=jnp.full([], jnp.nan, b_norm.dtype))
  return x, info


def _solve(solver, matvec, b, alpha, max_terms, keep_going):
  """Dispatches to the Neumann series (estimating ``alpha`` if None) or CG."""
  if solver == "cg":
    return _cg_loop(matvec, b, max_terms, keep_going)
  if alpha is not None:
    return _neumann_loop(matvec, b, alpha, max_terms, keep_going)
  x, info = _neumann_loop(matvec, b, _auto_alpha(matvec, b), max_terms, keep_going)
  return x, info._replace(num_products=info.num_products + POWER_ITERATIONS)


def _check_solver(solver):
  if solver not in SOLVERS:
    raise ValueError(f"solver must be 'neumann' or 'cg', got {solver!r}")


def _check_terms(num_terms, tol):
  if (num_terms is None) == (tol is None):
    raise ValueError("give exactly one of num_terms and tol")
  if isinstance(num_terms, (int, np.integer)) and num_terms < 0:
    raise ValueError(f"num_terms must be >= 0, got {num_terms}")


def _linear_solve(solver, matvec, b, alpha, num_terms, tol, max_terms,
                  min_eigenvalue):
  _check_terms(num_terms, tol)
  if num_terms is not None:
    return _solve(solver, matvec, b, alpha, num_terms, lambda k, r, lam, x: True)
  scale = 1.0 if min_eigenvalue is None else 1.0 / min_eigenvalue
  return _solve(solver, matvec, b, alpha, max_terms,
                lambda k, r, lam, x: r * scale > tol)


def neumann_solve(matvec: Callable[[PyTree], PyTree], b: PyTree, *,
                  alpha: float | None = None, num_terms: int | None = None,
                  tol: float | None = None, max_terms: int = 100,
                  min_eigenvalue: float | None = None
                  ) -> tuple[PyTree, NeumannInfo]:
  """Truncated Neumann series ``x = alpha * sum_{k<num_terms} (I - alpha A)^k b``.

  Approximates ``A^{-1} b`` for a symmetric positive definite ``A`` given as
  ``matvec``; converges when ``0 < alpha < 2 / lambda_max(A)``. Each term costs
  one ``matvec``, and the exact residual comes with the last one. The series
  stops early, with ``info.diverging``, as soon as its residual is non-finite
  or grows (:func:`growth_tolerance`); ``x`` is then the partial sum so far.

  Args:
    matvec: the linear map ``v -> A v`` on pytrees like ``b``.
    b: right-hand side (a pytree).
    alpha: step size of the series; ``None``: ``1 / (1.1 * lambda_max)`` with
      ``lambda_max`` from :data:`POWER_ITERATIONS` power iterations (counted
      in ``info.num_products``).
    num_terms: fixed number of terms (>= 0).
    tol: instead of ``num_terms``, stop at the first ``K`` with
      ``residual_norm <= tol`` (or, when ``min_eigenvalue`` is given, with the
      error bound ``residual_norm / min_eigenvalue <= tol``), at most
      ``max_terms`` terms, in a ``lax.while_loop``.
    max_terms: cap for the adaptive mode.
    min_eigenvalue: a lower bound on ``lambda_min(A)`` used by ``tol``.

  Returns:
    ``(x, info)`` with ``info`` a :class:`NeumannInfo`.

  Example:
    >>> a = jnp.array([[2.0, 0.5], [0.5, 1.0]])
    >>> x, info = neumann_solve(lambda v: a @ v, jnp.ones(2), alpha=0.4,
    ...                         num_terms=60)
    >>> # x ~ jnp.linalg.solve(a, jnp.ones(2)); info.residual_norm ~ 1e-10
    >>> x, info = neumann_solve(lambda v: a @ v, jnp.ones(2), tol=1e-5)
    >>> # alpha estimated: info.num_products == info.num_terms + POWER_ITERATIONS
  """
  _check_alpha(alpha)
  return _linear_solve("neumann", matvec, b, alpha, num_terms, tol, max_terms,
                       min_eigenvalue)


def cg_solve(matvec: Callable[[PyTree], PyTree], b: PyTree, *,
             num_terms: int | None = None, tol: float | None = None,
             max_terms: int = 100, min_eigenvalue: float | None = None
             ) -> tuple[PyTree, NeumannInfo]:
  """Conjugate gradients for ``A x = b`` from ``x = 0``, ``A`` symmetric positive definite.

  About ``sqrt(kappa) log(1 / tol)`` products where the Neumann series needs
  about ``kappa log(1 / tol)`` (``kappa = lambda_max / lambda_min``). One
  ``matvec`` per step, plus one at the end for the true residual ``b - A x``
  that ``info.residual_norm`` reports (so ``residual_norm / lambda_min`` bounds
  the error as for the series). A breakdown ``p^T A p <= 0`` (``A`` is not
  positive definite) or a non-finite value stops it with ``info.diverging``
  and the last finite iterate. It also stops once the residual is exactly 0.

  Args:
    matvec: the linear map ``v -> A v`` on pytrees like ``b``.
    b: right-hand side (a pytree).
    num_terms: fixed number of steps (>= 0).
    tol: instead of ``num_terms``, stop at the first ``K`` whose (recursive)
      residual norm is ``<= tol`` (``residual_norm / min_eigenvalue <= tol``
      when ``min_eigenvalue`` is given), at most ``max_terms`` steps.
    max_terms: cap for the adaptive mode.
    min_eigenvalue: a lower bound on ``lambda_min(A)`` used by ``tol``.

  Returns:
    ``(x, info)`` with ``info`` a :class:`NeumannInfo` (``rho`` and ``alpha``
    are nan).

  Example:
    >>> a = jnp.array([[2.0, 0.5], [0.5, 1.0]])
    >>> x, info = cg_solve(lambda v: a @ v, jnp.ones(2), num_terms=2)
    >>> # exact after n = 2 steps, up to rounding; info.num_products == 3
  """
  return _linear_solve("cg", matvec, b, None, num_terms, tol, max_terms,
                       min_eigenvalue)


class GaussNewton(NamedTuple):
  """An inner loss split as ``output_loss(model_fn(params, hparams, *a), hparams, *a)``.

  Pass it as ``inner_loss`` to :func:`neumann_hypergrad` to use the
  Gauss-Newton curvature ``G = J^T (d^2 output_loss / d out^2) J``, which is
  positive semi-definite when ``output_loss`` is convex in the outputs (squared
  error, softmax cross-entropy, ...). Put regularisers in the outputs: e.g.
  ``model_fn = lambda w, h, x, y: (x @ w, w)`` and
  ``output_loss = lambda o, h, x, y: ce(o[0], y) + exp(h) / 2 * sum(o[1] ** 2)``.

  With ``model_uses_hparams=False`` (a promise that ``model_fn`` ignores its
  ``hparams``) the mixed term is ``J^T (d/dphi grad_out output_loss)``, computed
  through the linearisation the Gauss-Newton products already use: no
  second-order pass through the model (cheaper to run and to compile).
  """
  model_fn: Callable[..., PyTree]
  output_loss: Callable[..., jax.Array]
  model_uses_hparams: bool = True

  def __call__(self, params, hparams, *args):
    return self.output_loss(self.model_fn(params, hparams, *args), hparams, *args)


class HypergradCertificate(NamedTuple):
  """What :func:`neumann_hypergrad` can say about its own error.

  Attributes:
    num_terms: Neumann terms summed or CG steps taken (one curvature product
      each).
    residual_norm: ``||v - A p_K||`` of the linear solve, exact (Neumann: the
      next term; CG: recomputed).
    min_eigenvalue: the lower bound ``mu`` on ``lambda_min(A)`` used (0 when
      none is known).
    solve_error_bound: ``||p_K - A^{-1} v||`` bound, ``residual_norm / mu``.
    mixed_norm: spectral norm of ``d^2 L_tr / dphi dtheta``, computed exactly.
    error_bound: bound on ``||hypergrad - exact||`` (``mixed_norm *
      solve_error_bound``); when not ``rigorous`` it is the estimate
      ``mixed_norm * residual_norm / lambda_min_estimate`` (see
      :class:`NeumannInfo`), ``inf`` when that estimate is not positive.
    rho: estimate of ``||I - alpha A||`` from the series itself (nan for CG).
    a_priori_bound: ``mixed_norm * alpha * r^K / (1 - r) * ||v||`` with ``r =
      rho * RHO_SAFETY``; ``inf`` when ``r >= 1`` and for CG.
    rigorous: the bound rests on a proven ``mu > 0`` (Gauss-Newton with
      damping, or a user-given strong convexity).
    diverging: the solve was stopped as diverging (:class:`NeumannInfo`).
    certified: ``rigorous``, not ``diverging``, the hyper-gradient and the
      bound finite (and the bound ``<= tol`` if a ``tol`` was given).
    num_products: curvature products taken in all: ``num_terms``, plus the
      power iterations of ``alpha=None`` (Neumann) or the residual (CG).
    alpha: the Neumann step used (given or estimated); nan for CG.
  """
  num_terms: chex.Array
  residual_norm: chex.Array
  min_eigenvalue: chex.Array
  solve_error_bound: chex.Array
  mixed_norm: chex.Array
  error_bound: chex.Array
  rho: chex.Array
  a_priori_bound: chex.Array
  rigorous: chex.Array
  diverging: chex.Array
  certified: chex.Array
  num_products: chex.Array
  alpha: chex.Array


def _mixed_columns(inner, params, hparams, inner_args):
  """Columns ``d/dphi_i grad_theta L_tr`` for each flat hyper-parameter ``i``."""
  flat, unravel = ravel_pytree(hparams)
  grad_theta = lambda f: jax.grad(inner)(params, unravel(f), *inner_args)
  basis = jnp.eye(flat.size, dtype=flat.dtype)
  cols = jax.vmap(lambda e: jax.jvp(grad_theta, (flat,), (e,))[1])(basis)
  return cols, unravel


def _mixed_columns_through_outputs(inner, outputs, vjp_fn, hparams, inner_args):
  """The same columns when only ``output_loss`` depends on ``hparams``:
  ``J^T d/dphi_i grad_out output_loss`` (``vjp_fn`` is ``J^T``)."""
  flat, unravel = ravel_pytree(hparams)
  grad_out = lambda f: jax.grad(inner.output_loss)(outputs, unravel(f), *inner_args)
  basis = jnp.eye(flat.size, dtype=flat.dtype)
  out_cols = jax.vmap(lambda e: jax.jvp(grad_out, (flat,), (e,))[1])(basis)
  return jax.vmap(lambda c: vjp_fn(c)[0])(out_cols), unravel


def neumann_hypergrad(inner_loss: Callable[..., jax.Array] | GaussNewton,
                      outer_loss: Callable[..., jax.Array],
                      params: PyTree, hparams: PyTree, *,
                      inner_args: tuple = (), outer_args: tuple = (),
                      alpha: float | None = None, damping: float = 0.0,
                      num_terms: int | None = None, tol: float | None = None,
                      rel_tol: float | None = None,
                      max_terms: int = 100, curvature: str = "auto",
                      strong_convexity: float | None = None,
                      solver: str = "neumann"
                      ) -> tuple[PyTree, HypergradCertificate]:
  """Implicit hyper-gradient ``dL_val/dphi`` with a certificate of its error.

  ``params`` should be (close to) a minimiser of ``inner_loss(., hparams)``.
  The curvature is ``A = C + damping * I`` with ``C`` the Hessian of the inner
  loss, or its Gauss-Newton matrix when ``inner_loss`` is a
  :class:`GaussNewton` (``curvature="auto"``; force either with
  ``"hessian"`` / ``"gauss_newton"``). All products are taken at the same
  point on the same (full or fixed) batch, so the bound is about one matrix.
  ``A^{-1} grad_theta L_val`` is solved by the Neumann series
  (:func:`neumann_solve`) or by conjugate gradients (:func:`cg_solve`, about
  ``sqrt(kappa)`` products instead of ``kappa``); the certificate is the same.

  Cost: ``num_products`` curvature products (linearised once), one outer
  gradient, and one forward-mode pass per scalar hyper-parameter for the mixed
  term (whose exact norm then comes for free).

  Args:
    inner_loss: ``inner_loss(params, hparams, *inner_args) -> scalar``, or a
      :class:`GaussNewton` split of it.
    outer_loss: ``outer_loss(params, hparams, *outer_args) -> scalar``.
    params: inner solution (pytree).
    hparams: hyper-parameters (pytree, e.g. a dict of log-scale scalars).
    inner_args, outer_args: extra arguments (batches) of the two losses.
    alpha: Neumann step, ``0 < alpha < 2 / lambda_max(A)``; ``None``: ``1 /
      (1.1 * lambda_max)`` with ``lambda_max`` from :data:`POWER_ITERATIONS`
      power iterations. Ignored by CG.
    damping: ``delta >= 0`` added to the curvature.
    num_terms: fixed number of terms (CG steps) ``K``; it may be traced (a
      ``jit`` argument), so one compiled program serves every ``K``.
    tol: instead of ``num_terms``, the smallest ``K <= max_terms`` with
      ``error_bound <= tol`` (``lax.while_loop``). With an uncertifiable
      curvature the estimated bound is used and ``certified`` stays False.
    rel_tol: instead, the smallest ``K <= max_terms`` with ``error_bound <=
      rel_tol * ||g_K||``, ``g_K`` the hyper-gradient at ``K`` terms (a check
      costs a product of the mixed term with the iterate, no curvature
      product): as many terms as the hyper-gradient's own size asks for.
    max_terms: cap on ``K`` with ``tol`` or ``rel_tol``.
    curvature: ``"auto"``, ``"hessian"`` or ``"gauss_newton"``.
    strong_convexity: a proven lower bound on ``lambda_min`` of the undamped
      curvature (e.g. the L2 coefficient of a convex loss); it makes the
      Hessian case rigorous.
    solver: ``"neumann"`` or ``"cg"``.

  Returns:
    ``(hypergrad, certificate)``: ``hypergrad`` has the structure of
    ``hparams`` and includes the direct term ``d_phi L_val``. A diverging
    solve stops at once and is reported (``certificate.diverging``), never
    certified.

  Example:
    >>> inner = lambda w, h, x, y: jnp.mean((x @ w - y) ** 2) / 2 \\
    ...     + jnp.exp(h) / 2 * jnp.sum(w ** 2)
    >>> outer = lambda w, h, x, y: jnp.mean((x @ w - y) ** 2) / 2
    >>> g, cert = jax.jit(lambda w, h: neumann_hypergrad(
    ...     inner, outer, w, h, inner_args=(x, y), outer_args=(xv, yv),
    ...     alpha=0.5, num_terms=50, strong_convexity=jnp.exp(h)))(w_star, h)
    >>> g, cert = neumann_hypergrad(inner, outer, w_star, h, inner_args=(x, y),
    ...     outer_args=(xv, yv), solver="cg", tol=1e-8,
    ...     strong_convexity=jnp.exp(h))
  """
  settings = _check_settings(inner_loss, solver=solver, alpha=alpha, damping=damping,
                             num_terms=num_terms, tol=tol, rel_tol=rel_tol,
                             max_terms=max_terms, curvature=curvature,
                             strong_convexity=strong_convexity)
  g_theta, g_phi = jax.grad(outer_loss, argnums=(0, 1))(params, hparams, *outer_args)
  return _adjoint_solve(inner_loss, params, hparams, inner_args, g_theta, g_phi, **settings)


def _check_settings(inner_loss, *, solver, alpha, damping, num_terms, tol, rel_tol,
                    max_terms, curvature, strong_convexity) -> dict:
  """The solve's settings, checked (a ``ValueError`` naming the argument), with
  ``curvature="auto"`` resolved and ``alpha`` dropped for CG."""
  _check_solver(solver)
  if curvature not in ("auto", "hessian", "gauss_newton"):
    raise ValueError(f"curvature must be 'auto', 'hessian' or 'gauss_newton', "
                     f"got {curvature!r}")
  if curvature == "auto":
    curvature = "gauss_newton" if isinstance(inner_loss, GaussNewton) else "hessian"
  if curvature == "gauss_newton" and not isinstance(inner_loss, GaussNewton):
    raise ValueError("curvature='gauss_newton' needs inner_loss to be a "
                     "GaussNewton(model_fn, output_loss)")
  if sum(x is not None for x in (num_terms, tol, rel_tol)) != 1:
    raise ValueError("give exactly one of num_terms, tol and rel_tol")
  if isinstance(num_terms, (int, np.integer)) and num_terms < 0:
    raise ValueError(f"num_terms must be >= 0, got {num_terms}")
  if solver == "cg":
    alpha = None
  _check_alpha(alpha)
  return dict(solver=solver, alpha=alpha, damping=damping, num_terms=num_terms, tol=tol,
              rel_tol=rel_tol, max_terms=max_terms, curvature=curvature,
              strong_convexity=strong_convexity)


def _adjoint_solve(inner_loss, params, hparams, inner_args, g_theta, g_phi, *, solver,
                   alpha, damping, num_terms, tol, rel_tol, max_terms, curvature,
                   strong_convexity) -> tuple[PyTree, HypergradCertificate]:
  """``g_phi - M A^{-1} g_theta`` (``M = d^2 L_tr / dphi dtheta``, ``A`` the
  damped curvature at ``params``) and its certificate: the implicit-function
  step shared by :func:`neumann_hypergrad` (``g_theta, g_phi`` the outer
  loss's gradients) and :func:`implicit_solution` (``g_theta`` the incoming
  cotangent, ``g_phi`` zero). Settings as :func:`_check_settings` returns them."""
  through_outputs = (isinstance(inner_loss, GaussNewton)
                     and not inner_loss.model_uses_hparams)
  if curvature == "gauss_newton" or through_outputs:
    model = lambda p: inner_loss.model_fn(p, hparams, *inner_args)
    outputs, jvp_fn = jax.linearize(model, params)
    vjp_fn = jax.linear_transpose(jvp_fn, params)
  if curvature == "gauss_newton":
    out_hvp = hvp_operator(lambda o: inner_loss.output_loss(o, hparams, *inner_args),
                           outputs)
    curv = lambda v: vjp_fn(out_hvp(jvp_fn(v)))[0]
  else:
    curv = hvp_operator(inner_loss, params, hparams, *inner_args)
  matvec = lambda v: otu.tree_add_scale(curv(v), damping, v)
  # A proven lower bound on lambda_min(A): G is PSD, so damping alone is one;
  # the Hessian needs the user's strong convexity.
  has_mu = curvature == "gauss_newton" or strong_convexity is not None
  known_mu = damping + (0.0 if strong_convexity is None else strong_convexity)

  if through_outputs:
    cols, unravel = _mixed_columns_through_outputs(inner_loss, outputs, vjp_fn, hparams,
                                                   inner_args)
  else:
    cols, unravel = _mixed_columns(inner_loss, params, hparams, inner_args)
  gram = sum(jnp.tensordot(c, c, axes=(tuple(range(1, c.ndim)),) * 2)
             for c in jax.tree.leaves(cols))
  mixed_norm = jnp.sqrt(jnp.maximum(jnp.max(linalg.eigvalsh(gram)), 0.0))
  mu = jnp.asarray(known_mu, dtype=mixed_norm.dtype)
  rigorous = jnp.asarray(has_mu) & (mu > 0)

  def bound(res_norm, lam_est):
    rigorous_bound = mixed_norm * res_norm / jnp.where(mu > 0, mu, 1.0)
    estimate = jnp.where(lam_est > 0, mixed_norm * res_norm
                         / jnp.where(lam_est > 0, lam_est, 1.0), jnp.inf)
    return jnp.where(rigorous, rigorous_bound, estimate)

  def hypergrad_at(x):  # d_phi L_val - (mixed term) x
    mixed = sum(jnp.tensordot(c, v, axes=(tuple(range(1, c.ndim)), tuple(range(v.ndim))))
                for c, v in zip(jax.tree.leaves(cols), jax.tree.leaves(x)))
    return jax.tree.map(lambda d, m: d - m, g_phi, unravel(mixed))

  if num_terms is not None:
    p, info = _solve(solver, matvec, g_theta, alpha, num_terms,
                     lambda k, r, lam, x: True)
  else:
    # The estimate needs a few terms to mean anything: never stop before.
    def keep_going(k, res_norm, lam_est, x):
      limit = tol if tol is not None else rel_tol * otu.tree_norm(hypergrad_at(x))
      return (bound(res_norm, lam_est) > limit) | (~rigorous & (k < 3))
    p, info = _solve(solver, matvec, g_theta, alpha, max_terms, keep_going)

  hypergrad = hypergrad_at(p)

  error_bound = bound(info.residual_norm, info.lambda_min_estimate)
  r = info.rho * RHO_SAFETY
  b_norm = otu.tree_norm(g_theta)
  a_priori = jnp.where(r < 1, mixed_norm * info.alpha * r ** info.num_terms
                       / jnp.where(r < 1, 1.0 - r, 1.0) * b_norm, jnp.inf)
  certified = (rigorous & ~info.diverging & jnp.isfinite(error_bound)
               & all_finite(hypergrad))
  if tol is not None:
    certified = certified & (error_bound <= tol)
  if rel_tol is not None:
    certified = certified & (error_bound <= rel_tol * otu.tree_norm(hypergrad))
  cert = HypergradCertificate(
      num_terms=info.num_terms,
      residual_norm=info.residual_norm,
      min_eigenvalue=jnp.where(rigorous, mu, 0.0),
      solve_error_bound=jnp.where(rigorous, info.residual_norm
                                  / jnp.where(mu > 0, mu, 1.0), jnp.inf),
      mixed_norm=mixed_norm,
      error_bound=error_bound,
      rho=info.rho,
      a_priori_bound=a_priori,
      rigorous=rigorous,
      diverging=info.diverging,
      certified=certified,
      num_products=info.num_products,
      alpha=info.alpha)
  return hypergrad, cert


# The same function; the name says what it computes whichever ``solver`` is used.
implicit_hypergrad = neumann_hypergrad


class SolveReport(NamedTuple):
  """What the backward solves of an :func:`implicit_solution` said.

  It reaches the caller as the gradient with respect to the ``report``
  argument (start from :meth:`zeros`), so it composes like any cotangent:
  every field is a float32 scalar that *adds* over the solves one gradient
  took (a meta-objective summing over tasks, say). For one solve the fields
  are its :class:`HypergradCertificate`'s.

  Attributes:
    solves: backward solves taken.
    error_bound: the sum of their error bounds, each on the cotangent its solve
      returned for its ``hparams`` input (``||computed - exact||``; by the
      triangle inequality the sum bounds the total when the hyper-parameters
      enter the solutions directly; through a map ``h -> phi(h)``, multiply by
      the norm of its Jacobian). Not rigorous when ``uncertified > 0``.
    uncertified: solves that are not certified (:class:`HypergradCertificate`
      ``certified``: no proven ``mu``, diverging, non-finite, or above ``tol``).
    diverging: solves stopped as diverging.
    products: curvature products taken in all.
  """
  solves: chex.Array
  error_bound: chex.Array
  uncertified: chex.Array
  diverging: chex.Array
  products: chex.Array

  @classmethod
  def zeros(cls) -> "SolveReport":
    """The ``report`` argument to pass (its value is never read)."""
    return cls(*(jnp.zeros((), jnp.float32) for _ in cls._fields))

  @property
  def certified(self) -> chex.Array:
    """Every solve certified (and at least one taken)."""
    return (self.solves > 0) & (self.uncertified == 0)


def _zero_cotangent(x):
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.inexact):
    return jnp.zeros_like(x)
  return np.zeros(x.shape, dtype=jax.dtypes.float0)  # integer data (labels)


def implicit_solution(inner_loss: Callable[..., jax.Array] | GaussNewton, *,
                      solver: str = "cg", damping: float = 0.0,
                      num_terms: int | None = None, tol: float | None = None,
                      rel_tol: float | None = None, max_terms: int = 100,
                      alpha: float | None = None, curvature: str = "auto",
                      strong_convexity: float | Callable[..., Any] | None = None
                      ) -> Callable[[Callable[..., PyTree]], Callable[..., PyTree]]:
  """Certified implicit differentiation as a transformation (a decorator).

  ``solve(hparams, *args) -> params``, any inner solver (closed form, an optax
  loop, L-BFGS, ...) returning a minimiser of ``inner_loss(params, hparams,
  *args)``, becomes ``solution(hparams, report, *args) -> params`` whose
  ``jax.grad``, ``jax.jit`` and ``jax.vmap`` work: its VJP is the implicit
  function theorem's, ``v -> -M A^{-1} v`` with ``M = d^2 L_tr / dphi dtheta``
  and ``A`` the (damped) curvature at the returned ``params``, solved by
  Neumann or CG exactly as :func:`neumann_hypergrad` solves it (the same code,
  the same certificate). ``solve`` itself is never differentiated.

  The certificate is never dropped: the gradient with respect to ``report``
  (pass :meth:`SolveReport.zeros`) is the :class:`SolveReport` of the backward
  solves, so ``jax.grad(f, argnums=(0, 1))(h, report)`` returns the
  hyper-gradient and what its solves can say about their error. Like
  ``custom_root`` in jaxopt, ``args`` (data) are constants for
  differentiation: their cotangent is zero, as under ``stop_gradient``; put
  whatever must be differentiated into ``hparams``. Reverse mode only.

  Args:
    inner_loss: ``inner_loss(params, hparams, *args) -> scalar``, or its
      :class:`GaussNewton` split.
    solver, damping, num_terms, tol, rel_tol, max_terms, alpha, curvature: as
      in :func:`neumann_hypergrad`; ``tol`` bounds the error of the cotangent
      for ``hparams``, ``rel_tol`` relative to its norm. Neither ``num_terms``,
      ``tol`` nor ``rel_tol`` given: ``rel_tol=1e-3``.
    strong_convexity: as in :func:`neumann_hypergrad`, or a function
      ``(hparams, *args) -> mu`` (an L2 coefficient ``exp(h)``, say).

  Returns:
    A decorator.

  Example (ridge regression, Pedregosa 2016; Lorraine et al. 2020):
    >>> inner = lambda w, h, x, y: jnp.mean((x @ w - y) ** 2) / 2 + jnp.exp(h) / 2 * w @ w
    >>> @implicit_solution(inner, tol=1e-6, strong_convexity=lambda h, x, y: jnp.exp(h))
    ... def ridge(h, x, y):
    ...   return jnp.linalg.solve(x.T @ x / len(y) + jnp.exp(h) * jnp.eye(x.shape[1]),
    ...                           x.T @ y / len(y))
    >>> val = lambda h, report: jnp.mean((xv @ ridge(h, report, x, y) - yv) ** 2)
    >>> g, report = jax.grad(val, argnums=(0, 1))(0.0, SolveReport.zeros())
    >>> # report.certified: |g - exact| <= report.error_bound <= 1e-6
  """
  if num_terms is None and tol is None and rel_tol is None:
    rel_tol = 1e-3
  settings = _check_settings(inner_loss, solver=solver, alpha=alpha, damping=damping,
                             num_terms=num_terms, tol=tol, rel_tol=rel_tol,
                             max_terms=max_terms, curvature=curvature,
                             strong_convexity=None)

  def decorator(solve: Callable[..., PyTree]) -> Callable[..., PyTree]:
    @jax.custom_vjp
    def solution(hparams, report, *args):
      del report
      return solve(hparams, *args)

    def fwd(hparams, report, *args):
      params = solve(hparams, *args)
      return params, (params, hparams, args)

    def bwd(residuals, v):
      params, hparams, args = residuals
      mu = (strong_convexity(hparams, *args) if callable(strong_convexity)
            else strong_convexity)
      zero = jax.tree.map(jnp.zeros_like, hparams)
      g, cert = _adjoint_solve(inner_loss, params, hparams, args, v, zero,
                               **dict(settings, strong_convexity=mu))
      f32 = lambda x: jnp.asarray(x, jnp.float32)
      report = SolveReport(solves=f32(1.0), error_bound=f32(cert.error_bound),
                           uncertified=f32(~cert.certified), diverging=f32(cert.diverging),
                           products=f32(cert.num_products))
      return (g, report, *jax.tree.map(_zero_cotangent, args))

    solution.defvjp(fwd, bwd)
    return functools.wraps(solve)(solution)

  return decorator
