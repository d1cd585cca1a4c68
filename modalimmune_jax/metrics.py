"""Metrics exactly as the multimodal sentiment / emotion literature computes them.

numpy only (tested against scikit-learn and scipy).

Sentiment regression, two conventions:

* **MMSA** (``MMSA/utils/metricsTop.py``): ``Has0_acc_2`` / ``Has0_F1_score``
  binarise with ``>= 0`` (zero counts as positive); ``Non0_acc_2`` /
  ``Non0_F1_score`` drop samples whose label is 0 and binarise with ``> 0``;
  F1 is weighted; ``Mult_acc_5`` / ``Mult_acc_7`` clip predictions and labels
  to [-2, 2] / [-3, 3] and compare ``np.round`` (round half to even: 0.5 -> 0,
  1.5 -> 2, -2.5 -> -2); ``MAE``; ``Corr`` is Pearson's r.
* **MulT** (``MulT/src/eval_metrics.py``, ``exclude_zero=False``): ``MulT_acc_2``
  and ``MulT_F1_score`` binarise with ``> 0`` (zero counts as negative) over all
  samples. MulT calls ``f1_score(preds > 0, truth > 0, average="weighted")``,
  i.e. with the predictions in the ``y_true`` slot, which weights classes by the
  predicted support; we reproduce it so that numbers compare with papers that
  used that code.

IEMOCAP (MulT style): per emotion (Neutral, Happy, Sad, Angry) binary accuracy
and weighted F1, and 4-class accuracy / weighted F1 over samples with exactly one
positive emotion. Classification: accuracy and macro F1.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "accuracy",
    "f1_score",
    "mmsa_sentiment_metrics",
    "mult_sentiment_metrics",
    "sentiment_metrics",
    "iemocap_metrics",
    "classification_metrics",
    "compute_metrics",
    "HEADLINE",
    "FIELD",
]

IEMOCAP_NAMES = ("neutral", "happy", "sad", "angry")

# The metric a table sorts by / a plot shows first, per task.
HEADLINE = {"regression": "Has0_acc_2", "classification": "accuracy",
            "multilabel": "acc_4class"}

# The metrics a paper's table reports, per task, in the field's column order:
# MOSI / MOSEI as MMSA's tables (Acc-2 and F1 both ways, Acc-5, Acc-7, MAE, Corr);
# IEMOCAP as MulT's (accuracy and F1 per emotion).
FIELD = {
    "regression": ("Has0_acc_2", "Has0_F1_score", "Non0_acc_2", "Non0_F1_score",
                   "Mult_acc_5", "Mult_acc_7", "MAE", "Corr"),
    "multilabel": tuple(f"{e}_{m}" for e in IEMOCAP_NAMES for m in ("acc", "F1")),
    "classification": ("accuracy", "macro_f1"),
}


def accuracy(y_true, y_pred) -> float:
  y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
  return float(np.mean(y_true == y_pred)) if y_true.size else float("nan")


def f1_score(y_true, y_pred, average: str = "weighted") -> float:
  """F1 over the labels present in ``y_true`` or ``y_pred`` (as scikit-learn).

  ``average="weighted"`` weights each label's F1 by its support in
  ``y_true``; ``"macro"`` is the unweighted mean; ``"binary"`` is the F1 of
  label ``1`` / ``True``. A label never predicted and never true does not
  count; 0/0 precision or recall counts as 0 (scikit-learn's
  ``zero_division`` default).
  """
  y_true, y_pred = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
  if y_true.shape != y_pred.shape:
    raise ValueError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ")
  if average == "binary":
    labels = np.array([1])
  else:
    labels = np.union1d(y_true, y_pred)
  if labels.size == 0:
    return float("nan")
  tp = np.array([np.sum((y_pred == c) & (y_true == c)) for c in labels], float)
  pred_n = np.array([np.sum(y_pred == c) for c in labels], float)
  true_n = np.array([np.sum(y_true == c) for c in labels], float)
  precision = np.divide(tp, pred_n, out=np.zeros_like(tp), where=pred_n > 0)
  recall = np.divide(tp, true_n, out=np.zeros_like(tp), where=true_n > 0)
  denom = precision + recall
  f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
  if average in ("binary", "macro"):
    return float(np.mean(f1))
  if average == "weighted":
    return float(np.sum(f1 * true_n) / true_n.sum()) if true_n.sum() else 0.0
  raise ValueError(f"average must be 'weighted', 'macro' or 'binary', got {average!r}")


def _pearson(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  a, b = a - a.mean(), b - b.mean()
  denom = np.sqrt(np.sum(a * a) * np.sum(b * b))
  return float(np.sum(a * b) / denom) if denom > 0 else float("nan")


def _mult_acc(preds, truth, bound) -> float:
  return accuracy(np.round(np.clip(truth, -bound, bound)),
                  np.round(np.clip(preds, -bound, bound)))


def _flat(preds, labels):
  preds = np.asarray(preds, np.float64).reshape(-1)
  labels = np.asarray(labels, np.float64).reshape(-1)
  if preds.shape != labels.shape:
    raise ValueError(f"{preds.size} predictions for {labels.size} labels")
  return preds, labels


def mmsa_sentiment_metrics(preds, labels) -> dict[str, float]:
  """MMSA's regression metrics (see the module docstring)."""
  preds, labels = _flat(preds, labels)
  nz = labels != 0
  return {
      "Has0_acc_2": accuracy(labels >= 0, preds >= 0),
      "Has0_F1_score": f1_score(labels >= 0, preds >= 0),
      "Non0_acc_2": accuracy(labels[nz] > 0, preds[nz] > 0),
      "Non0_F1_score": f1_score(labels[nz] > 0, preds[nz] > 0),
      "Mult_acc_5": _mult_acc(preds, labels, 2.0),
      "Mult_acc_7": _mult_acc(preds, labels, 3.0),
      "MAE": float(np.mean(np.abs(preds - labels))),
      "Corr": _pearson(preds, labels),
  }


