"""Finiteness of a pytree, as one reduction per dtype.

The training loop checks every gradient and every changed optimiser and method
state for ``inf``/``nan`` (a step with a non-finite value is not applied).
Checked leaf by leaf (``jnp.all(jnp.isfinite(x))`` for each), that is a
reduction per leaf, and XLA on CPU compiles each into kernels of its own (up
to three: ``is-finite``, a windowed reduction and the final one): 439 of the
1319 fused kernels of plain's train step on UCI Multiple Features (82 leaves),
1038 of the 1982 of ModalImmune's curvature refresh (its whole optimiser
state). Concatenated first, the leaves of a dtype are one reduction, and
compile time drops with the kernel count (``experiments/README.md``, issue 17).

Example:
  >>> bool(all_finite({"w": jnp.ones(3), "b": jnp.array([0.0, jnp.inf])}))
  False
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["all_finite", "has_floats"]


def has_floats(tree) -> bool:
  """Whether ``tree`` has a floating-point (or complex) leaf."""
  return any(jnp.issubdtype(jnp.result_type(x), jnp.inexact) for x in jax.tree.leaves(tree))


def all_finite(tree) -> jax.Array:
  """True when every floating-point leaf of ``tree`` is finite (integer leaves
  are): one ``isfinite`` reduction over the concatenated leaves of each dtype
  (no cast, so no value can overflow on the way)."""
  by_dtype: dict = {}
  for x in jax.tree.leaves(tree):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.inexact):
      by_dtype.setdefault(x.dtype, []).append(x.ravel())
  flags = [jnp.all(jnp.isfinite(jnp.concatenate(xs))) for xs in by_dtype.values()]
  return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)
