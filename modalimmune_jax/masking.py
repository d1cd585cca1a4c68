"""Missing modalities inside a jitted step: presence draws and the removal itself.

A batch is the dict of :mod:`modalimmune_jax.data` (``inputs``, ``masks``,
``presence`` ``(B, M)``); a modality is *removed* from a sample exactly as the
evaluation protocol removes it (:mod:`modalimmune_jax.protocol`): features
zeroed, frame mask cleared, presence bit off. These are the ``jax.numpy``
forms used by training methods (modality dropout, the controller's masked
passes, ModalImmune's validation patterns); the protocol's own generators run
on the host with numpy (:mod:`modalimmune_jax.protocol`) and follow the same
construction, so training-time missingness can use the test-time convention:

* :func:`random_presence`: independent per cell (the protocol's
  ``random_missing``);
* :func:`cell_eta_presence`: cell-eta (CPM-Net / GCNet; the protocol's
  ``cell_missing``);
* :func:`sample_eta_presence`: sample-eta (MAP / CMPT; the protocol's
  ``sample_missing``).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["remove_modalities", "random_presence", "cell_eta_presence", "sample_eta_presence",
           "max_cell_eta", "check_cell_eta", "missing_count", "keep_patterns", "PATTERNS"]

PATTERNS = ("any", "single")


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


def max_cell_eta(num_modalities: int) -> float:
  """The largest cell-eta with a modality kept per sample: ``(M - 1) / M``."""
  return (num_modalities - 1) / num_modalities


def check_cell_eta(eta: float, num_modalities: int) -> None:
  """Raises ``ValueError`` unless ``0 <= eta <= (M - 1) / M``."""
  top = max_cell_eta(num_modalities)
  if not 0.0 <= eta <= top + 1e-9:
    raise ValueError(f"cell eta must be in [0, (M-1)/M] = [0, {top:.4g}] for M = "
                     f"{num_modalities} modalities (at least one kept per sample), got {eta}")


def missing_count(num_samples: int, num_modalities: int, eta):
  """Missing cells of cell-eta: ``round(eta * N * M)``, at most ``N (M - 1)``
  (``eta`` a Python number, or a traced scalar under ``jit``)."""
  if isinstance(eta, (int, float)):
    return min(int(round(eta * num_samples * num_modalities)),
               num_samples * (num_modalities - 1))
  count = jnp.round(jnp.asarray(eta, jnp.float32) * (num_samples * num_modalities))
  return jnp.clip(count, 0, num_samples * (num_modalities - 1)).astype(jnp.int32)


def cell_eta_presence(key: jax.Array, num_samples: int, num_modalities: int, eta) -> jax.Array:
  """``(N, M)`` presence under cell-eta (CPM-Net / GCNet): exactly
  ``round(eta * N * M)`` of the ``N * M`` cells missing, at least one modality
  kept per sample, ``0 <= eta <= (M - 1) / M``.

  The construction of GCNet's ``random_mask`` (after CPM-Net's ``get_sn``): every
  sample keeps one modality chosen uniformly, and the other kept cells are a
  uniformly random set among the remaining ``N (M - 1)`` cells. GCNet draws that
  set cell by cell and redraws everything until the kept fraction is within
  0.005 of ``1 - eta``; here its size is exact, which is GCNet's distribution
  conditioned on the count (and needs no redraw loop, which at small ``N`` never
  meets the tolerance). :func:`modalimmune_jax.protocol.cell_missing` is the
  same algorithm in numpy.

  ``eta`` may be a traced scalar (then it is not range-checked, only clipped).

  Example:
    >>> keep = cell_eta_presence(jax.random.key(0), 64, 3, 0.5)   # 96 cells missing
  """
  if isinstance(eta, (int, float)):
    check_cell_eta(eta, num_modalities)
  n, m = num_samples, num_modalities
  k_one, k_rest = jax.random.split(key)
  guaranteed = jax.nn.one_hot(jax.random.randint(k_one, (n,), 0, m), m, dtype=bool)
  # the guaranteed cells rank first; the rest in uniformly random order
  scores = jnp.where(guaranteed, 2.0, jax.random.uniform(k_rest, (n, m)))
  rank = jnp.argsort(jnp.argsort(-scores.reshape(-1))).reshape(n, m)
  return rank < n * m - missing_count(n, m, eta)


def keep_patterns(num_modalities: int, patterns: str = "any") -> np.ndarray:
  """``(P, M)`` keep rows of the sample-eta missing patterns.

  ``"any"``: every non-empty proper subset kept (``2^M - 2`` patterns, largest
  first, the order of :func:`modalimmune_jax.protocol.removal_conditions`);
  ``"single"``: exactly one modality missing (``M`` patterns). For ``M = 2``
  both are MAP's "text or image missing".
  """
  m = num_modalities
  if patterns not in PATTERNS:
    raise ValueError(f"patterns must be one of {PATTERNS}, got {patterns!r}")
  if m < 2:
    raise ValueError(f"sample eta needs at least 2 modalities, got {m}")
  sizes = range(m - 1, 0, -1) if patterns == "any" else (m - 1,)
  rows = [[j in kept for j in range(m)] for size in sizes
          for kept in itertools.combinations(range(m), size)]
  return np.array(rows, bool)


def sample_eta_presence(key: jax.Array, num_samples: int, num_modalities: int, rate,
                        patterns: str = "any") -> jax.Array:
  """``(N, M)`` presence under sample-eta (MAP / CMPT): ``round(rate * N)``
  samples, chosen uniformly without replacement, miss one or more modalities;
  the others are complete.

  MAP (``vilt/datasets/base_dataset.py``, missing type "both") splits the
  affected samples equally between "text missing" and "image missing"; here the
  affected samples are split as equally as possible (counts differ by at most
  one, which patterns get the extra ones is random) between the patterns of
  :func:`keep_patterns`. ``rate`` may be a traced scalar.
  :func:`modalimmune_jax.protocol.sample_missing` is the same algorithm in numpy.

  Example:
    >>> keep = sample_eta_presence(jax.random.key(0), 64, 2, 0.7)  # 45 samples hit
  """
  if isinstance(rate, (int, float)) and not 0.0 <= rate <= 1.0:
    raise ValueError(f"sample eta must be in [0, 1], got {rate}")
  table = jnp.asarray(keep_patterns(num_modalities, patterns))
  n, p = num_samples, table.shape[0]
  k_samples, k_patterns = jax.random.split(key)
  hit = (jnp.round(jnp.asarray(rate, jnp.float32) * n) if not isinstance(rate, (int, float))
         else round(rate * n))
  rank = jnp.argsort(jax.random.permutation(k_samples, n))  # position of each sample
  order = jax.random.permutation(k_patterns, p)
  keep = table[order[rank % p]]
  return jnp.where((rank < hit)[:, None], keep, True)
