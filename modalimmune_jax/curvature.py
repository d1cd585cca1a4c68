"""Hessian-vector products, Hutchinson diagonals and curvature-aware masking.

Part 4 of ``docs/method.md`` (ModalImmune, arXiv 2602.16197). This module is
the one place in the library that computes Hessian-vector products; the
hyper-gradient (:mod:`modalimmune_jax.hypergrad`) uses :func:`hvp` too.

* :func:`hvp`: forward-over-reverse product ``H v`` for any params pytree
  (Pearlmutter, 1994).
* :func:`hutchinson_diagonal`: ``diag(H) ~ E[v * Hv]`` with Rademacher ``v``
  (Hutchinson, 1989; Bekas et al., 2007).
* :func:`curvature_mask`: an ``optax.GradientTransformationExtraArgs`` that
  damps the (destructive part of the) update on high-curvature coordinates.
  Like ``optax.contrib.sophia`` it takes the objective as the extra keyword
  argument ``obj_fn``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "hvp",
    "hvp_operator",
    "rademacher_like",
    "hutchinson_diagonal",
    "CurvatureMaskState",
    "curvature_mask",
    "refresh_state",
    "refresh_masks",
]

PyTree = Any


def hvp(fn: Callable[..., jax.Array], params: PyTree, tangents: PyTree,
        *args: Any) -> PyTree:
  """Hessian-vector product ``(d^2 fn / d params^2) @ tangents``.

  Forward-over-reverse (``jax.jvp`` of ``jax.grad``): one product costs about
  as much as two or three gradients and never forms the Hessian.

  Args:
    fn: scalar function ``fn(params, *args)``.
    params: a pytree of arrays (the point where the Hessian is taken).
    tangents: a pytree with the structure of ``params``.
    *args: further arguments of ``fn``, held fixed.

  Returns:
    A pytree with the structure of ``params``.

  Example:
    >>> f = lambda w, x: jnp.sum(jnp.tanh(x @ w) ** 2)
    >>> w, x = jnp.ones(3), jnp.ones((5, 3))
    >>> hv = hvp(f, w, jnp.array([1.0, 0.0, 0.0]), x)  # first Hessian column
  """
  grad_fn = lambda p: jax.grad(fn)(p, *args)
  return jax.jvp(grad_fn, (params,), (tangents,))[1]


def hvp_operator(fn: Callable[..., jax.Array], params: PyTree,
                 *args: Any) -> Callable[[PyTree], PyTree]:
  """The linear map ``v -> H v`` at ``params``, linearised once.

  ``jax.linearize`` of the gradient runs the forward and backward pass once;
  each call of the returned function then costs only the linear part. Use it
  when many products are taken at the same point (iterative solvers).

  Example:
    >>> f = lambda w: jnp.sum(jnp.sin(w) ** 2)
    >>> hv = hvp_operator(f, jnp.ones(3))
    >>> col0, col1 = hv(jnp.eye(3)[0]), hv(jnp.eye(3)[1])
  """
  grad_fn = lambda p: jax.grad(fn)(p, *args)
  return jax.linearize(grad_fn, params)[1]


def rademacher_like(key: jax.Array, tree: PyTree) -> PyTree:
  """A pytree like ``tree`` of independent +-1 entries in each leaf's dtype.

  One draw for every leaf, cut into the leaves: a draw per leaf compiled one
  random-bit generator per leaf (a model's 82 leaves took 8 of the 11 s that
  XLA CPU spent compiling a Hutchinson estimate).
  """
  leaves, treedef = jax.tree.flatten(tree)
  sizes = [int(np.prod(jnp.shape(x))) for x in leaves]
  signs = jax.random.rademacher(key, (sum(sizes),), dtype=jnp.float32)
  cuts = np.cumsum(sizes)[:-1]
  out = [part.reshape(jnp.shape(x)).astype(jnp.result_type(x))
         for part, x in zip(jnp.split(signs, cuts), leaves)]
  return jax.tree.unflatten(treedef, out)


def hutchinson_diagonal(fn: Callable[..., jax.Array], params: PyTree,
                        key: jax.Array, num_samples: int = 1,
                        *args: Any) -> PyTree:
  """Hutchinson estimate of the Hessian diagonal, ``mean_s v_s * (H v_s)``.

  Unbiased; the variance of coordinate ``i`` is ``sum_{j != i} H_ij^2 /
  num_samples``. Samples are taken one after the other (``lax.scan``) so the
  memory does not grow with ``num_samples``.

  Args:
    fn: scalar function ``fn(params, *args)``.
    params: a pytree of arrays.
    key: a PRNG key.
    num_samples: number of Rademacher probes (static).
    *args: further arguments of ``fn``.

  Returns:
    A pytree with the structure of ``params``.

  Example:
    >>> f = lambda w: 0.5 * jnp.sum(jnp.arange(1.0, 4.0) * w ** 2)
    >>> hutchinson_diagonal(f, jnp.zeros(3), jax.random.key(0), 4)
    Array([1., 2., 3.], dtype=float32)
  """
  if num_samples < 1:
    raise ValueError(f"num_samples must be >= 1, got {num_samples}")

  def one(acc, k):
    v = rademacher_like(k, params)
    hv = hvp(fn, params, v, *args)
    return jax.tree.map(lambda a, x, y: a + x * y, acc, v, hv), None

  zeros = jax.tree.map(jnp.zeros_like, params)
  total, _ = jax.lax.scan(one, zeros, jax.random.split(key, num_samples))
  return jax.tree.map(lambda t: t / num_samples, total)


class CurvatureMaskState(NamedTuple):
  """State of :func:`curvature_mask`.

  Attributes:
    count: steps taken.
    key: PRNG key for the Rademacher probes.
    num_refreshes: how many curvature estimates the EMA holds.
    diag_ema: EMA of the Hutchinson diagonal (debiased when read).
    scale: the per-coordinate factor applied to the masked updates, recomputed
      at each refresh (1 where the update passes unchanged).
  """
  count: chex.Array
  key: chex.PRNGKey
  num_refreshes: chex.Array
  diag_ema: optax.Updates
  scale: optax.Updates


def _order_statistics(arrays: list, ranks: list) -> list:
  """The ``ranks[i]``-th smallest entry (0-based) of each non-negative
  ``arrays[i]``, exactly, by bisection on their float32 bit patterns (for
  non-negative floats their order is that of the values): 31 counting passes,
  no sort, every array's bisection in the one loop. On CPU it took half the
  time of ``lax.top_k`` over a model's leaves, which XLA may also turn into a
  full sort; one loop for all leaves, not one each, halves what the refresh
  compiles for its masks (issue 17)."""
  bits = [jax.lax.bitcast_convert_type(a.ravel().astype(jnp.float32), jnp.int32)
          for a in arrays]
  need = jnp.asarray([j + 1 for j in ranks], jnp.int32)

  def halve(_, bounds):
    lo, hi = bounds  # each answer's bit pattern lies in [lo[i], hi[i]]
    mid = lo + (hi - lo) // 2
    enough = jnp.stack([jnp.sum(b <= mid[i], dtype=jnp.int32)
                        for i, b in enumerate(bits)]) >= need
    return jnp.where(enough, lo, mid + 1), jnp.where(enough, mid, hi)

  top = jnp.full([len(arrays)], 0x7F800000, jnp.int32)  # +inf
  _, hi = jax.lax.fori_loop(0, 31, halve, (jnp.zeros_like(top), top))
  values = jax.lax.bitcast_convert_type(hi, jnp.float32)
  return [values[i].astype(a.dtype) for i, a in enumerate(arrays)]


def _scales(hs: list, mode: str, quantile: float, beta: float) -> list:
  """The mask of each leaf's curvature estimate in ``hs``."""
  if mode == "hard":
    # |h| <= quantile_q(|h|) (linear interpolation) holds exactly when
    # |h| <= s_j, the j-th smallest, j = floor(q (n - 1)): the interpolated
    # quantile lies in [s_j, s_{j+1}).
    a = [jnp.abs(h) for h in hs]
    cut = _order_statistics(a, [int(np.floor(quantile * (x.size - 1))) for x in a])
    return [(x <= c).astype(h.dtype) for x, c, h in zip(a, cut, hs)]
  return [(1.0 / (1.0 + beta * jnp.abs(h))).astype(h.dtype) for h in hs]


