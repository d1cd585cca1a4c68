"""Spectral collapse measures and penalties for batches of embeddings.

Pure, jittable, vmappable functions of a batch of embeddings ``z`` of shape
``(B, k)``. They implement part 1 of ``docs/method.md`` (ModalImmune,
arXiv 2602.16197): the effective rank of Roy & Vetterli (2007), a collapse
severity in ``[0, 1]``, the spectrum-adaptive soft tail energy penalty, and the
collapsed view used by the destructive intervention.

All spectra come from the eigenvalues of the smaller Gram matrix (``k x k`` when
``k <= B``, else ``B x B``), the squared singular values of ``z``, computed by
SVD of that symmetric PSD matrix (faster than ``eigh`` on XLA's CPU backend).
Only eigenvalues are differentiated (``d lambda_i = v_i^T dA v_i``),
which is finite for repeated and zero eigenvalues; entropies use a guarded
``p log p``; an all-zero batch has zero energy and is treated as fully
collapsed. Nothing here returns NaN on a rank-1 or all-zero batch.

Numerically zero energy: centring a constant batch in floating point leaves a
residue (the rounding error of the mean, up to ``B u |mean|`` per entry for
``B`` rows and unit roundoff ``u``), so its centred energy is tiny but not 0.
A centred batch whose total energy is at most ``((B + 1) eps)^2 ||z||^2``
(``||z||^2`` the energy *before* centring, ``eps`` the machine epsilon of
``z``'s dtype, float32's for the sum of 16-bit inputs, ``B`` the global number
of rows) is indistinguishable from a constant batch: its energies are reported as exactly 0, so it counts as rank 0
(zero shares, effective rank 1, severity 1, penalty 0, zero gradients), the
same as an all-zero batch. The rule is relative (scale-free); only batches
whose rows agree to within about ``2 B`` ulps are affected. Shares
divide by the total energy itself: they sum to 1 whenever it is positive.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from modalimmune_jax import linalg

__all__ = [
    "energy_spectrum",
    "singular_spectrum",
    "energy_shares",
    "effective_rank",
    "max_rank",
    "collapse_severity",
    "collapse_penalty",
    "tail_weights",
    "tail_energy",
    "collapsed_view",
]

_TINY = 1e-12  # sqrt guard of singular_spectrum only


def _as_batch(z: jax.Array) -> jax.Array:
  """``z`` as a ``(B, k)`` batch in float32 at least: spectra are computed in
  float32 whatever the model computes in (bfloat16 has 8 bits of mantissa,
  and LAPACK no bfloat16 kernel)."""
  z = jnp.asarray(z)
  if z.ndim != 2:
    raise ValueError(f"expected embeddings of shape (B, k), got shape {z.shape}")
  return z.astype(jnp.promote_types(z.dtype, jnp.float32))


def _prepare(z: jax.Array, center: bool, axis_name: str | None = None) -> jax.Array:
  z = _as_batch(z)
  if center:
    mean = jnp.mean(z, axis=0, keepdims=True)
    if axis_name is not None:  # equal shards: the mean of means is the global mean
      mean = jax.lax.pmean(mean, axis_name)
    z = z - mean
  return z


def _gram(z: jax.Array, axis_name: str | None) -> jax.Array:
  """The smaller Gram matrix; ``k x k`` summed over devices with ``axis_name``."""
  b, k = z.shape
  if axis_name is not None:
    gram = jax.lax.psum(z.T @ z, axis_name)
  else:
    gram = z.T @ z if k <= b else z @ z.T
  return 0.5 * (gram + gram.T)


def _numerically_zero(total: jax.Array, z: jax.Array, center: bool,
                      axis_name: str | None) -> jax.Array:
  """Whether the centred energy ``total`` of ``z`` is only centring residue.

  ``jnp.mean`` sums in at least float32 (it upcasts 16-bit floats), so the
  computed mean of a column is off by at most ``(B u_acc + u) |m|`` (``B``
  rows, ``u = eps / 2``); the subtraction is then exact for a constant column
  (Sterbenz). A constant batch therefore has centred energy at most
  ``(B u_acc + u)^2 ||z||^2``; the threshold ``(B eps_acc + eps)^2 ||z||^2``
  is 4 times that. Uncentred spectra are zero only when exactly 0.
  """
  if not center:
    return total <= 0
  z = jax.lax.stop_gradient(_as_batch(z))
  raw = jnp.sum(jnp.square(z))
  rows = z.shape[0]
  if axis_name is not None:
    raw = jax.lax.psum(raw, axis_name)
    rows = rows * jax.lax.psum(1, axis_name)
  eps = float(jnp.finfo(z.dtype).eps)
  eps_acc = float(jnp.finfo(jnp.promote_types(z.dtype, jnp.float32)).eps)
  return total <= jnp.square(rows * eps_acc + eps) * raw


def _shares(lam: jax.Array) -> jax.Array:
  """``lam / sum(lam)``, all zero when the sum is exactly 0.

  Divides by the total itself (so the shares sum to 1 whenever it is
  positive), written as ``(lam / s) / (total / s)`` with ``s = sg(total)``:
  the same value (``total / s`` is exactly 1) but a derivative with no
  ``1 / total^2`` factor, which would overflow float32 for totals below ~1e-19.
  """
  total = jnp.sum(lam)
  positive = total > 0
  scale = jax.lax.stop_gradient(jnp.where(positive, total, 1.0))
  return (lam / scale) / jnp.where(positive, total / scale, 1.0)


@jax.custom_jvp
def _psd_eigvalsh(gram: jax.Array) -> jax.Array:
  """Eigenvalues of a symmetric PSD matrix, descending, by SVD.

  For a symmetric PSD matrix the singular values are the eigenvalues. Values
  alone come from XLA's CPU SVD, several times faster than its ``eigh`` here
  (measured on six 64 x 64 matrices: 1.8 ms against 6-9 ms). The derivative
  is the eigenvalue one, ``d lambda_i = v_i^T dG v_i`` with the vectors from
  ``eigh``: linear in ``dG`` (forward mode, linearisation and reverse mode all
  work) and finite for repeated and zero eigenvalues.
  """
  return linalg.svdvals(gram)


@_psd_eigvalsh.defjvp
def _psd_eigvalsh_jvp(primals, tangents):
  (gram,), (dgram,) = primals, tangents
  lam, vecs = _psd_eigh(gram)
  return lam, jnp.einsum("...ki,...kl,...li->...i", vecs, dgram, vecs)


def _psd_eigh(gram: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(eigenvalues descending, eigenvectors as columns)`` of a symmetric matrix,
  with no derivative (used under ``stop_gradient``)."""
  lam, vecs = linalg.eigh(gram)
  return lam[::-1], vecs[:, ::-1]


