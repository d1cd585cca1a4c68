"""Missing modalities inside a jitted step: presence draws and the removal itself.

A batch is the dict of :mod:`modalimmune_jax.data` (``inputs``, ``masks``,
``presence`` ``(B, M)``); a modality is *removed* from a sample exactly as the
evaluation protocol removes it (:mod:`modalimmune_jax.protocol`): features
zeroed, frame mask cleared, presence bit off. These are the ``jax.numpy``
forms used by training methods (modality dropout, the controller's masked
passes, ModalImmune's validation patterns); the protocol's own generators run
on the host with numpy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["remove_modalities", "random_presence"]


def remove_modalities(batch: dict, keep: jax.Array, names: tuple[str, ...]) -> dict:
  """The batch with modality ``names[j]`` removed where ``keep[..., j]`` is False.

  Args:
    batch: a batch dict (``inputs``, ``masks``, ``presence`` and labels).
    keep: ``(B, M)`` or ``(M,)`` (the same for every sample) booleans.
    names: the modality order of ``presence``.

  Example:
    >>> text_only = remove_modalities(batch, jnp.array([True, False, False]),
    ...                               ("text", "audio", "vision"))
  """
  keep = jnp.broadcast_to(jnp.asarray(keep, bool), batch["presence"].shape)
  inputs, masks = dict(batch["inputs"]), dict(batch["masks"])
  for j, m in enumerate(names):
    inputs[m] = jnp.where(keep[:, j, None, None], inputs[m], 0.0).astype(inputs[m].dtype)
    masks[m] = masks[m] & keep[:, j, None]
  return dict(batch, inputs=inputs, masks=masks,
              presence=batch["presence"].astype(bool) & keep)


def random_presence(key: jax.Array, num_samples: int, rates: jax.Array) -> jax.Array:
  """``(N, M)`` presence: modality ``j`` missing with probability ``rates[j]``.

  A sample that would lose every modality keeps one, chosen uniformly (the
  rule of :func:`modalimmune_jax.protocol.random_missing`).

  Example:
    >>> keep = random_presence(jax.random.key(0), 64, jnp.full(3, 0.3))
  """
  rates = jnp.asarray(rates, jnp.float32)
  k_drop, k_keep = jax.random.split(key)
  keep = jax.random.uniform(k_drop, (num_samples, rates.shape[0])) >= rates
  rescue = jax.nn.one_hot(jax.random.randint(k_keep, (num_samples,), 0, rates.shape[0]),
                          rates.shape[0], dtype=bool)
  return jnp.where(keep.any(1, keepdims=True), keep, rescue)