def _chosen(mask, params):
  """``mask`` (as in :func:`curvature_mask`) as a tree like ``params`` of
  Python bools; None: every leaf."""
  if mask is None:
    return jax.tree.map(lambda _: True, params)
  return mask(params) if callable(mask) else mask


def refresh_state(state: CurvatureMaskState, params, obj_fn: Callable, *, mode: str = "hard",
                  quantile: float = 0.9, beta: float = 1.0, num_samples: int = 1,
                  ema_decay: float = 0.9, mask=None) -> CurvatureMaskState:
  """One curvature refresh of a :func:`curvature_mask` state: a Hutchinson
  estimate of ``obj_fn``'s diagonal at ``params`` into the EMA, and the mask
  recomputed from it (the settings are the transformation's). With ``mask``
  only the chosen leaves are probed (the Hessian's diagonal block over them,
  the others held fixed) and refreshed; the others keep their state."""
  leaves, treedef = jax.tree.flatten(params)
  at = [i for i, c in enumerate(treedef.flatten_up_to(_chosen(mask, params))) if c]

  def sub_fn(sub):  # obj_fn of the chosen leaves, the others closed over
    full = list(leaves)
    for i, x in zip(at, sub):
      full[i] = x
    return obj_fn(jax.tree.unflatten(treedef, full))

  key, sub = jax.random.split(state.key)
  h = hutchinson_diagonal(sub_fn, [leaves[i] for i in at], sub, num_samples)
  n = state.num_refreshes + 1
  debias = 1.0 - ema_decay ** n.astype(jnp.float32)
  ema, scale = treedef.flatten_up_to(state.diag_ema), treedef.flatten_up_to(state.scale)
  for i, x in zip(at, h):
    ema[i] = ema_decay * ema[i] + (1.0 - ema_decay) * x
  fresh = _scales([ema[i] / debias.astype(ema[i].dtype) for i in at], mode, quantile, beta)
  for i, x in zip(at, fresh):
    scale[i] = x
  return state._replace(key=key, num_refreshes=n, diag_ema=jax.tree.unflatten(treedef, ema),
                        scale=jax.tree.unflatten(treedef, scale))


