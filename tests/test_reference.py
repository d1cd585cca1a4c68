import dataclasses
import itertools
import warnings

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning

from modalimmune_jax import protocol, reference
from modalimmune_jax.data import MultimodalDataset, make_synthetic

SIZES = (400, 100, 200)


@pytest.fixture(scope="module")
def cls_ds():
  return make_synthetic(SIZES, seed=0)


@pytest.fixture(scope="module")
def cls_ref(cls_ds):
  with warnings.catch_warnings():
    warnings.simplefilter("error", ConvergenceWarning)
    return reference.fit_linear_reference(cls_ds)


def _with_splits(ds, **splits):
  return dataclasses.replace(ds, splits={**ds.splits, **splits})


def test_features_masked_mean_and_batch_equals_split():
  ds = make_synthetic((8, 4, 40), shapes={"a": (6, 3), "b": (1, 2), "c": (5, 4)},
                      variable_length=True, seed=1)
  split = ds.splits["test"]
  assert not split.masks["a"].all()  # some padding, or the check below is vacuous
  feats = reference.features(split)
  assert feats.shape == (40, 3 + 2 + 4)
  # by hand, row by row, over the real frames only
  for i in range(40):
    expected = np.concatenate([split.modalities[m][i][split.masks[m][i]].mean(0)
                               for m in ("a", "b", "c")])
    np.testing.assert_allclose(feats[i], expected, rtol=1e-6, atol=1e-6)
  idx = np.array([5, 0, 17, 39, 3])
  np.testing.assert_allclose(reference.features(split.batch(idx)), feats[idx],
                             rtol=1e-12, atol=1e-12)
  # explicit order; a modality without real frames gives a zero block
  reordered = reference.features(split, modality_names=("c", "a", "b"))
  np.testing.assert_array_equal(reordered, np.concatenate([feats[:, 5:], feats[:, :5]], 1))
  degraded, _ = protocol.keep_only(["a", "c"]).apply(split)
  dropped = reference.features(degraded.batch(idx))
  np.testing.assert_array_equal(dropped[:, 3:5], 0.0)
  np.testing.assert_allclose(dropped[:, :3], feats[idx, :3], rtol=1e-12)


def test_classification_beats_chance_and_protocol_matches_sklearn(cls_ds, cls_ref):
  test = cls_ds.splits["test"]
  result = cls_ref.evaluate(test, [protocol.full(), protocol.keep_only(["audio"])],
                            seed=0)
  acc = result.get("full")["accuracy"]
  chance = np.bincount(test.labels).max() / test.num_samples
  assert acc > chance + 0.3, (acc, chance)
  # independent path: sklearn's own accuracy on the standardised test features
  x = cls_ref.scaler.transform(reference.features(test))
  assert acc == pytest.approx(cls_ref.estimator.score(x, test.labels), abs=1e-12)
  # same through odd-sized batches, and predict's layout is the model's
  odd = protocol.evaluate(cls_ref.predict, test, [protocol.full()], batch_size=37)
  assert odd.get("full")["accuracy"] == acc
  assert cls_ref.predict(test.batch(np.arange(5))).shape == (5, cls_ds.num_outputs)
  # removing the dominant modality must hurt (the features do reach the model)
  assert result.get("audio only")["accuracy"] < acc
  assert result.meta["model"]["C"] == cls_ref.C


