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

A *specialist* (:class:`Specialists`) is the same reference refitted on each
subset of modalities (``C`` chosen on valid for each subset, same grid): under a
missing-modality condition every sample is routed to the specialist of exactly
the modalities it has (``batch["presence"]``), which is the headroom of a method
that has to cope with one model for every pattern. Only conditions that remove
whole modalities have a specialist (:data:`SPECIALIST_KINDS`); frame-rate and
noise conditions degrade a modality that is still present, so no subset model
applies to them.

scikit-learn (the ``test`` extra, not a core dependency) is imported when a
reference is fitted, not when this module is imported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
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
    "SPECIALIST_KINDS",
    "Specialists",
]

# Metrics for which a smaller value is better (every other one: larger).
LOWER_IS_BETTER = frozenset({"MAE"})

_MAX_ITER = 2000

# Condition kinds under which a sample's available modalities are a subset of
# whole modalities (what a specialist is fitted on); frame-rate and noise
# conditions degrade modalities that stay present.
SPECIALIST_KINDS = ("full",) + tuple(k for k in protocol.MISSING_KINDS if k != "frame_missing")


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


def _one_thread():
  """A context in which BLAS runs on one thread (threadpoolctl, a scikit-learn
  dependency; a no-op without it). The fits here are small: on a busy 2-core
  machine a multi-threaded BLAS made them 20-80x slower (mfeat, issue 22)."""
  try:
    from threadpoolctl import threadpool_limits
  except ImportError:
    return contextlib.nullcontext()
  return threadpool_limits(limits=1, user_api="blas")


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
    with _one_thread():
      result = protocol.evaluate(self.predict, split, conditions,
                                 batch_size=batch_size, seed=seed)
    result.meta["model"] = {"name": "linear reference", "C": self.C,
                            "selected_by": f"valid {self.metric}",
                            "valid_score": self.valid_score}
    return result