def refresh_masks(opt_state, params, obj_fn: Callable, **settings):
  """``opt_state`` (any optax state, a chain's say) with every
  :class:`CurvatureMaskState` in it refreshed (:func:`refresh_state` with
  ``settings``): the refresh of a ``curvature_mask(refresh_every=0)``, which
  the caller runs when it chooses, e.g. as its own compiled program.

  Example:
    >>> opt = optax.chain(curvature_mask(refresh_every=0), optax.adam(1e-3))
    >>> state = refresh_masks(state, params, loss)        # every 10 steps, say
    >>> updates, state = opt.update(grads, state, params, obj_fn=loss)
  """
  is_mask = lambda x: isinstance(x, CurvatureMaskState)
  return jax.tree.map(lambda x: refresh_state(x, params, obj_fn, **settings) if is_mask(x)
                      else x, opt_state, is_leaf=is_mask)


def curvature_mask(mode: str = "hard", quantile: float = 0.9,
                   beta: float = 1.0, refresh_every: int = 10,
                   num_samples: int = 1, ema_decay: float = 0.9,
                   seed: int = 0, mask=None) -> optax.GradientTransformationExtraArgs:
  """Curvature-aware gradient masking (ModalImmune, part 4).

  Keeps an EMA of the Hutchinson diagonal ``h`` of the objective, refreshed
  every ``refresh_every`` steps (the refresh is gated by ``lax.cond``, so the
  other steps cost one multiply per coordinate). With ``mode="hard"``,
  coordinates whose ``|h|`` is above the ``quantile`` of their leaf have their
  update zeroed; with ``mode="soft"`` it is scaled by ``1 / (1 + beta |h|)``.

  If the extra argument ``destructive`` (a pytree like ``updates``) is given,
  only that part of the update is masked and the rest passes unchanged:
  ``out = (updates - destructive) + scale * destructive``. Otherwise the whole
  update is masked.

  Args:
    mode: ``"hard"`` or ``"soft"``.
    quantile: per-leaf quantile of ``|h|`` above which ``"hard"`` masks.
    beta: strength of the ``"soft"`` scaling.
    refresh_every: steps between curvature estimates (step 0 refreshes); 0:
      never inside ``update`` (the caller refreshes the state with
      :func:`refresh_masks`, e.g. in a program of its own, so the update
      carries no ``lax.cond`` for it).
    num_samples: Rademacher probes per estimate.
    ema_decay: decay of the EMA of the diagonal.
    seed: seed of the probe PRNG key kept in the state.
    mask: which leaves are masked, as in ``optax.masked``: a tree like the
      params of bools, or a function of the params returning one; None: all.
      The others pass unchanged (their scale stays 1) and their curvature is
      never estimated, so a refresh costs a product over the chosen leaves
      only (the Hessian's diagonal block over them, which is what their mask
      reads). ModalImmune passes its encoders: the only leaves its
      destructive gradient reaches.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update`` needs
    ``params`` and the keyword ``obj_fn`` (a scalar function of ``params``).

  Example:
    >>> opt = optax.chain(curvature_mask(refresh_every=10), optax.adam(1e-3))
    >>> state = opt.init(params)
    >>> loss = lambda p: objective(p, batch)
    >>> grads = jax.grad(loss)(params)
    >>> updates, state = opt.update(grads, state, params, obj_fn=loss)
  """
  if mode not in ("hard", "soft"):
    raise ValueError(f"mode must be 'hard' or 'soft', got {mode!r}")
  if not 0.0 <= quantile <= 1.0:
    raise ValueError(f"quantile must be in [0, 1], got {quantile}")
  if refresh_every < 0:
    raise ValueError(f"refresh_every must be >= 0, got {refresh_every}")
  if not 0.0 <= ema_decay < 1.0:
    raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")

  def init_fn(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    return CurvatureMaskState(
        count=jnp.zeros([], jnp.int32),
        key=jax.random.key(seed),
        num_refreshes=jnp.zeros([], jnp.int32),
        diag_ema=zeros,
        scale=jax.tree.map(jnp.ones_like, params))

  settings = dict(mode=mode, quantile=quantile, beta=beta, num_samples=num_samples,
                  ema_decay=ema_decay, mask=mask)

  def update_fn(updates, state, params=None, *, obj_fn=None, destructive=None,
                **extra_args):
    del extra_args
    if params is None:
      raise ValueError("curvature_mask needs params in update()")
    if obj_fn is None and refresh_every:
      raise ValueError("curvature_mask needs the keyword argument obj_fn "
                       "(a scalar function of params) in update()")
    if refresh_every:
      state = jax.lax.cond(state.count % refresh_every == 0,
                           lambda s: refresh_state(s, params, obj_fn, **settings),
                           lambda s: s, state)
    # the leaves the mask does not choose pass unchanged, with no arithmetic
    chosen = _chosen(mask, params)
    if destructive is None:
      new = jax.tree.map(lambda c, u, s: u * s if c else u, chosen, updates, state.scale)
    else:
      new = jax.tree.map(lambda c, u, d, s: u - d + s * d if c else u,
                         chosen, updates, destructive, state.scale)
    state = state._replace(count=optax.safe_increment(state.count))
    return new, state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
