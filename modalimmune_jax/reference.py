"""A linear reference model to report beside the neural results.

The reference is what a reviewer would compute first: per modality the mean of
the real frames (the frame mask), the modalities concatenated in modality
order, the features standardised on the train split, then a linear model:

* classification: a multinomial ``LogisticRegression`` (lbfgs);
* regression: ``Ridge`` with ``alpha = 1 / C``;
* multi-label: one ``LogisticRegression`` per label; the outputs are
  ``(N, C, 2)`` logits ``[0, z]`` (``argmax`` = "yes" where ``z > 0``), the layout
  :func:`modalimmune_jax.metrics.iemocap_metrics` reads.

The inverse regularisation ``C`` is chosen on the valid split by the task's
headline metric (:data:`modalimmune_jax.metrics.HEADLINE`; higher is better,
except ``MAE``); the test split is never looked at. :meth:`LinearReference.predict`
takes the batch dicts of :mod:`modalimmune_jax.protocol` and emits outputs in
the model's layout, so the reference runs through the same missing-modality
protocol: a removed modality arrives zeroed with its frame mask cleared, its
feature block is then zero *before* standardisation, i.e. the reference sees
what the protocol hands it and imputes nothing.

scikit-learn (the ``test`` extra, not a core dependency) is imported when a
reference is fitted, not when this module is imported.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from modalimmune_jax import protocol
from modalimmune_jax.data.core import MultimodalDataset, MultimodalSplit
from modalimmune_jax.metrics import HEADLINE, compute_metrics

__all__ = [
    "LOWER_IS_BETTER",
    "features",
    "LinearReference",
    "fit_linear_reference",
]

# Metrics for which a smaller value is better (every other one: larger).
LOWER_IS_BETTER = frozenset({"MAE"})

_MAX_ITER = 2000


def features(split_or_batch: MultimodalSplit | Mapping[str, Any],
             modality_names: Sequence[str] | None = None) -> np.ndarray:
  """Per-modality masked frame means, concatenated: ``(N, sum_m d_m)`` float64.

  Args:
    split_or_batch: a :class:`MultimodalSplit` or a batch dict with
      ``"inputs"`` ``{m: (B, L_m, d_m)}`` and ``"masks"`` ``{m: (B, L_m)}``
      (``"presence"`` is not read: the protocol has already zeroed a missing
      modality and cleared its mask).
    modality_names: the order of the blocks (default: the split's or the
      batch's own order). A sample without a real frame in a modality gets
      zeros for that block.

  Example:
    >>> ds = make_synthetic((64, 16, 16), seed=0)
    >>> features(ds.splits["train"]).shape
    (64, 64)
    >>> batch = ds.splits["test"].batch(np.arange(4))
    >>> features(batch).shape
    (4, 64)
  """
  if isinstance(split_or_batch, MultimodalSplit):
    inputs, masks = split_or_batch.modalities, split_or_batch.masks
  elif isinstance(split_or_batch, MultimodalDataset):
    raise TypeError("features() takes one split or a batch dict, not a data set; "
                    "pass e.g. dataset.splits['train']")
  else:
    inputs, masks = split_or_batch["inputs"], split_or_batch["masks"]
  names = tuple(inputs) if modality_names is None else tuple(modality_names)
  missing = [m for m in names if m not in inputs or m not in masks]
  if missing:
    raise KeyError(f"modalities {missing} not in the inputs/masks "
                   f"(have {sorted(inputs)})")
  blocks = []
  for m in names:
    x = np.asarray(inputs[m], np.float64)
    mask = np.asarray(masks[m], bool)
    if x.ndim != 3 or mask.shape != x.shape[:2]:
      raise ValueError(f"modality {m!r}: expected inputs (N, L, d) and mask (N, L), "
                       f"got {x.shape} and {mask.shape}")
    count = mask.sum(1, keepdims=True)
    total = np.einsum("nld,nl->nd", x, mask.astype(np.float64))
    blocks.append(total / np.maximum(count, 1))
  return np.concatenate(blocks, axis=1)


def _sklearn():
  """``(LogisticRegression, Ridge, StandardScaler)``, or a clear ImportError."""
  try:
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.preprocessing import StandardScaler
  except ImportError as e:
    raise ImportError("the linear reference needs scikit-learn>=1.5 "
                      "(pip install 'scikit-learn>=1.5')") from e
  return LogisticRegression, Ridge, StandardScaler


def _fit_one(task: str, x: np.ndarray, labels: np.ndarray, c: float, seed: int) -> Any:
  """One fitted estimator (multi-label: a list with one entry per label)."""
  LogisticRegression, Ridge, _ = _sklearn()
  if task == "classification":
    return LogisticRegression(C=c, solver="lbfgs", max_iter=_MAX_ITER,
                              random_state=seed).fit(x, labels)
  if task == "regression":
    return Ridge(alpha=1.0 / c, random_state=seed).fit(x, labels)
  if task == "multilabel":
    out = []
    for j in range(labels.shape[1]):
      y = np.asarray(labels[:, j]).astype(np.int64)
      positives = int(y.sum())
      if positives in (0, len(y)):  # constant on train: Jeffreys-smoothed prior
        out.append(float(np.log((positives + 0.5) / (len(y) - positives + 0.5))))
      else:
        out.append(LogisticRegression(C=c, solver="lbfgs", max_iter=_MAX_ITER,
                                      random_state=seed).fit(x, y))
    return out
  raise ValueError(f"unknown task {task!r}")


def _outputs(task: str, estimator: Any, x: np.ndarray, num_outputs: int) -> np.ndarray:
  """Outputs in the model's layout from standardised features ``x``."""
  if task == "regression":
    return np.asarray(estimator.predict(x), np.float64).reshape(-1)
  if task == "classification":
    z = np.asarray(estimator.decision_function(x), np.float64)
    if z.ndim == 1:  # binary: sklearn's single logit is log p(classes_[1]) / p(classes_[0])
      z = np.stack([np.zeros_like(z), z], axis=1)
    logits = np.full((x.shape[0], num_outputs), -np.inf)
    logits[:, np.asarray(estimator.classes_, np.int64)] = z  # a class absent on train: -inf
    return logits
  if task == "multilabel":
    z = np.stack([np.full(x.shape[0], e) if isinstance(e, float)
                  else np.asarray(e.decision_function(x), np.float64)
                  for e in estimator], axis=1)
    return np.stack([np.zeros_like(z), z], axis=-1)
  raise ValueError(f"unknown task {task!r}")


def _better(metric: str, a: float, b: float) -> bool:
  """Whether score ``a`` beats ``b`` (NaN never beats anything; ties do not)."""
  if not np.isfinite(a):
    return False
  if not np.isfinite(b):
    return True
  return a < b if metric in LOWER_IS_BETTER else a > b


@dataclasses.dataclass(frozen=True)
class LinearReference:
  """A fitted linear reference (see the module docstring).

  Attributes:
    task: the data set's task.
    modality_names: feature blocks, in order.
    num_outputs: classes, labels, or 1 for regression.
    scaler: the ``StandardScaler`` fitted on the train features.
    estimator: ``LogisticRegression`` / ``Ridge``; multi-label: a list with a
      ``LogisticRegression`` per label (a label constant on train: its
      smoothed prior log-odds, a float).
    C: the chosen inverse regularisation.
    metric: the selection metric.
    valid_score: ``metric`` on the valid split at ``C``.
    scores: ``C -> metric`` on the valid split, for every candidate.
  """
  task: str
  modality_names: tuple[str, ...]
  num_outputs: int
  scaler: Any  # sklearn.preprocessing.StandardScaler
  estimator: Any
  C: float
  metric: str
  valid_score: float
  scores: dict[float, float]

  def transform(self, split_or_batch: MultimodalSplit | Mapping[str, Any]) -> np.ndarray:
    """The standardised features the estimator sees."""
    return self.scaler.transform(features(split_or_batch, self.modality_names))

  def predict(self, batch: MultimodalSplit | Mapping[str, Any]) -> np.ndarray:
    """Outputs in the model's layout: classification logits ``(B, C)`` (float64),
    regression ``(B,)``, multi-label ``(B, C, 2)``.

    Example:
      >>> ref = fit_linear_reference(ds)
      >>> ref.predict(ds.splits["test"].batch(np.arange(8))).shape
      (8, 4)
    """
    return _outputs(self.task, self.estimator, self.transform(batch), self.num_outputs)

  def evaluate(self, split: MultimodalSplit, conditions: Sequence[protocol.Condition],
               *, seed: int = 0, batch_size: int = 256) -> protocol.ProtocolResult:
    """:func:`modalimmune_jax.protocol.evaluate` with :meth:`predict`.

    Example:
      >>> result = ref.evaluate(ds.splits["test"],
      ...                       protocol.standard_conditions(ds.modality_names))
      >>> result.get("full")["accuracy"]
    """
    result = protocol.evaluate(self.predict, split, conditions,
                               batch_size=batch_size, seed=seed)
    result.meta["model"] = {"name": "linear reference", "C": self.C,
                            "selected_by": f"valid {self.metric}",
                            "valid_score": self.valid_score}
    return result


def fit_linear_reference(dataset: MultimodalDataset, *,
                         Cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0), seed: int = 0,
                         metric: str | None = None) -> LinearReference:
  """Fits the linear reference on train and picks ``C`` on valid.

  Only the ``train`` and ``valid`` splits are read. Every candidate is fitted on
  train; the one with the best valid ``metric`` wins (ties and NaN scores go to
  the earlier candidate in ``Cs``).

  Args:
    dataset: a :class:`MultimodalDataset` (raw or standardised).
    Cs: candidate inverse regularisation strengths (regression: ``alpha = 1/C``).
    seed: ``random_state`` of the estimators (lbfgs and Ridge's default solver
      are deterministic anyway).
    metric: the selection metric (default ``HEADLINE[task]``; lower is better
      for those in :data:`LOWER_IS_BETTER`).

  Example:
    >>> ds = make_synthetic((400, 100, 200), seed=0)
    >>> ref = fit_linear_reference(ds)
    >>> ref.evaluate(ds.splits["test"], [protocol.full()]).get("full")["accuracy"]
  """
  Cs = tuple(float(c) for c in Cs)
  if not Cs or not all(np.isfinite(c) and c > 0 for c in Cs):
    raise ValueError(f"Cs must be non-empty positive numbers, got {Cs!r}")
  task, names = dataset.task, dataset.modality_names
  metric = metric or HEADLINE[task]
  train, valid = dataset.splits["train"], dataset.splits["valid"]
  scaler = _sklearn()[2]().fit(features(train, names))
  x_train = scaler.transform(features(train, names))
  x_valid = scaler.transform(features(valid, names))

  scores: dict[float, float] = {}
  best = None
  for c in Cs:
    estimator = _fit_one(task, x_train, train.labels, c, seed)
    values = compute_metrics(task, _outputs(task, estimator, x_valid, dataset.num_outputs),
                             valid.labels)
    if metric not in values:
      raise ValueError(f"metric {metric!r} is not a {task} metric; have {sorted(values)}")
    scores[c] = float(values[metric])
    if best is None or _better(metric, scores[c], scores[best[0]]):
      best = (c, estimator)
  c, estimator = best
  return LinearReference(task=task, modality_names=names, num_outputs=dataset.num_outputs,
                         scaler=scaler, estimator=estimator, C=c, metric=metric,
                         valid_score=scores[c], scores=scores)