def fit_linear_reference(dataset: MultimodalDataset, *,
                         Cs: Sequence[float] = (0.01, 0.1, 1.0, 10.0), seed: int = 0,
                         metric: str | None = None,
                         modalities: Sequence[str] | None = None) -> LinearReference:
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
    modalities: the modalities the model reads (default: all, in the data
      set's order); the others are ignored, on train, valid and whatever
      :meth:`LinearReference.predict` is handed (a specialist, :class:`Specialists`).

  Example:
    >>> ds = make_synthetic((400, 100, 200), seed=0)
    >>> ref = fit_linear_reference(ds)
    >>> ref.evaluate(ds.splits["test"], [protocol.full()]).get("full")["accuracy"]
  """
  Cs = tuple(float(c) for c in Cs)
  if not Cs or not all(np.isfinite(c) and c > 0 for c in Cs):
    raise ValueError(f"Cs must be non-empty positive numbers, got {Cs!r}")
  task, names = dataset.task, tuple(dataset.modality_names)
  if modalities is not None:
    wanted = tuple(modalities)
    unknown = [m for m in wanted if m not in names]
    if not wanted or unknown or len(set(wanted)) != len(wanted):
      raise ValueError(f"modalities must be distinct modalities of the data set {names}, "
                       f"got {wanted!r}")
    names = tuple(m for m in names if m in wanted)  # the data set's order
  metric = metric or HEADLINE[task]
  with _one_thread():
    return _fit(dataset, Cs, seed, metric, names)


def _fit(dataset: MultimodalDataset, Cs: tuple[float, ...], seed: int, metric: str,
         names: tuple[str, ...]) -> LinearReference:
  """:func:`fit_linear_reference` on the modalities ``names`` (checked)."""
  task = dataset.task
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


@dataclasses.dataclass
class Specialists:
  """Linear references refitted per subset of modalities; every sample goes to
  the one fitted on exactly the modalities it has (see the module docstring).

  A subset's specialist is :func:`fit_linear_reference` with ``modalities=``
  that subset (``C`` chosen on valid for each subset from ``Cs``), fitted the
  first time a sample needs it (:meth:`get`): at most ``2^M - 1`` of them,
  only those the evaluated conditions produce. The specialist of every
  modality is the linear reference itself: pass one already fitted (with the
  same ``Cs``, ``seed`` and ``metric``) as ``reference`` and it is not fitted again.

  Attributes:
    dataset: the data set (train and valid are read to fit).
    Cs: candidate inverse regularisation strengths, as in
      :func:`fit_linear_reference`.
    seed: ``random_state`` of the estimators.
    metric: the selection metric (default ``HEADLINE[task]``).
    fitted: kept modalities (in the data set's order) -> their specialist.
    reference: (init only) the linear reference on every modality, if fitted
      already: it becomes that subset's specialist.
    seconds: kept modalities -> the seconds their fit took (every ``C``).

  Example:
    >>> spec = Specialists(ds)
    >>> result = spec.evaluate(ds.splits["test"],
    ...                        protocol.standard_conditions(ds.modality_names))
    >>> spec.get(["text"]).C   # the "text only" specialist
  """
  dataset: MultimodalDataset
  Cs: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0)
  seed: int = 0
  metric: str | None = None
  fitted: dict[tuple[str, ...], LinearReference] = dataclasses.field(default_factory=dict)
  seconds: dict[tuple[str, ...], float] = dataclasses.field(default_factory=dict)
  reference: dataclasses.InitVar[LinearReference | None] = None

  def __post_init__(self, reference):
    if reference is not None:
      self.fitted[self.key(reference.modality_names)] = reference

  def key(self, kept: Sequence[str]) -> tuple[str, ...]:
    """``kept`` in the data set's modality order (checked)."""
    names = tuple(self.dataset.modality_names)
    kept = set(kept)
    if not kept or not kept <= set(names):
      raise ValueError(f"a specialist needs a non-empty subset of {names}, "
                       f"got {sorted(kept)}")
    return tuple(m for m in names if m in kept)

  def get(self, kept: Sequence[str]) -> LinearReference:
    """The specialist of the modalities ``kept`` (fitted now if not yet)."""
    key = self.key(kept)
    if key not in self.fitted:
      start = time.perf_counter()
      self.fitted[key] = fit_linear_reference(self.dataset, Cs=self.Cs, seed=self.seed,
                                              metric=self.metric, modalities=key)
      self.seconds[key] = time.perf_counter() - start
    return self.fitted[key]

  def predict(self, batch: Mapping[str, Any]) -> np.ndarray:
    """Outputs in the model's layout, each sample's from the specialist of its
    present modalities (``batch["presence"]``, ``(B, M)`` in the data set's
    modality order); the absent modalities are never read."""
    names = tuple(self.dataset.modality_names)
    presence = np.asarray(batch["presence"], bool)
    if presence.ndim != 2 or presence.shape[1] != len(names):
      raise ValueError(f"presence must be (B, {len(names)}) for the modalities {names}, "
                       f"got shape {presence.shape}")
    if not presence.any(1).all():
      raise ValueError("a sample without any modality has no specialist")
    patterns, inverse = np.unique(presence, axis=0, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    out = None
    for k, pattern in enumerate(patterns):
      rows = np.flatnonzero(inverse == k)
      kept = [m for m, p in zip(names, pattern) if p]
      sub = {"inputs": {m: np.asarray(batch["inputs"][m])[rows] for m in kept},
             "masks": {m: np.asarray(batch["masks"][m])[rows] for m in kept}}
      y = self.get(kept).predict(sub)
      if out is None:
        out = np.empty((len(presence),) + y.shape[1:], y.dtype)
      out[rows] = y
    return out

  def evaluate(self, split: MultimodalSplit, conditions: Sequence[protocol.Condition],
               *, seed: int = 0, batch_size: int = 256) -> protocol.ProtocolResult:
    """:func:`modalimmune_jax.protocol.evaluate` with :meth:`predict` under the
    conditions of :data:`SPECIALIST_KINDS`: the same mask draws (``seed``, each
    condition's name and ``draws``) as any model evaluated with that ``seed``.
    The other conditions are left out and named, with the reason, in
    ``meta["skipped"]``; ``meta["model"]["C"]`` holds each fitted subset's
    ``C`` (``"a+b"``), ``meta["model"]["seconds"]`` its fit time."""
    used = [c for c in conditions if c.kind in SPECIALIST_KINDS]
    with _one_thread():
      result = protocol.evaluate(self.predict, split, used, batch_size=batch_size, seed=seed)
    result.meta["skipped"] = {c.name: f"{c.kind}: every modality stays present (degraded), "
                                      "no subset's specialist applies"
                              for c in conditions if c.kind not in SPECIALIST_KINDS}
    result.meta["model"] = {"name": "specialists (linear, refit per subset)",
                            "selected_by": f"valid {next(iter(self.fitted.values())).metric}"
                            if self.fitted else "",
                            "C": {"+".join(k): r.C for k, r in self.fitted.items()},
                            "seconds": {"+".join(k): t for k, t in self.seconds.items()}}
    return result