def mult_sentiment_metrics(preds, labels) -> dict[str, float]:
  """MulT's binary metrics (``> 0``, zero negative; F1 argument order as MulT)."""
  preds, labels = _flat(preds, labels)
  return {
      "MulT_acc_2": accuracy(labels > 0, preds > 0),
      "MulT_F1_score": f1_score(preds > 0, labels > 0),  # MulT's order, on purpose
  }


def sentiment_metrics(preds, labels) -> dict[str, float]:
  """Both conventions in one dict (MMSA keys, then ``MulT_*``)."""
  return {**mmsa_sentiment_metrics(preds, labels), **mult_sentiment_metrics(preds, labels)}


def _emotion_scores(outputs) -> tuple[np.ndarray, np.ndarray]:
  """(binary predictions, positive scores) from (N, C, 2) or (N, C) outputs."""
  outputs = np.asarray(outputs, np.float64)
  if outputs.ndim == 3 and outputs.shape[-1] == 2:
    return outputs.argmax(-1), outputs[..., 1] - outputs[..., 0]
  if outputs.ndim == 2:
    return (outputs > 0).astype(np.int64), outputs
  raise ValueError(f"expected (N, C, 2) or (N, C) emotion outputs, got {outputs.shape}")


def iemocap_metrics(outputs, labels, names=None) -> dict[str, float]:
  """IEMOCAP: per-emotion binary accuracy / weighted F1 and 4-class scores.

  Args:
    outputs: ``(N, 4, 2)`` logits (MulT's head; binary = argmax) or ``(N, 4)``
      logits of "yes" (binary = ``> 0``).
    labels: ``(N, 4)`` 0/1.
    names: label names (default: IEMOCAP's four when there are 4 labels).
  """
  binary, scores = _emotion_scores(outputs)
  labels = np.asarray(labels).astype(np.int64)
  if names is None:
    names = (IEMOCAP_NAMES if labels.shape[-1] == 4
             else tuple(f"label{j}" for j in range(labels.shape[-1])))
  if labels.shape != binary.shape or labels.shape[1] != len(names):
    raise ValueError(f"labels {labels.shape} do not match outputs {binary.shape}")
  out = {}
  for j, name in enumerate(names):
    out[f"{name}_acc"] = accuracy(labels[:, j], binary[:, j])
    out[f"{name}_F1"] = f1_score(labels[:, j], binary[:, j])
  single = labels.sum(1) == 1
  true_class = labels[single].argmax(1)
  pred_class = scores[single].argmax(1)
  out["acc_4class"] = accuracy(true_class, pred_class)
  out["F1_4class"] = f1_score(true_class, pred_class)
  out["n_4class"] = float(single.sum())
  return out


def classification_metrics(outputs, labels) -> dict[str, float]:
  """Accuracy and macro F1 from ``(N, C)`` logits or ``(N,)`` class predictions."""
  outputs = np.asarray(outputs)
  preds = outputs.argmax(-1) if outputs.ndim == 2 else outputs
  labels = np.asarray(labels).reshape(-1)
  return {"accuracy": accuracy(labels, preds), "macro_f1": f1_score(labels, preds, "macro")}


def compute_metrics(task: str, outputs, labels) -> dict[str, float]:
  """The metrics of ``task`` (``"regression"``, ``"classification"``, ``"multilabel"``)."""
  if task == "regression":
    return sentiment_metrics(outputs, labels)
  if task == "classification":
    return classification_metrics(outputs, labels)
  if task == "multilabel":
    return iemocap_metrics(outputs, labels)
  raise ValueError(f"unknown task {task!r}")
