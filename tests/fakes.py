"""Writers of small files in the exact layouts of the real benchmark releases."""

import pickle

import numpy as np

WIDTHS = {"mosi": (300, 5, 20), "mosei": (300, 74, 35), "iemocap": (300, 74, 35)}
SIZES = {"train": 12, "valid": 5, "test": 7}


def mult_record(dataset, n, rng, aligned=True, length=8):
  wt, wa, wv = WIDTHS[dataset]
  la, lv = (length, length) if aligned else (length + 7, length + 12)
  rec = {
      "text": rng.normal(size=(n, length, wt)).astype(np.float32),
      "audio": rng.normal(size=(n, la, wa)).astype(np.float32),
      "vision": rng.normal(size=(n, lv, wv)).astype(np.float32),
  }
  rec["audio"][0, 0, 0] = -np.inf  # as in the real files
  rec["audio"][1, 2, 1] = np.nan
  rec["audio"][1, 3, :2] = -np.inf
  if dataset == "iemocap":
    cls = rng.integers(0, 4, size=n)
    lab = np.zeros((n, 4, 2), np.float32)
    lab[:, :, 0] = 1
    lab[np.arange(n), cls, 0] = 0
    lab[np.arange(n), cls, 1] = 1
    rec["labels"] = lab
  else:
    lab = np.round(rng.uniform(-3, 3, size=(n, 1, 1)) * 5) / 5
    lab[0] = 0.0
    rec["labels"] = lab.astype(np.float32)
  rec["id"] = np.array([[f"vid{i}".encode(), b"clip"] for i in range(n)], dtype=object)
  return rec


def write_mult(path, dataset="mosi", aligned=True, seed=0, mutate=None):
  rng = np.random.default_rng(seed)
  data = {s: mult_record(dataset, n, rng, aligned) for s, n in SIZES.items()}
  if mutate:
    mutate(data)
  with open(path, "wb") as f:
    pickle.dump(data, f)
  return data


def mmsa_record(n, rng, aligned, length=10, audio_width=5, vision_width=20):
  la, lv = (length, length) if aligned else (length + 5, length + 9)
  lengths = rng.integers(3, length + 1, size=n)
  bert = np.zeros((n, 3, length), np.int64)
  bert[:, 0] = rng.integers(100, 2000, size=(n, length))
  bert[:, 1] = np.arange(length)[None, :] < lengths[:, None]
  rec = {
      "raw_text": np.array([f"sentence {i}" for i in range(n)], dtype=object),
      "text": rng.normal(size=(n, length, 768)).astype(np.float32),
      "text_bert": bert.astype(np.float32),
      "audio": rng.normal(size=(n, la, audio_width)).astype(np.float32),
      "vision": rng.normal(size=(n, lv, vision_width)).astype(np.float32),
      "id": np.array([f"video{i}$_${i % 3}" for i in range(n)], dtype=object),
      "regression_labels": (np.round(rng.uniform(-3, 3, size=n) * 5) / 5).astype(np.float32),
      "classification_labels": rng.integers(0, 3, size=n).astype(np.float32),
  }
  rec["audio"][0, 0, 0] = -np.inf
  rec["audio"][2, 1, 1] = np.nan
  if not aligned:
    rec["audio_lengths"] = rng.integers(1, la + 1, size=n).tolist()
    rec["vision_lengths"] = rng.integers(1, lv + 1, size=n).tolist()
  return rec


def write_mmsa(path, aligned=True, seed=0, mutate=None):
  rng = np.random.default_rng(seed)
  data = {s: mmsa_record(n, rng, aligned) for s, n in SIZES.items()}
  if mutate:
    mutate(data)
  with open(path, "wb") as f:
    pickle.dump(data, f)
  return data
