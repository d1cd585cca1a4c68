"""Certified Neumann-truncated implicit hyper-gradients (BHGD, part 5).

For an inner problem ``theta*(phi) = argmin_theta L_tr(theta, phi)`` and an
outer objective ``L_val(theta, phi)``, the implicit function theorem gives

    dL_val/dphi = d_phi L_val - (d^2 L_tr / dphi dtheta) A^{-1} grad_theta L_val

with ``A`` the curvature of ``L_tr`` in ``theta``. ``A^{-1} v`` is
approximated by the truncated Neumann series ``alpha * sum_{k<K} (I - alpha
A)^k v`` (Lorraine et al., 2020), one matrix-vector product per term, and the
error is bounded a posteriori: the residual ``r_K = v - A p_K`` equals the next
series term ``(I - alpha A)^K v``, so it comes with one more product, and

    ||p_K - A^{-1} v|| <= ||r_K|| / mu,     mu <= lambda_min(A).

``mu`` is known when ``A = G + damping I`` with ``G`` the Gauss-Newton matrix
of a loss that is convex in the model's outputs (``mu = damping``), or when the
user guarantees strong convexity of the inner loss. Multiplied by the exact
spectral norm of the mixed term it bounds the hyper-gradient error. Without a
known ``mu`` (plain Hessian), the certificate says so (``certified=False``)
and reports an estimate instead.

See ``docs/method.md`` for the equations as implemented.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import optax.tree_utils as otu

from modalimmune_jax.curvature import hvp_operator

__all__ = [
    "NeumannInfo",
    "neumann_solve",
    "GaussNewton",
    "HypergradCertificate",
    "neumann_hypergrad",
    "RHO_SAFETY",
]

PyTree = Any

# Power iteration under-estimates a spectral radius: the a priori bound uses
# rho * RHO_SAFETY.
RHO_SAFETY = 1.05


class NeumannInfo(NamedTuple):
  """Diagnostics of :func:`neumann_solve`.

  Attributes:
    num_terms: series terms summed (= matrix-vector products taken).
    residual_norm: ``||b - A x||``, exact (it is the next series term).
    rho: estimate of ``||I - alpha A||`` from the last two terms (a free power
      iteration started at ``b``); ``>= 1`` means the series diverges.
  """
  num_terms: chex.Array
  residual_norm: chex.Array
  rho: chex.Array


def _neumann_loop(matvec, b, alpha, max_terms, keep_going):
  """Sums ``alpha * sum_k (I - alpha A)^k b`` while ``keep_going``."""
  b_norm = otu.tree_norm(b)

  def cond(carry):
    k, _, _, res_norm, rho = carry
    return (k < max_terms) & keep_going(k, res_norm, rho)

  def body(carry):
    k, acc, term, res_norm, _ = carry
    acc = otu.tree_add(acc, term)
    term = otu.tree_sub(term, otu.tree_scale(alpha, matvec(term)))
    new_norm = otu.tree_norm(term)
    rho = jnp.where(res_norm > 0, new_norm / jnp.where(res_norm > 0, res_norm, 1.0), 0.0)
    return k + 1, acc, term, new_norm, rho

  init = (jnp.zeros([], jnp.int32), otu.tree_zeros_like(b), b, b_norm,
          jnp.zeros([], b_norm.dtype))
  k, acc, _, res_norm, rho = jax.lax.while_loop(cond, body, init)
  return otu.tree_scale(alpha, acc), NeumannInfo(k, res_norm, rho)


def neumann_solve(matvec: Callable[[PyTree], PyTree], b: PyTree, *,
                  alpha: float, num_terms: int | None = None,
                  tol: float | None = None, max_terms: int = 100,
                  min_eigenvalue: float | None = None
                  ) -> tuple[PyTree, NeumannInfo]:
  """Truncated Neumann series ``x = alpha * sum_{k<num_terms} (I - alpha A)^k b``.

  Approximates ``A^{-1} b`` for a symmetric positive definite ``A`` given as
  ``matvec``; converges when ``0 < alpha < 2 / lambda_max(A)``. Each term costs
  one ``matvec``, and the exact residual comes with the last one.

  Args:
    matvec: the linear map ``v -> A v`` on pytrees like ``b``.
    b: right-hand side (a pytree).
    alpha: step size of the series.
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
    >>> # x ~ jnp.linalg.solve(a, jnp.ones(2)); info.residual_norm ~ 1e-7
  """
  if (num_terms is None) == (tol is None):
    raise ValueError("give exactly one of num_terms and tol")
  if num_terms is not None:
    if num_terms < 0:
      raise ValueError(f"num_terms must be >= 0, got {num_terms}")
    return _neumann_loop(matvec, b, alpha, num_terms, lambda k, r, rho: True)
  scale = 1.0 if min_eigenvalue is None else 1.0 / min_eigenvalue
  return _neumann_loop(matvec, b, alpha, max_terms,
                       lambda k, r, rho: r * scale > tol)


class GaussNewton(NamedTuple):
  """An inner loss split as ``output_loss(model_fn(params, hparams, *a), hparams, *a)``.

  Pass it as ``inner_loss`` to :func:`neumann_hypergrad` to use the
  Gauss-Newton curvature ``G = J^T (d^2 output_loss / d out^2) J``, which is
  positive semi-definite when ``output_loss`` is convex in the outputs (squared
  error, softmax cross-entropy, ...). Put regularisers in the outputs: e.g.
  ``model_fn = lambda w, h, x, y: (x @ w, w)`` and
  ``output_loss = lambda o, h, x, y: ce(o[0], y) + exp(h) / 2 * sum(o[1] ** 2)``.
  """
  model_fn: Callable[..., PyTree]
  output_loss: Callable[..., jax.Array]

  def __call__(self, params, hparams, *args):
    return self.output_loss(self.model_fn(params, hparams, *args), hparams, *args)


class HypergradCertificate(NamedTuple):
  """What :func:`neumann_hypergrad` can say about its own error.

  Attributes:
    num_terms: Neumann terms used (= curvature products).
    residual_norm: ``||v - A p_K||`` of the linear solve, exact.
    min_eigenvalue: the lower bound ``mu`` on ``lambda_min(A)`` used (0 when
      none is known).
    solve_error_bound: ``||p_K - A^{-1} v||`` bound, ``residual_norm / mu``.
    mixed_norm: spectral norm of ``d^2 L_tr / dphi dtheta``, computed exactly.
    error_bound: bound on ``||hypergrad - exact||`` (``mixed_norm *
      solve_error_bound``); when not ``rigorous`` it is an estimate from
      ``rho``, ``inf`` when ``rho >= 1``.
    rho: estimate of ``||I - alpha A||`` from the series itself.
    a_priori_bound: ``mixed_norm * alpha * r^K / (1 - r) * ||v||`` with ``r =
      rho * RHO_SAFETY``; ``inf`` when ``r >= 1``.
    rigorous: the bound rests on a proven ``mu > 0`` (Gauss-Newton with
      damping, or a user-given strong convexity).
    diverging: ``rho >= 1``: the series does not converge for this ``alpha``.
    certified: ``rigorous`` and the bound is finite (and ``<= tol`` if a
      ``tol`` was given).
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