def test_C_is_selected_on_valid_never_on_test(cls_ds, cls_ref, monkeypatch):
  assert set(cls_ref.scores) == {0.01, 0.1, 1.0, 10.0}
  assert len(set(cls_ref.scores.values())) > 1  # otherwise selection is vacuous
  assert cls_ref.C == max(cls_ref.scores, key=cls_ref.scores.get)
  valid = cls_ds.splits["valid"]
  outputs = cls_ref.predict(valid.batch(np.arange(valid.num_samples)))
  assert cls_ref.valid_score == float(np.mean(outputs.argmax(1) == valid.labels))

  # the valid split drives the choice: with valid := train the least
  # regularised C wins (it fits train best), unlike on the real valid split
  tr = cls_ds.splits["train"]
  on_train = reference.fit_linear_reference(_with_splits(cls_ds, valid=tr))
  assert on_train.C == 10.0 and on_train.C != cls_ref.C

  # the test split is never read: garbage test data changes nothing ...
  test = cls_ds.splits["test"]
  rng = np.random.default_rng(0)
  garbage = dataclasses.replace(
      test, labels=rng.permutation(test.labels),
      modalities={m: rng.normal(size=x.shape).astype(np.float32) * 100
                  for m, x in test.modalities.items()})
  again = reference.fit_linear_reference(_with_splits(cls_ds, test=garbage))
  assert (again.C, again.scores, again.valid_score) == (cls_ref.C, cls_ref.scores,
                                                         cls_ref.valid_score)
  np.testing.assert_array_equal(again.estimator.coef_, cls_ref.estimator.coef_)
  np.testing.assert_array_equal(again.scaler.mean_, cls_ref.scaler.mean_)

  # ... and features() is never called on it
  seen = []
  original = reference.features
  monkeypatch.setattr(reference, "features",
                      lambda s, *a, **k: seen.append(s) or original(s, *a, **k))
  reference.fit_linear_reference(cls_ds, Cs=(0.1, 1.0))
  assert seen and all(s is not test for s in seen)
  assert any(s is valid for s in seen)


def test_regression_beats_train_mean_and_mae_is_minimised():
  ds = make_synthetic(SIZES, task="regression", seed=0)
  with warnings.catch_warnings():
    warnings.simplefilter("error", ConvergenceWarning)
    ref = reference.fit_linear_reference(ds)
  train, test = ds.splits["train"], ds.splits["test"]
  assert ref.metric == "Has0_acc_2"
  assert ref.predict(test.batch(np.arange(3))).shape == (3,)
  mae = ref.evaluate(test, [protocol.full()]).get("full")["MAE"]
  baseline = float(np.mean(np.abs(test.labels - train.labels.mean())))
  assert np.isfinite(mae) and mae < 0.6 * baseline, (mae, baseline)
  # alpha = 1 / C: the fitted Ridge is the one asked for
  assert ref.estimator.alpha == pytest.approx(1.0 / ref.C)
  # selecting by MAE picks the smallest valid MAE, not the largest
  by_mae = reference.fit_linear_reference(ds, metric="MAE")
  assert len(set(by_mae.scores.values())) == len(by_mae.scores)
  assert by_mae.C == min(by_mae.scores, key=by_mae.scores.get)
  assert by_mae.C != max(by_mae.scores, key=by_mae.scores.get)
  with pytest.raises(ValueError, match="not a regression metric"):
    reference.fit_linear_reference(ds, metric="accuracy")


def test_multilabel_outputs_and_constant_label(cls_ds):
  def to_multilabel(split):
    onehot = np.eye(5, dtype=np.int32)[split.labels]  # label 4: never positive
    return dataclasses.replace(split, labels=onehot, task="multilabel")

  ds = MultimodalDataset(name="ml", splits={s: to_multilabel(sp)
                                            for s, sp in cls_ds.splits.items()},
                         num_outputs=5)
  ref = reference.fit_linear_reference(ds, Cs=(0.01, 1.0))
  assert ref.metric == "acc_4class" and isinstance(ref.estimator[4], float)
  test = ds.splits["test"]
  out = ref.predict(test.batch(np.arange(7)))
  assert out.shape == (7, 5, 2)
  metrics = ref.evaluate(test, [protocol.full()]).get("full")
  assert metrics["label4_acc"] == 1.0  # the constant label is predicted "no"
  assert metrics["acc_4class"] > 0.6