def max_rank(z_shape: tuple[int, ...], center: bool = True) -> int:
  """The largest rank a ``(B, k)`` batch can have: ``min(B - center, k)``."""
  b, k = z_shape
  return max(min(b - int(center), k), 0)


def energy_spectrum(z: jax.Array, center: bool = True,
                    axis_name: str | None = None) -> jax.Array:
  """Squared singular values of ``z`` (centred by default), in descending order.

  Returns ``min(B, k)`` non-negative values; differentiable, with finite
  gradients also for repeated and zero values. A centred batch whose energy
  is only the rounding residue of centring (a constant batch; see the module
  docstring) gets exact zeros, with zero gradient. Inside ``shard_map`` /
  ``pmap`` with ``axis_name`` (rows of the global batch split over devices,
  equal shards), it is the spectrum of the *global* batch (``k`` values, from
  the ``psum`` of the local ``k x k`` Gram matrices), the same on every device.

  Example:
    >>> z = jax.random.normal(jax.random.key(0), (32, 8))
    >>> lam = energy_spectrum(z)  # shape (8,)
  """
  lam = jnp.maximum(_psd_eigvalsh(_gram(_prepare(z, center, axis_name), axis_name)), 0.0)
  zero = _numerically_zero(jnp.sum(lam), z, center, axis_name)
  return jnp.where(zero, jnp.zeros_like(lam), lam)


