import numpy as np
import pytest
import scipy.stats
from sklearn import metrics as skm

from modalimmune_jax import metrics


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("average", ["weighted", "macro"])
def test_f1_matches_sklearn(seed, average):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 5, size=60)
  p = np.where(rng.random(60) < 0.6, y, rng.integers(0, 6, size=60))  # a label only predicted
  assert metrics.f1_score(y, p, average) == pytest.approx(
      skm.f1_score(y, p, average=average, zero_division=0), abs=1e-12)
  assert metrics.f1_score(y > 2, p > 2, "binary") == pytest.approx(
      skm.f1_score(y > 2, p > 2), abs=1e-12)


def _mmsa_reference(preds, labels):
  """MMSA's __eval_mosei_regression, transcribed with sklearn/scipy."""
  nz = labels != 0
  r7 = lambda x: np.round(np.clip(x, -3, 3))
  r5 = lambda x: np.round(np.clip(x, -2, 2))
  return {
      "Has0_acc_2": skm.accuracy_score(preds >= 0, labels >= 0),
      "Has0_F1_score": skm.f1_score(labels >= 0, preds >= 0, average="weighted"),
      "Non0_acc_2": skm.accuracy_score(preds[nz] > 0, labels[nz] > 0),
      "Non0_F1_score": skm.f1_score(labels[nz] > 0, preds[nz] > 0, average="weighted"),
      "Mult_acc_5": np.mean(r5(preds) == r5(labels)),
      "Mult_acc_7": np.mean(r7(preds) == r7(labels)),
      "MAE": np.mean(np.abs(preds - labels)),
      "Corr": scipy.stats.pearsonr(preds, labels)[0],
  }


@pytest.mark.parametrize("seed", range(4))
def test_sentiment_metrics_match_references(seed):
  rng = np.random.default_rng(seed)
  labels = np.round(rng.uniform(-3, 3, 200) * 3) / 3
  labels[:20] = 0.0
  preds = labels + rng.normal(0, 1.0, 200)
  preds[20:25] = 0.0
  ours = metrics.sentiment_metrics(preds, labels)
  for k, v in _mmsa_reference(preds, labels).items():
    assert ours[k] == pytest.approx(v, abs=1e-12), k
  # MulT: > 0 with zero negative, over all samples; f1 args (preds, truth)
  assert ours["MulT_acc_2"] == pytest.approx(skm.accuracy_score(labels > 0, preds > 0))
  assert ours["MulT_F1_score"] == pytest.approx(
      skm.f1_score(preds > 0, labels > 0, average="weighted"))


def test_sentiment_hand_computed_zeros_and_halves():
  labels = np.array([0.0, 0.0, 1.5, -0.5, 2.5, -3.0])
  preds = np.array([0.0, -0.2, 2.4, -0.4, 2.6, -2.5])
  m = metrics.sentiment_metrics(preds, labels)
  # Has0 (>= 0): truth T T T F T F, preds T F T F T F -> 5/6
  assert m["Has0_acc_2"] == pytest.approx(5 / 6)
  # Non0 drops the two zero labels: truth T F T F, preds T F T F -> 1
  assert m["Non0_acc_2"] == 1.0
  # MulT (> 0): truth F F T F T F, preds F F T F T F -> 1
  assert m["MulT_acc_2"] == 1.0
  # round half to even: labels -> 0 0 2 -0 2 -3; preds -> 0 -0 2 -0 3 -2 (acc7)
  assert m["Mult_acc_7"] == pytest.approx(4 / 6)
  # acc5 clips to [-2, 2] first: labels 0 0 2 -0 2 -2; preds 0 -0 2 -0 2 -2
  assert m["Mult_acc_5"] == 1.0
  assert m["MAE"] == pytest.approx(np.mean([0, .2, .9, .1, .1, .5]))


def test_iemocap_metrics():
  rng = np.random.default_rng(0)
  cls = rng.integers(0, 4, 100)
  labels = np.eye(4, dtype=int)[cls]
  logits = rng.normal(size=(100, 4, 2))
  logits[np.arange(100), cls, 1] += 1.5
  m = metrics.iemocap_metrics(logits, labels)
  binary = logits.argmax(-1)
  for j, name in enumerate(["neutral", "happy", "sad", "angry"]):
    assert m[f"{name}_acc"] == pytest.approx(skm.accuracy_score(labels[:, j], binary[:, j]))
    assert m[f"{name}_F1"] == pytest.approx(
        skm.f1_score(labels[:, j], binary[:, j], average="weighted"))
  pred4 = (logits[..., 1] - logits[..., 0]).argmax(1)
  assert m["acc_4class"] == pytest.approx(skm.accuracy_score(cls, pred4))
  assert m["F1_4class"] == pytest.approx(skm.f1_score(cls, pred4, average="weighted"))
  # single-logit outputs: binary = logit > 0
  m2 = metrics.iemocap_metrics(logits[..., 1] - logits[..., 0], labels)
  assert m2["acc_4class"] == m["acc_4class"]


def test_classification_and_dispatch():
  logits = np.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
  labels = np.array([0, 1, 1, 2])
  m = metrics.compute_metrics("classification", logits, labels)
  assert m["accuracy"] == 0.5
  assert m["macro_f1"] == pytest.approx(skm.f1_score(labels, logits.argmax(1), average="macro"))
  with pytest.raises(ValueError, match="unknown task"):
    metrics.compute_metrics("ranking", logits, labels)
  with pytest.raises(ValueError, match="predictions"):
    metrics.sentiment_metrics(np.zeros(3), np.zeros(4))