def _by_hand(ds, kept, Cs=(0.01, 0.1, 1.0, 10.0)):
  """The specialist of ``kept`` fitted with sklearn directly: (C, scaler, model)."""
  from sklearn.linear_model import LogisticRegression
  from sklearn.preprocessing import StandardScaler

  def feats(split):  # vector modalities: the one frame
    return np.concatenate([split.modalities[m][:, 0, :] for m in kept], axis=1)
  train, valid = ds.splits["train"], ds.splits["valid"]
  scaler = StandardScaler().fit(feats(train))
  best = None
  for c in Cs:
    model = LogisticRegression(C=c, max_iter=2000, random_state=0).fit(
        scaler.transform(feats(train)), train.labels)
    score = model.score(scaler.transform(feats(valid)), valid.labels)
    if best is None or score > best[0]:
      best = (score, c, model)
  return best[1], (lambda split: best[2].predict(scaler.transform(feats(split))))


def test_specialists_route_each_sample_to_its_subsets_model():
  ds = make_synthetic((200, 100, 100), seed=0)
  names = ds.modality_names
  test = ds.splits["test"]
  spec = reference.Specialists(ds)
  # lazily: a fixed removal fits its subset only
  only = spec.evaluate(test, [protocol.keep_only(["audio"])], seed=0)
  assert list(spec.fitted) == [("audio",)]
  c, predict = _by_hand(ds, ["audio"])
  assert spec.get(["audio"]).C == c
  assert only.get("audio only")["accuracy"] == np.mean(predict(test) == test.labels)
  assert spec.get(["audio"]) is spec.fitted[("audio",)]  # not refitted

  # random conditions: every sample by the specialist of its own pattern, under
  # the protocol's own mask (the same draw any model is evaluated under)
  conds = [protocol.cell_missing(0.5, 3), protocol.random_missing(0.5).with_draws(2),
           protocol.frame_missing(0.3), protocol.gaussian_noise(0.0)]
  result = spec.evaluate(test, conds, seed=3)
  assert [n for n, _ in result.rows] == ["cell eta 0.5", "missing rate 0.5"]
  assert set(result.meta["skipped"]) == {"frame missing 0.3", "noise 0 dB"}
  hand = {}
  for size in (1, 2, 3):
    for kept in itertools.combinations(names, size):
      hand[kept] = _by_hand(ds, list(kept))
  assert len(spec.fitted) == 7
  assert {k: r.C for k, r in spec.fitted.items()} == {k: c for k, (c, _) in hand.items()}
  preds = {k: p(test) for k, (_, p) in hand.items()}  # on the clean split: present = intact
  for cond, draws in ((conds[0], 1), (conds[1], 2)):
    accs = []
    for d in range(draws):
      degraded, presence = cond.apply(test, seed=3, draw=d)
      assert len({tuple(p) for p in presence}) > 3  # several patterns, or this is vacuous
      expected = np.array([preds[tuple(m for m, p in zip(names, row) if p)][i]
                           for i, row in enumerate(presence)])
      batch = degraded.batch(np.arange(test.num_samples))
      batch["presence"] = presence
      np.testing.assert_array_equal(spec.predict(batch).argmax(1), expected)
      accs.append(np.mean(expected == test.labels))
    assert result.get(cond.name)["accuracy"] == pytest.approx(np.mean(accs), abs=1e-12)
  # every modality present: the specialist of all is the linear reference
  full = spec.evaluate(test, [protocol.full()]).get("full")["accuracy"]
  ref = reference.fit_linear_reference(ds)
  assert full == ref.evaluate(test, [protocol.full()]).get("full")["accuracy"]
  given = reference.Specialists(ds, reference=ref)  # compare's: the reference, not refitted
  assert given.get(names) is ref and list(given.fitted) == [tuple(names)]
  assert given.evaluate(test, [protocol.full()]).get("full")["accuracy"] == full
  with pytest.raises(ValueError, match="without any modality"):
    spec.predict({**test.batch(np.arange(2)), "presence": np.zeros((2, 3), bool)})
  with pytest.raises(ValueError, match="modalities"):
    reference.fit_linear_reference(ds, modalities=["text", "smell"])