def singular_spectrum(z: jax.Array, center: bool = True) -> jax.Array:
  """Singular values ``s_1 >= ... >= s_r`` of ``z`` (centred by default).

  The square root is guarded so that zero singular values have zero gradient
  instead of an infinite one. Computed from the Gram matrix, so in float32 a
  value near zero is accurate to about ``sqrt(eps) * s_1`` (~3e-4 s_1); the
  energies that the penalties use are accurate to ``eps * s_1^2``.

  Example:
    >>> s = singular_spectrum(jnp.eye(4, 3), center=False)  # [1., 1., 1.]
  """
  lam = energy_spectrum(z, center)
  positive = lam > _TINY
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, lam, 1.0)), 0.0)


def energy_shares(z: jax.Array, center: bool = True,
                  axis_name: str | None = None) -> jax.Array:
  """Energy shares ``p_i = s_i^2 / sum_j s_j^2``.

  They sum to 1 whenever the energy is positive, however small: the shares
  are scale-free. All zero for a batch of zero energy: an all-zero batch, or
  (centred) a constant one whose centred energy is only rounding residue (see
  the module docstring).
  """
  return _shares(energy_spectrum(z, center, axis_name))


def _entropy(p: jax.Array) -> jax.Array:
  positive = p > 0
  safe = jnp.where(positive, p, 1.0)
  return -jnp.sum(jnp.where(positive, p * jnp.log(safe), 0.0))


def effective_rank(z: jax.Array, center: bool = True) -> jax.Array:
  """Effective rank ``exp(-sum_i p_i log p_i)`` (Roy & Vetterli, 2007).

  Lies in ``[1, max_rank]``; a batch of zero energy (all-zero, or constant
  when centred) has effective rank 1.

  Example:
    >>> z = jax.random.normal(jax.random.key(0), (256, 4))
    >>> float(effective_rank(z))  # close to 4 for isotropic data
    3.9...
  """
  return jnp.exp(_entropy(energy_shares(z, center)))


def collapse_severity(z: jax.Array, center: bool = True) -> jax.Array:
  """Collapse severity ``1 - (erank - 1) / (r - 1)`` in ``[0, 1]``.

  ``r = max_rank(z.shape)``: 0 for an isotropic batch, 1 for a rank-1 (or
  zero, or constant) batch. Needs ``r >= 2`` (at least 3 samples and 2 features when
  centred), checked from the static shape.

  Example:
    >>> z = jnp.outer(jnp.arange(8.0), jnp.ones(3))  # rank 1
    >>> float(collapse_severity(z))
    1.0
  """
  r = max_rank(jnp.shape(z), center)
  if r < 2:
    raise ValueError(
        f"collapse_severity needs a batch of rank >= 2 possible; shape "
        f"{jnp.shape(z)} allows rank {r}")
  s = 1.0 - (effective_rank(z, center) - 1.0) / (r - 1.0)
  return jnp.clip(s, 0.0, 1.0)


def tail_weights(p: jax.Array, kappa: float | jax.Array,
                 eta: float | jax.Array) -> jax.Array:
  """Soft tail weights ``w_i = sigmoid((c_i - kappa) / eta)``.

  ``c_i = sum_{j<i} p_j`` is the energy held by the directions before ``i``,
  so directions after the ``kappa`` energy quantile get weights near 1.
  """
  c = jnp.cumsum(p) - p
  return jax.nn.sigmoid((c - kappa) / eta)


