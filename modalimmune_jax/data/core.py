"""The in-memory multimodal data type and deterministic batching.

A :class:`MultimodalSplit` holds named modalities as arrays of shape
``(N, L_m, d_m)`` (a vector modality has ``L_m = 1``), a boolean frame mask per
modality (``True`` = a real frame), labels, the task kind and sample ids. A
:class:`MultimodalDataset` holds the ``train`` / ``valid`` / ``test`` splits
and what the loader noticed (for instance how many non-finite values it
replaced).

Batches are plain dicts of numpy arrays, ready for ``jax.device_put``::

    {"inputs": {m: (B, L_m, d_m) float32}, "masks": {m: (B, L_m) bool},
     "presence": (B, M) bool, "labels": ..., "index": (B,) int64}

``presence[:, j]`` says whether modality ``modality_names[j]`` is present; the
missing-modality protocol (:mod:`modalimmune_jax.protocol`) clears it. A split
may lack some modalities altogether (:attr:`MultimodalSplit.absent`, made by
:meth:`MultimodalSplit.without`): their features are zero, their frame masks
clear and their presence bit is off in every batch and under every protocol
condition (a run's ``train.present``: :meth:`MultimodalDataset.training_view`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Mapping

import numpy as np

__all__ = [
    "TASKS",
    "DataError",
    "MultimodalSplit",
    "MultimodalDataset",
    "standardize",
]

TASKS = ("regression", "classification", "multilabel")
SPLITS = ("train", "valid", "test")


class DataError(ValueError):
  """A data file or array that is not what it should be (names what and where)."""


@dataclasses.dataclass(frozen=True)
class MultimodalSplit:
  """One split of a multimodal data set.

  Attributes:
    modalities: name -> float32 array ``(N, L_m, d_m)``, in modality order.
    masks: name -> bool array ``(N, L_m)``, ``True`` for real frames.
    labels: regression ``(N,)`` float32; classification ``(N,)`` int32;
      multi-label ``(N, C)`` int32 of 0/1.
    task: one of :data:`TASKS`.
    ids: ``(N,)`` array of str sample ids.
    name: for messages (e.g. ``"mosi/train"``).
    absent: modalities missing from every sample (zero features, clear masks,
      presence bit off in every batch); made by :meth:`without`.

  Example:
    >>> split = MultimodalSplit(
    ...     modalities={"a": np.zeros((4, 1, 3), np.float32)},
    ...     masks={"a": np.ones((4, 1), bool)},
    ...     labels=np.array([0, 1, 0, 1]), task="classification",
    ...     ids=np.array(["s0", "s1", "s2", "s3"]))
    >>> batch = next(split.batches(2, seed=0))
  """
  modalities: Mapping[str, np.ndarray]
  masks: Mapping[str, np.ndarray]
  labels: np.ndarray
  task: str
  ids: np.ndarray
  name: str = ""
  absent: tuple[str, ...] = ()

  def __post_init__(self):
    where = f"split {self.name!r}: " if self.name else ""
    if self.task not in TASKS:
      raise DataError(f"{where}task must be one of {TASKS}, got {self.task!r}")
    if not self.modalities:
      raise DataError(f"{where}no modalities")
    n = len(self.labels)
    if set(self.masks) != set(self.modalities):
      raise DataError(f"{where}masks {sorted(self.masks)} do not match "
                      f"modalities {sorted(self.modalities)}")
    for m, x in self.modalities.items():
      if x.ndim != 3 or x.shape[0] != n:
        raise DataError(f"{where}modality {m!r}: expected shape ({n}, L, d), "
                        f"got {x.shape}")
      if self.masks[m].shape != x.shape[:2] or self.masks[m].dtype != bool:
        raise DataError(f"{where}mask of {m!r}: expected bool {x.shape[:2]}, got "
                        f"{self.masks[m].dtype} {self.masks[m].shape}")
      if not np.all(np.isfinite(x)):
        raise DataError(f"{where}modality {m!r} has non-finite values")
    if self.task == "multilabel" and self.labels.ndim != 2:
      raise DataError(f"{where}multilabel labels must be (N, C), got {self.labels.shape}")
    if self.task != "multilabel" and self.labels.ndim != 1:
      raise DataError(f"{where}{self.task} labels must be (N,), got {self.labels.shape}")
    if self.ids.shape != (n,):
      raise DataError(f"{where}ids must be ({n},), got {self.ids.shape}")
    absent = tuple(self.absent)
    if len(set(absent)) != len(absent) or not set(absent) <= set(self.modalities):
      raise DataError(f"{where}absent {absent} must name modalities of {self.modality_names} "
                      "once each")
    for m in absent:
      if np.any(self.masks[m]) or np.any(self.modalities[m]):
        raise DataError(f"{where}absent modality {m!r} has frames or non-zero features "
                        "(make it with without())")

  @property
  def num_samples(self) -> int:
    return len(self.labels)

  @property
  def modality_names(self) -> tuple[str, ...]:
    return tuple(self.modalities)

  @property
  def present_row(self) -> np.ndarray:
    """``(M,)`` bool in modality order: False for the :attr:`absent` modalities."""
    return np.array([m not in self.absent for m in self.modality_names], bool)

  def without(self, names) -> "MultimodalSplit":
    """This split with the modalities ``names`` missing from every sample, removed
    exactly as the protocol removes a modality
    (:func:`modalimmune_jax.masking.remove_modalities`: features zeroed, frame
    masks cleared) and marked :attr:`absent` (presence bit off in every batch).

    Example:
      >>> split.without(["vision"]).batch(np.arange(4))["presence"][:, 2]   # all False
    """
    from modalimmune_jax.masking import remove_modalities  # jax, only when used
    names = tuple(dict.fromkeys(tuple(self.absent) + tuple(names)))
    unknown = [m for m in names if m not in self.modalities]
    if unknown:
      raise DataError(f"split {self.name!r}: no modalities {unknown}; it has "
                      f"{self.modality_names}")
    order = self.modality_names
    keep = np.array([m not in names for m in order], bool)
    whole = {"inputs": dict(self.modalities), "masks": dict(self.masks),
             "presence": np.ones((self.num_samples, len(order)), bool)}
    removed = remove_modalities(whole, keep, order)
    return dataclasses.replace(
        self, modalities={m: np.asarray(removed["inputs"][m]) for m in order},
        masks={m: np.asarray(removed["masks"][m]) for m in order},
        absent=tuple(m for m in order if m in names))

  def shapes(self) -> dict[str, tuple[int, int]]:
    """Modality -> ``(L_m, d_m)``."""
    return {m: tuple(x.shape[1:]) for m, x in self.modalities.items()}

  def take(self, index: np.ndarray) -> "MultimodalSplit":
    """The samples at ``index``, as a new split."""
    index = np.asarray(index)
    return dataclasses.replace(
        self,
        modalities={m: x[index] for m, x in self.modalities.items()},
        masks={m: k[index] for m, k in self.masks.items()},
        labels=self.labels[index], ids=self.ids[index])

  def batch(self, index: np.ndarray) -> dict[str, Any]:
    """The batch dict of the samples at ``index`` (every modality present but the
    :attr:`absent` ones)."""
    index = np.asarray(index)
    return {
        "inputs": {m: x[index] for m, x in self.modalities.items()},
        "masks": {m: k[index] for m, k in self.masks.items()},
        "presence": np.broadcast_to(self.present_row,
                                    (len(index), len(self.modalities))).copy(),
        "labels": self.labels[index],
        "index": index.astype(np.int64),
    }

  def batch_indices(self, batch_size: int, *, seed: int | None = None,
                    epoch: int = 0, drop_remainder: bool = False) -> list[np.ndarray]:
    """Index arrays of one epoch's batches.

    With ``seed`` the order is a permutation drawn from
    ``np.random.default_rng([seed, epoch])``: the same on every machine and
    every run, and resumable at any batch (the data position is ``(epoch,
    batch)``). Without ``seed`` the order is the stored one.
    """
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = self.num_samples
    order = (np.arange(n) if seed is None
             else np.random.default_rng([seed, epoch]).permutation(n))
    stop = n - n % batch_size if drop_remainder else n
    return [order[i:i + batch_size] for i in range(0, stop, batch_size)]

  def batches(self, batch_size: int, *, seed: int | None = None, epoch: int = 0,
              drop_remainder: bool = False, start: int = 0) -> Iterator[dict[str, Any]]:
    """Yields the batches of one epoch from batch number ``start`` on."""
    for idx in self.batch_indices(batch_size, seed=seed, epoch=epoch,
                                  drop_remainder=drop_remainder)[start:]:
      yield self.batch(idx)


@dataclasses.dataclass(frozen=True)
class MultimodalDataset:
  """Train / valid / test splits of one data set and what the loader noticed.

  Attributes:
    name: data set name.
    splits: ``"train"``, ``"valid"``, ``"test"`` -> :class:`MultimodalSplit`.
    num_outputs: regression 1, classification number of classes, multi-label
      number of labels.
    label_names: class or label names (may be empty).
    meta: loader facts: ``source``, ``nonfinite`` counts per split and key, ...
  """
  name: str
  splits: Mapping[str, MultimodalSplit]
  num_outputs: int
  label_names: tuple[str, ...] = ()
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    missing = [s for s in SPLITS if s not in self.splits]
    if missing:
      raise DataError(f"data set {self.name!r}: missing splits {missing}")
    ref = self.splits["train"]
    for s, split in self.splits.items():
      if split.modality_names != ref.modality_names:
        raise DataError(f"data set {self.name!r}: split {s!r} has modalities "
                        f"{split.modality_names}, train has {ref.modality_names}")
      widths = {m: x.shape[2] for m, x in split.modalities.items()}
      ref_widths = {m: x.shape[2] for m, x in ref.modalities.items()}
      if widths != ref_widths:
        raise DataError(f"data set {self.name!r}: split {s!r} feature widths "
                        f"{widths} differ from train's {ref_widths}")
      if split.task != ref.task:
        raise DataError(f"data set {self.name!r}: split {s!r} task {split.task}")

  @property
  def task(self) -> str:
    return self.splits["train"].task

  @property
  def modality_names(self) -> tuple[str, ...]:
    return self.splits["train"].modality_names

  def training_view(self, present) -> "MultimodalDataset":
    """The data set as a run with ``train.present = present`` sees it: the
    **train** and **valid** splits without the other modalities
    (:meth:`MultimodalSplit.without`: absent from every sample, every batch and
    every protocol condition on them), the **test** split unchanged. ``present``
    empty: this data set. The same object when the view is already this one.

    Example:
      >>> ds.training_view(("text", "audio")).splits["train"].absent   # ('vision',)
    """
    present = tuple(present)
    if not present:
      return self
    unknown = [m for m in present if m not in self.modality_names]
    if unknown or len(set(present)) != len(present):
      raise DataError(f"data set {self.name!r}: present {present} must name modalities of "
                      f"{self.modality_names} once each")
    absent = tuple(m for m in self.modality_names if m not in present)
    if all(tuple(self.splits[s].absent) == absent for s in ("train", "valid")):
      return self
    splits = dict(self.splits)
    for s in ("train", "valid"):
      splits[s] = splits[s].without(absent)
    return dataclasses.replace(self, splits=splits,
                               meta={**self.meta, "train_present": list(present)})

  def describe(self) -> str:
    """A markdown description: modalities, shapes, classes, split sizes."""
    lines = [f"# {self.name}", "",
             f"task: {self.task}, outputs: {self.num_outputs}"
             + (f" ({', '.join(self.label_names)})" if self.label_names else ""),
             "", "| modality | frames L | width d |", "|---|---|---|"]
    for m, (length, width) in self.splits["train"].shapes().items():
      lines.append(f"| {m} | {length} | {width} |")
    lines += ["", "| split | samples |" + (" class counts |" if self.task != "regression" else ""),
              "|---|---|" + ("---|" if self.task != "regression" else "")]
    for s in SPLITS:
      split = self.splits[s]
      row = f"| {s} | {split.num_samples} |"
      if split.task == "classification":
        row += " " + " ".join(str(c) for c in np.bincount(split.labels,
                                                          minlength=self.num_outputs)) + " |"
      elif split.task == "multilabel":
        row += " " + " ".join(str(int(c)) for c in split.labels.sum(0)) + " (positives) |"
      lines.append(row)
    if self.meta:
      lines.append("")
    for key, value in self.meta.items():
      lines.append(f"- {key}: {value}")
    return "\n".join(lines)


def standardize(dataset: MultimodalDataset, eps: float = 1e-6) -> MultimodalDataset:
  """Per-modality, per-feature standardisation fitted on the train split only.

  Statistics use the real frames (mask) of the train split; padded frames stay
  zero. Constant features get scale 1.
  """
  stats = {}
  train = dataset.splits["train"]
  for m, x in train.modalities.items():
    frames = x[train.masks[m]]
    mean = frames.mean(0)
    std = frames.std(0)
    stats[m] = (mean, np.where(std > eps, std, 1.0))

  def apply(split):
    mods = {m: np.where(split.masks[m][..., None],
                        (x - stats[m][0]) / stats[m][1], 0.0).astype(np.float32)
            for m, x in split.modalities.items()}
    return dataclasses.replace(split, modalities=mods)

  return dataclasses.replace(
      dataset, splits={s: apply(sp) for s, sp in dataset.splits.items()},
      meta={**dataset.meta, "standardized": "per feature, fitted on train"})