def _mixed_columns(inner, params, hparams, inner_args):
  """Columns ``d/dphi_i grad_theta L_tr`` for each flat hyper-parameter ``i``."""
  flat, unravel = ravel_pytree(hparams)
  grad_theta = lambda f: jax.grad(inner)(params, unravel(f), *inner_args)
  basis = jnp.eye(flat.size, dtype=flat.dtype)
  cols = jax.vmap(lambda e: jax.jvp(grad_theta, (flat,), (e,))[1])(basis)
  return cols, unravel


def neumann_hypergrad(inner_loss: Callable[..., jax.Array] | GaussNewton,
                      outer_loss: Callable[..., jax.Array],
                      params: PyTree, hparams: PyTree, *,
                      inner_args: tuple = (), outer_args: tuple = (),
                      alpha: float, damping: float = 0.0,
                      num_terms: int | None = None, tol: float | None = None,
                      max_terms: int = 100, curvature: str = "auto",
                      strong_convexity: float | None = None
                      ) -> tuple[PyTree, HypergradCertificate]:
  """Implicit hyper-gradient ``dL_val/dphi`` with a certificate of its error.

  ``params`` should be (close to) a minimiser of ``inner_loss(., hparams)``.
  The curvature is ``A = C + damping * I`` with ``C`` the Hessian of the inner
  loss, or its Gauss-Newton matrix when ``inner_loss`` is a
  :class:`GaussNewton` (``curvature="auto"``; force either with
  ``"hessian"`` / ``"gauss_newton"``). All products are taken at the same
  point on the same (full or fixed) batch, so the bound is about one matrix.

  Cost: ``K`` curvature products (linearised once), one outer gradient, and
  one forward-mode pass per scalar hyper-parameter for the mixed term (whose
  exact norm then comes for free).

  Args:
    inner_loss: ``inner_loss(params, hparams, *inner_args) -> scalar``, or a
      :class:`GaussNewton` split of it.
    outer_loss: ``outer_loss(params, hparams, *outer_args) -> scalar``.
    params: inner solution (pytree).
    hparams: hyper-parameters (pytree, e.g. a dict of log-scale scalars).
    inner_args, outer_args: extra arguments (batches) of the two losses.
    alpha: Neumann step, ``0 < alpha < 2 / lambda_max(A)``.
    damping: ``delta >= 0`` added to the curvature.
    num_terms: fixed number of terms ``K``.
    tol: instead of ``num_terms``, the smallest ``K <= max_terms`` with
      ``error_bound <= tol`` (``lax.while_loop``). With an uncertifiable
      curvature the estimated bound is used and ``certified`` stays False.
    max_terms: cap on ``K`` with ``tol``.
    curvature: ``"auto"``, ``"hessian"`` or ``"gauss_newton"``.
    strong_convexity: a proven lower bound on ``lambda_min`` of the undamped
      curvature (e.g. the L2 coefficient of a convex loss); it makes the
      Hessian case rigorous.

  Returns:
    ``(hypergrad, certificate)``: ``hypergrad`` has the structure of
    ``hparams`` and includes the direct term ``d_phi L_val``.

  Example:
    >>> inner = lambda w, h, x, y: jnp.mean((x @ w - y) ** 2) / 2 \\
    ...     + jnp.exp(h) / 2 * jnp.sum(w ** 2)
    >>> outer = lambda w, h, x, y: jnp.mean((x @ w - y) ** 2) / 2
    >>> g, cert = jax.jit(lambda w, h: neumann_hypergrad(
    ...     inner, outer, w, h, inner_args=(x, y), outer_args=(xv, yv),
    ...     alpha=0.5, num_terms=50, strong_convexity=jnp.exp(h)))(w_star, h)
  """
  if curvature not in ("auto", "hessian", "gauss_newton"):
    raise ValueError(f"curvature must be 'auto', 'hessian' or 'gauss_newton', "
                     f"got {curvature!r}")
  if curvature == "auto":
    curvature = "gauss_newton" if isinstance(inner_loss, GaussNewton) else "hessian"
  if curvature == "gauss_newton" and not isinstance(inner_loss, GaussNewton):
    raise ValueError("curvature='gauss_newton' needs inner_loss to be a "
                     "GaussNewton(model_fn, output_loss)")
  if (num_terms is None) == (tol is None):
    raise ValueError("give exactly one of num_terms and tol")

  g_theta, g_phi = jax.grad(outer_loss, argnums=(0, 1))(params, hparams, *outer_args)

  if curvature == "gauss_newton":
    model = lambda p: inner_loss.model_fn(p, hparams, *inner_args)
    outputs, jvp_fn = jax.linearize(model, params)
    vjp_fn = jax.linear_transpose(jvp_fn, params)
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

  cols, unravel = _mixed_columns(inner_loss, params, hparams, inner_args)
  gram = sum(jnp.tensordot(c, c, axes=(tuple(range(1, c.ndim)),) * 2)
             for c in jax.tree.leaves(cols))
  mixed_norm = jnp.sqrt(jnp.maximum(jnp.max(jnp.linalg.eigvalsh(gram)), 0.0))
  mu = jnp.asarray(known_mu, dtype=mixed_norm.dtype)
  rigorous = jnp.asarray(has_mu) & (mu > 0)

  def bound(res_norm, rho):
    rigorous_bound = mixed_norm * res_norm / jnp.where(mu > 0, mu, 1.0)
    estimate = jnp.where(rho < 1, mixed_norm * alpha * res_norm
                         / jnp.where(rho < 1, 1.0 - rho, 1.0), jnp.inf)
    return jnp.where(rigorous, rigorous_bound, estimate)

  if num_terms is not None:
    p, info = _neumann_loop(matvec, g_theta, alpha, num_terms,
                            lambda k, r, rho: True)
  else:
    # The estimate needs a rho, which needs a few terms: never stop before.
    def keep_going(k, res_norm, rho):
      return (bound(res_norm, rho) > tol) | (~rigorous & (k < 3))
    p, info = _neumann_loop(matvec, g_theta, alpha, max_terms, keep_going)

  mixed = sum(jnp.tensordot(c, x, axes=(tuple(range(1, c.ndim)), tuple(range(x.ndim))))
              for c, x in zip(jax.tree.leaves(cols), jax.tree.leaves(p)))
  hypergrad = jax.tree.map(lambda d, m: d - m, g_phi, unravel(mixed))

  error_bound = bound(info.residual_norm, info.rho)
  r = info.rho * RHO_SAFETY
  b_norm = otu.tree_norm(g_theta)
  a_priori = jnp.where(r < 1, mixed_norm * alpha * r ** info.num_terms
                       / jnp.where(r < 1, 1.0 - r, 1.0) * b_norm, jnp.inf)
  certified = rigorous & jnp.isfinite(error_bound)
  if tol is not None:
    certified = certified & (error_bound <= tol)
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
      diverging=info.rho >= 1,
      certified=certified)
  return hypergrad, cert