def tail_energy(p: jax.Array, kappa: float | jax.Array,
                eta: float | jax.Array) -> jax.Array:
  """``sum_i w_i p_i`` with the tail weights seeing ``p`` through ``stop_gradient``.

  The penalty of :func:`collapse_penalty` as a function of the energy shares
  ``p``: linear in ``p`` as far as its derivatives in ``p`` go (the weights
  are held), differentiable in ``kappa`` and ``eta``. The hyper-gradient uses
  this form: a loss linear in an output has a zero (so PSD) Gauss-Newton block.
  """
  return jnp.sum(tail_weights(jax.lax.stop_gradient(p), kappa, eta) * p)


def collapse_penalty(z: jax.Array, kappa: float | jax.Array = 0.9,
                     eta: float | jax.Array = 0.05,
                     center: bool = True, axis_name: str | None = None) -> jax.Array:
  """Spectrum-adaptive soft tail energy ``R(z) = sum_i sg(w_i) p_i``.

  Minimising it moves energy out of the directions beyond the ``kappa`` energy
  quantile of the current spectrum, i.e. it collapses ``z`` towards its head
  directions. The tail weights see the spectrum through ``stop_gradient``
  (``w_i = sigmoid((sg(c_i) - kappa) / eta)``): the gradient in ``z`` does not
  move the tail boundary, while ``kappa`` and ``eta`` stay differentiable, so
  the hyper-gradient of part 5 can tune them.

  Args:
    z: embeddings, shape ``(B, k)``.
    kappa: energy quantile in ``(0, 1)`` beyond which directions are the tail.
    eta: softness (temperature) of the tail boundary, ``> 0``.
    center: centre ``z`` over the batch first.
    axis_name: inside ``shard_map``, the mesh axis the batch is split over:
      the penalty of the global batch (see :func:`energy_spectrum`).

  Returns:
    A scalar in ``[0, 1]``.

  Example:
    >>> z = jax.random.normal(jax.random.key(0), (64, 16))
    >>> loss = lambda z: collapse_penalty(z, kappa=0.8, eta=0.05)
    >>> g = jax.grad(loss)(z)  # finite, pushes z towards low rank
  """
  return tail_energy(energy_shares(z, center, axis_name), kappa, eta)


def collapsed_view(z: jax.Array, kappa: float | jax.Array = 0.9,
                   center: bool = True, axis_name: str | None = None) -> jax.Array:
  """Projection of ``z`` onto the top directions holding ``kappa`` of its energy.

  Keeps direction ``i`` while the energy before it, ``c_i``, is below
  ``kappa`` (so at least the first direction is always kept), projects the
  (centred) rows onto them and adds the batch mean back. The projector is
  held constant in the gradient, so gradients flow to ``z`` linearly and never
  through eigenvectors. Used by the destructive intervention of ModalImmune.
  With ``axis_name`` the directions and mean are the global batch's. A batch
  of zero energy (see :func:`energy_shares`) keeps every direction: its view
  is ``z`` itself.

  Example:
    >>> z = jax.random.normal(jax.random.key(0), (32, 8))
    >>> zc = collapsed_view(z, kappa=0.5)
    >>> int(jnp.linalg.matrix_rank(zc - zc.mean(0)))  # a few directions only
    3
  """
  z = jnp.asarray(z)
  zc = _prepare(z, center, axis_name)
  mean = z - zc
  gram = zc.T @ zc
  if axis_name is not None:
    gram = jax.lax.psum(gram, axis_name)
  lam, vecs = _psd_eigh(0.5 * (gram + gram.T))
  lam = jnp.maximum(lam, 0.0)
  zero = _numerically_zero(jnp.sum(lam), z, center, axis_name)
  p = _shares(jnp.where(zero, jnp.zeros_like(lam), lam))
  c = jnp.cumsum(p) - p
  keep = (c < kappa).astype(z.dtype)
  proj = jax.lax.stop_gradient((vecs * keep) @ vecs.T)
  return (zc @ proj + mean).astype(z.dtype)
