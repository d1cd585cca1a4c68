"""Small-matrix decompositions that stay safe under ``jax.vmap`` on CPU.

jaxlib's CPU LAPACK kernels (``eigh``, ``svd``; jaxlib 0.10.2) split a batch of
matrices over XLA's intra-op thread pool and block the calling thread until
the batch is done. XLA runs independent operations of one program on that same
pool, so when as many batched decompositions as the pool has threads start at
once, every worker waits for work that only a worker could do, and the
program deadlocks with the CPU idle (it ignores SIGTERM: the signal is only
handled between dispatches). A machine with two cores has a pool of two.

Our one-seed programs never met this: their decompositions are single
matrices, or one batch over modalities at a time. Vmapping seeds
(:func:`modalimmune_jax.train.train_seeds`) turned each per-modality
decomposition of ModalImmune's hyper-step into a batch over seeds, several of
them independent, and three vmapped seeds on UCI Multiple Features hung at
their first hyper-step (native stacks: both pool threads in
``ParallelBatchMap`` -> ``BlockingCounter::Wait``).

The functions here are ``jnp.linalg``'s, except that under ``vmap`` on CPU they
loop over the mapped axis (``lax.map``) instead of adding it to the LAPACK
batch, so vmapping adds no batched LAPACK call. Other platforms keep the
batched call (GPU solvers batch well and have no such pool). None of them has a
derivative: callers differentiate through a rule of their own (see
:func:`modalimmune_jax.spectral.energy_spectrum`) or not at all.

Example:
  >>> a = jnp.eye(3)[None].repeat(4, axis=0)
  >>> jax.vmap(eigvalsh)(a).shape          # four LAPACK calls on CPU, one elsewhere
  (4, 3)
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

__all__ = ["eigh", "eigvalsh", "svdvals"]


def _no_batched_lapack_under_vmap(decomposition: Callable) -> Callable:
  """``decomposition`` (a function of one array of matrices, batched over its
  leading axes), without gradient, looping over ``vmap``'s axis on CPU."""
  wrapped = jax.custom_batching.custom_vmap(decomposition)

  @wrapped.def_vmap
  def rule(axis_size, in_batched, a):  # called only when ``a`` is batched
    del axis_size, in_batched
    out = jax.lax.platform_dependent(a, cpu=lambda x: jax.lax.map(wrapped, x),
                                     default=decomposition)
    return out, jax.tree.map(lambda _: True, out)

  def call(a: jax.Array):
    return wrapped(jax.lax.stop_gradient(a))

  call.__name__ = decomposition.__name__
  call.__doc__ = decomposition.__doc__
  return call


@_no_batched_lapack_under_vmap
def eigh(a: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``jnp.linalg.eigh(a, symmetrize_input=False)``: ascending eigenvalues and
  eigenvectors (columns) of symmetric matrices; no gradient."""
  return jnp.linalg.eigh(a, symmetrize_input=False)


@_no_batched_lapack_under_vmap
def eigvalsh(a: jax.Array) -> jax.Array:
  """``jnp.linalg.eigvalsh(a)``: ascending eigenvalues of symmetric matrices;
  no gradient."""
  return jnp.linalg.eigvalsh(a)


@_no_batched_lapack_under_vmap
def svdvals(a: jax.Array) -> jax.Array:
  """``jnp.linalg.svd(a, compute_uv=False)``: descending singular values; no
  gradient."""
  return jnp.linalg.svd(a, compute_uv=False)
