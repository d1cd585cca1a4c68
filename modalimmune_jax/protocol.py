"""The missing-modality evaluation protocol.

A :class:`Condition` turns a clean split into a degraded one plus a presence
mask ``(N, M)`` that the model receives in ``batch["presence"]``; how the model
fills a missing modality is the model's business. Conditions:

* :func:`removal_conditions`: every non-empty proper subset of the modalities
  kept, named by what is kept (``"text+audio"``, ``"text only"``), plus
  ``"full"``. Removed modalities are zeroed, their frame masks cleared and
  their presence bit cleared.
* :func:`random_missing`: each (sample, modality) is missing with probability
  ``rate``; a sample that would lose every modality keeps one chosen uniformly
  at random.
* :func:`frame_missing`: each real frame of each (chosen) modality is zeroed
  with probability ``rate`` (TFR-Net, Yuan et al. 2021); lengths and padding
  are untouched and presence stays on.
* :func:`gaussian_noise`: additive Gaussian noise on the real frames at a
  signal-to-noise ratio in dB, with the signal power measured per modality on
  the evaluated split.

Every condition is deterministic given ``seed`` and its own name (the random
stream is ``np.random.default_rng([seed, crc32(name)])``), so adding a condition
never changes another's draw. :func:`evaluate` runs a prediction function under
each condition and returns a :class:`ProtocolResult` that renders as a markdown
table and as JSON.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import zlib
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from modalimmune_jax.data.core import MultimodalSplit
from modalimmune_jax.metrics import compute_metrics

__all__ = [
    "Condition",
    "full",
    "keep_only",
    "removal_conditions",
    "drop_one_conditions",
    "keep_one_conditions",
    "REMOVALS",
    "random_missing",
    "frame_missing",
    "gaussian_noise",
    "standard_conditions",
    "ProtocolResult",
    "evaluate",
]

Degraded = tuple[MultimodalSplit, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Condition:
  """A named way of degrading a split.

  ``fn(split, rng) -> (degraded split, presence (N, M) bool)``.
  """
  name: str
  kind: str
  params: dict
  fn: Callable[[MultimodalSplit, np.random.Generator], Degraded] = dataclasses.field(
      repr=False, compare=False)

  def apply(self, split: MultimodalSplit, seed: int = 0) -> Degraded:
    rng = np.random.default_rng([seed, zlib.crc32(self.name.encode())])
    return self.fn(split, rng)


def _remove(split: MultimodalSplit, presence: np.ndarray) -> MultimodalSplit:
  """Zeroes the features and clears the masks where ``presence`` is False."""
  mods, masks = {}, {}
  for j, m in enumerate(split.modality_names):
    keep = presence[:, j]
    mods[m] = np.where(keep[:, None, None], split.modalities[m], 0.0).astype(np.float32)
    masks[m] = split.masks[m] & keep[:, None]
  return dataclasses.replace(split, modalities=mods, masks=masks)


def full() -> Condition:
  """All modalities present (the clean split)."""
  return Condition("full", "full", {}, lambda s, rng: (
      s, np.ones((s.num_samples, len(s.modality_names)), bool)))


def _subset_name(kept: Sequence[str]) -> str:
  return f"{kept[0]} only" if len(kept) == 1 else "+".join(kept)


def keep_only(kept: Sequence[str]) -> Condition:
  """Only the modalities in ``kept`` are present (fixed removal of the rest)."""
  kept = tuple(kept)

  def fn(split, rng):
    unknown = set(kept) - set(split.modality_names)
    if unknown:
      raise ValueError(f"unknown modalities {sorted(unknown)}; split has "
                       f"{split.modality_names}")
    row = np.array([m in kept for m in split.modality_names])
    presence = np.broadcast_to(row, (split.num_samples, len(row))).copy()
    return _remove(split, presence), presence
  return Condition(_subset_name(kept), "removal", {"kept": list(kept)}, fn)


def removal_conditions(modality_names: Sequence[str]) -> list[Condition]:
  """Every non-empty proper subset kept, largest first, in modality order."""
  names = tuple(modality_names)
  out = []
  for size in range(len(names) - 1, 0, -1):
    for kept in itertools.combinations(names, size):
      out.append(keep_only(kept))
  return out


def drop_one_conditions(modality_names: Sequence[str]) -> list[Condition]:
  """Each modality removed alone (``M`` conditions, named by what is kept)."""
  names = tuple(modality_names)
  return [keep_only([m for m in names if m != drop]) for drop in names]


def keep_one_conditions(modality_names: Sequence[str]) -> list[Condition]:
  """Each modality alone (``"text only"``, ...)."""
  return [keep_only([m]) for m in modality_names]


REMOVALS = {
    "all": removal_conditions,
    "drop_one": drop_one_conditions,
    "keep_one": keep_one_conditions,
    "drop_one+keep_one": lambda names: drop_one_conditions(names) + keep_one_conditions(names),
    "none": lambda names: [],
}


def random_missing(rate: float) -> Condition:
  """Each (sample, modality) missing with probability ``rate``; one always kept."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"rate must be in [0, 1), got {rate}")

  def fn(split, rng):
    n, k = split.num_samples, len(split.modality_names)
    presence = rng.random((n, k)) >= rate
    empty = ~presence.any(1)
    presence[np.flatnonzero(empty), rng.integers(0, k, size=int(empty.sum()))] = True
    return _remove(split, presence), presence
  return Condition(f"missing rate {rate:g}", "random_missing", {"rate": rate}, fn)


def frame_missing(rate: float, modalities: Sequence[str] | None = None) -> Condition:
  """Each real frame zeroed with probability ``rate`` (TFR-Net style)."""
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"rate must be in [0, 1], got {rate}")
  which = None if modalities is None else tuple(modalities)

  def fn(split, rng):
    mods = dict(split.modalities)
    for m in split.modality_names:  # draw for every modality: stable streams
      drop = (rng.random(split.masks[m].shape) < rate) & split.masks[m]
      if which is None or m in which:
        mods[m] = np.where(drop[..., None], 0.0, mods[m]).astype(np.float32)
    presence = np.ones((split.num_samples, len(mods)), bool)
    return dataclasses.replace(split, modalities=mods), presence
  suffix = "" if which is None else f" ({'+'.join(which)})"
  return Condition(f"frame missing {rate:g}{suffix}", "frame_missing",
                   {"rate": rate, "modalities": which}, fn)


def gaussian_noise(snr_db: float, modalities: Sequence[str] | None = None) -> Condition:
  """Additive Gaussian noise at ``snr_db`` on the real frames."""
  which = None if modalities is None else tuple(modalities)

  def fn(split, rng):
    mods = dict(split.modalities)
    for m in split.modality_names:
      x, mask = split.modalities[m], split.masks[m]
      noise = rng.normal(size=x.shape)
      if which is not None and m not in which:
        continue
      frames = x[mask]
      power = float(np.mean(frames.astype(np.float64) ** 2)) if frames.size else 0.0
      sigma = np.sqrt(power / 10.0 ** (snr_db / 10.0))
      mods[m] = np.where(mask[..., None], x + sigma * noise, x).astype(np.float32)
    presence = np.ones((split.num_samples, len(mods)), bool)
    return dataclasses.replace(split, modalities=mods), presence
  suffix = "" if which is None else f" ({'+'.join(which)})"
  return Condition(f"noise {snr_db:g} dB{suffix}", "gaussian_noise",
                   {"snr_db": snr_db, "modalities": which}, fn)


def standard_conditions(modality_names: Sequence[str],
                        missing_rates: Iterable[float] = (0.3, 0.5, 0.7),
                        frame_rates: Iterable[float] = (),
                        snrs_db: Iterable[float] = (10.0, 0.0),
                        removals: str = "all") -> list[Condition]:
  """``full``, the fixed removals named by ``removals`` (a key of :data:`REMOVALS`,
  default every subset), random missing rates, frame rates, noise levels."""
  return ([full()] + REMOVALS[removals](modality_names)
          + [random_missing(r) for r in missing_rates]
          + [frame_missing(r) for r in frame_rates]
          + [gaussian_noise(s) for s in snrs_db])


@dataclasses.dataclass
class ProtocolResult:
  """Metrics per condition. Rows keep the order the conditions were run in."""
  rows: list[tuple[str, dict[str, float]]]
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)

  def metric_names(self) -> list[str]:
    names: list[str] = []
    for _, metrics in self.rows:
      names += [k for k in metrics if k not in names]
    return names

  def to_markdown(self, metrics: Sequence[str] | None = None, digits: int = 4,
                  percent: bool = False) -> str:
    """A markdown table: one row per condition, one column per metric."""
    metrics = list(metrics or self.metric_names())
    lines = ["| condition | " + " | ".join(metrics) + " |",
             "|---|" + "---:|" * len(metrics)]
    for name, values in self.rows:
      cells = []
      for k in metrics:
        v = values.get(k, float("nan"))
        scale = 100.0 if percent and k not in ("MAE", "Corr") else 1.0
        cells.append("n/a" if v is None or not np.isfinite(v) else f"{scale * v:.{digits}f}")
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

  def to_dict(self) -> dict[str, Any]:
    return {"rows": [{"condition": n, **{k: (None if not np.isfinite(v) else float(v))
                                          for k, v in m.items()}} for n, m in self.rows],
            "meta": self.meta}

  def to_json(self, **kwargs) -> str:
    return json.dumps(self.to_dict(), **kwargs)

  def get(self, condition: str) -> dict[str, float]:
    for name, values in self.rows:
      if name == condition:
        return values
    raise KeyError(f"no condition {condition!r}; have {[n for n, _ in self.rows]}")


def evaluate(predict_fn: Callable[[dict], Any], split: MultimodalSplit,
             conditions: Sequence[Condition], *, batch_size: int = 256, seed: int = 0,
             metrics_fn: Callable[[str, Any, Any], dict] = compute_metrics,
             progress: Callable[[Iterable], Iterable] | None = None) -> ProtocolResult:
  """Runs ``predict_fn`` under every condition and computes the task's metrics.

  Args:
    predict_fn: ``batch dict -> outputs`` (``(B, ...)`` array-like), with
      ``batch["presence"]`` set by the condition.
    split: the clean split (e.g. test).
    conditions: from :func:`standard_conditions` or built by hand.
    batch_size: evaluation batch size (the last batch may be smaller).
    seed: protocol seed (see the module docstring).
    metrics_fn: ``(task, outputs, labels) -> dict``.
    progress: optional wrapper of the condition iterable (e.g. ``tqdm``).

  Example:
    >>> result = evaluate(predict, ds.splits["test"],
    ...                   standard_conditions(ds.modality_names))
    >>> print(result.to_markdown(["accuracy", "macro_f1"]))
  """
  rows = []
  iterable = progress(conditions) if progress else conditions
  for cond in iterable:
    degraded, presence = cond.apply(split, seed)
    outputs = []
    for idx in degraded.batch_indices(batch_size):
      batch = degraded.batch(idx)
      batch["presence"] = presence[idx]
      outputs.append(np.asarray(predict_fn(batch)))
    rows.append((cond.name, metrics_fn(split.task, np.concatenate(outputs), split.labels)))
  return ProtocolResult(rows, meta={"seed": seed, "num_samples": split.num_samples,
                                    "conditions": [{"name": c.name, "kind": c.kind,
                                                    "params": c.params}
                                                   for c in conditions]})
