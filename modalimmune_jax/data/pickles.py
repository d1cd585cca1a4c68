"""Loaders for the standard CMU-MOSI, CMU-MOSEI and IEMOCAP pickles.

Two layouts are in use in the field:

* **MulT** (Tsai et al., 2019): ``mosi_data.pkl``, ``mosei_senti_data.pkl``,
  ``iemocap_data.pkl`` and their ``*_data_noalign.pkl`` twins.
  ``d[split][key]`` with splits ``train`` / ``valid`` / ``test`` and keys
  ``text``, ``audio``, ``vision`` ``(N, L, d)``, ``labels`` (``(N, 1, 1)``
  sentiment in [-3, 3]; IEMOCAP one-hot ``(N, 4, 2)`` for Neutral, Happy, Sad,
  Angry), optional ``id``.
* **MMSA** (Yu et al.): ``aligned_50.pkl`` / ``unaligned_50.pkl`` with keys
  ``text`` ``(N, L, 768)``, ``text_bert`` ``(N, 3, L)`` (token ids, attention
  mask, segment ids), ``audio``, ``vision``, ``regression_labels`` ``(N,)``,
  ``id``, ``raw_text``, and in the unaligned files ``audio_lengths`` and
  ``vision_lengths``.

Real files hold ``-inf`` and NaN in the audio features: they are replaced by 0,
counted, reported in ``dataset.meta["nonfinite"]`` and logged. Every other
deviation (missing key, wrong shape or dtype, truncated file) is a
:class:`DataError` naming the file, split and key.

Files are read with :mod:`modalimmune_jax.data.safe_pickle`, which rebuilds
arrays, numbers, strings, lists, tuples and dicts and nothing else: a file that
names any other function or class (``os.system``, ``exec``, ...) is a
:class:`DataError` naming the file and the name, raised before it runs.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from modalimmune_jax.data import safe_pickle
from modalimmune_jax.data.core import SPLITS, DataError, MultimodalDataset, MultimodalSplit

__all__ = ["load_mult", "load_mmsa", "IEMOCAP_EMOTIONS", "KNOWN_WIDTHS"]

log = logging.getLogger(__name__)

IEMOCAP_EMOTIONS = ("neutral", "happy", "sad", "angry")
MODALITIES = ("text", "audio", "vision")

# Feature widths (text, audio, vision) of the public releases.
KNOWN_WIDTHS = {
    ("mult", "mosi"): (300, 5, 20),
    ("mult", "mosei"): (300, 74, 35),
    ("mult", "iemocap"): (300, 74, 35),
    ("mmsa", "mosi"): (768, 5, 20),
    ("mmsa", "mosei"): (768, 74, 35),
}


def _read_pickle(path: str) -> Any:
  """The unpickled file, through :func:`safe_pickle.load` (data only)."""
  return safe_pickle.load(path)


def _read_splits(path: str) -> dict:
  data = _read_pickle(path)
  if not isinstance(data, dict):
    raise DataError(f"{path}: top level is a {type(data).__name__}, expected a "
                    f"dict with splits {SPLITS}")
  missing = [s for s in SPLITS if s not in data]
  if missing:
    raise DataError(f"{path}: missing split(s) {missing} (found {_key_list(data)})"
                    f"{_non_str_note(data)}")
  return data


def _key_list(d: dict) -> list:
  """The keys of ``d`` in a stable order, whatever their types."""
  return sorted(d, key=lambda k: (not isinstance(k, str), repr(k)))


def _non_str_note(d: dict) -> str:
  bad = [k for k in _key_list(d) if not isinstance(k, str)]
  if not bad:
    return ""
  return f"; non-string key(s) {bad} (corrupt file?)"


class _Checker:
  """Validates one split's arrays; every message names file, split and key."""

  def __init__(self, path: str, split: str, record: Any):
    self.path, self.split = path, split
    if not isinstance(record, dict):
      raise DataError(f"{path}: split {split!r} is a {type(record).__name__}, "
                      "expected a dict of arrays")
    if any(not isinstance(k, str) for k in record):  # a key's name is corrupted
      raise DataError(f"{path}: split {split!r} has keys {_key_list(record)}"
                      f"{_non_str_note(record)}")
    self.record = record

  def fail(self, key: str, message: str):
    raise DataError(f"{self.path}: split {self.split!r}, key {key!r}: {message}")

  def get(self, key: str, optional: bool = False) -> np.ndarray | None:
    if key not in self.record:
      if optional:
        return None
      self.fail(key, f"missing (keys present: {_key_list(self.record)})"
                f"{_non_str_note(self.record)}")
    try:
      return np.asarray(self.record[key])
    except Exception as e:  # ragged lists and the like
      self.fail(key, f"not an array: {e}")

  def numeric(self, key: str, ndim: int, n: int | None = None,
              shape_text: str = "") -> np.ndarray:
    x = self.get(key)
    if x.dtype.kind not in "fiub":
      self.fail(key, f"expected a numeric array, got dtype {x.dtype}")
    if x.ndim != ndim or (n is not None and x.shape[0] != n):
      want = shape_text or f"{ndim}-D with {n} rows"
      self.fail(key, f"expected shape {want}, got {x.shape}")
    return x

  def features(self, key: str, n: int | None, width: int | None,
               counts: dict) -> np.ndarray:
    x = self.numeric(key, 3, n, f"(N{'' if n is None else '=' + str(n)}, L, d)")
    if width is not None and x.shape[2] != width:
      self.fail(key, f"expected feature width {width}, got {x.shape[2]} (pass "
                "expected_widths=None to accept other feature sets)")
    x = x.astype(np.float32)
    bad = ~np.isfinite(x)
    counts[key] = int(bad.sum())
    if counts[key]:
      x = np.where(bad, 0.0, x).astype(np.float32)
    return x

  def ids(self, key: str, n: int, optional: bool) -> np.ndarray:
    raw = self.get(key, optional=optional)
    if raw is None:
      return np.array([f"{self.split}_{i}" for i in range(n)])
    if raw.shape[:1] != (n,):
      self.fail(key, f"expected {n} ids, got shape {raw.shape}")

    def text(v):
      return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
    rows = raw.reshape(n, -1)
    return np.array(["_".join(text(v) for v in row) for row in rows])


def _warn_nonfinite(path: str, nonfinite: dict):
  total = sum(sum(c.values()) for c in nonfinite.values())
  if total:
    log.warning("%s: replaced %d non-finite feature values by 0: %s", path, total,
                {s: {k: c for k, c in v.items() if c} for s, v in nonfinite.items()})


def _widths(layout: str, dataset: str | None, expected_widths) -> dict:
  if expected_widths == "auto":
    known = KNOWN_WIDTHS.get((layout, dataset))
    return dict(zip(MODALITIES, known)) if known else {}
  if expected_widths is None:
    return {}
  return dict(zip(MODALITIES, expected_widths))


def _check_widths_agree(path: str, key: str, widths: dict[str, int]) -> None:
  """DataError naming the file, the odd split and the key when the feature
  widths of ``key`` differ between splits (``widths``: split -> width)."""
  values = list(widths.values())
  if len(set(values)) <= 1:
    return
  common = max(values, key=values.count)
  if values.count(common) > 1:  # one split differs from the others: name it
    odd = next(s for s, w in widths.items() if w != common)
  else:
    odd = next(s for s, w in widths.items() if w != values[0])
  others = {s: w for s, w in widths.items() if s != odd}
  if len(set(others.values())) == 1:
    seen = f"{common} in {' and '.join(others)}"
  else:
    seen = ", ".join(f"{s} {w}" for s, w in others.items())
  raise DataError(f"{path}: split {odd!r}, key {key!r}: feature width {widths[odd]}, but "
                  f"{seen} (feature widths differ from train's; the splits must agree)")


def _check_splits_agree(path: str, splits: dict[str, MultimodalSplit]) -> None:
  for m in MODALITIES:
    _check_widths_agree(path, m, {s: sp.modalities[m].shape[2] for s, sp in splits.items()})


def _infer_mult_name(path: str) -> str | None:
  base = os.path.basename(path).lower()
  for name in ("iemocap", "mosei", "mosi"):
    if base.startswith(name):
      return name
  return None


def load_mult(path: str, dataset: str | None = None,
              expected_widths: Any = "auto") -> MultimodalDataset:
  """Loads a MulT-format pickle (``mosi_data.pkl``, ``iemocap_data_noalign.pkl``, ...).

  Args:
    path: the pickle file.
    dataset: ``"mosi"``, ``"mosei"`` or ``"iemocap"``; inferred from the file
      name when ``None``.
    expected_widths: ``"auto"`` checks the public releases' (text, audio,
      vision) widths; a tuple checks those; ``None`` checks only that the
      splits agree.

  Returns:
    A :class:`MultimodalDataset`: regression in [-3, 3] for MOSI / MOSEI,
    multi-label (4 emotions, 0/1) for IEMOCAP. MulT files carry no lengths, so
    every frame is marked real (as MulT itself uses them).

  Example:
    >>> ds = load_mult("data/mosi_data.pkl")
    >>> ds.splits["train"].modalities["audio"].shape
    (1284, 50, 5)
  """
  dataset = dataset or _infer_mult_name(path)
  if dataset not in ("mosi", "mosei", "iemocap"):
    raise DataError(f"{path}: cannot tell the data set from the file name; pass "
                    "dataset='mosi', 'mosei' or 'iemocap'")
  widths = _widths("mult", dataset, expected_widths)
  data = _read_splits(path)
  splits, nonfinite = {}, {}
  for s in SPLITS:
    c = _Checker(path, s, data[s])
    counts: dict[str, int] = {}
    mods = {}
    n = None
    for m in MODALITIES:
      mods[m] = c.features(m, n, widths.get(m), counts)
      n = mods[m].shape[0]
    if dataset == "iemocap":
      raw = c.numeric("labels", 3, n, f"({n}, 4, 2)")
      if raw.shape[1:] != (4, 2):
        c.fail("labels", f"expected IEMOCAP one-hot shape ({n}, 4, 2), got {raw.shape}")
      if not (np.all(np.isin(raw, (0, 1))) and np.all(raw.sum(-1) == 1)):
        c.fail("labels", "expected one-hot pairs (exactly one 1 in each of the 4 "
               "emotions' (no, yes) pairs)")
      labels, task = raw.argmax(-1).astype(np.int32), "multilabel"
    else:
      raw = c.numeric("labels", 3, n, f"({n}, 1, 1)")
      if raw.shape[1:] != (1, 1):
        c.fail("labels", f"expected shape ({n}, 1, 1), got {raw.shape}")
      labels, task = raw.reshape(n).astype(np.float32), "regression"
    if not np.all(np.isfinite(labels)):
      c.fail("labels", "non-finite labels")
    nonfinite[s] = counts
    splits[s] = MultimodalSplit(
        modalities=mods, masks={m: np.ones(x.shape[:2], bool) for m, x in mods.items()},
        labels=labels, task=task, ids=c.ids("id", n, optional=True), name=f"{dataset}/{s}")
  _check_splits_agree(path, splits)
  _warn_nonfinite(path, nonfinite)
  return MultimodalDataset(
      name=dataset, splits=splits,
      num_outputs=4 if dataset == "iemocap" else 1,
      label_names=IEMOCAP_EMOTIONS if dataset == "iemocap" else (),
      meta={"source": os.path.abspath(path), "layout": "MulT",
            "aligned": "noalign" not in os.path.basename(path), "nonfinite": nonfinite})


def _lengths_mask(c: _Checker, key: str, n: int, length: int) -> np.ndarray:
  lengths = c.numeric(key, 1, n, f"({n},)")
  if lengths.dtype.kind not in "iu" and not np.all(lengths == np.round(lengths)):
    c.fail(key, "lengths must be whole numbers")
  if np.any(lengths < 0) or np.any(lengths > length):
    c.fail(key, f"lengths must lie in [0, {length}], got [{lengths.min()}, {lengths.max()}]")
  return np.arange(length)[None, :] < lengths[:, None]


def load_mmsa(path: str, dataset: str | None = None,
              expected_widths: Any = "auto") -> MultimodalDataset:
  """Loads an MMSA-format pickle (``aligned_50.pkl`` or ``unaligned_50.pkl``).

  The text modality is the ``text`` feature array; its frame mask is the BERT
  attention mask ``text_bert[:, 1, :]``. Unaligned files give audio and vision
  masks from ``audio_lengths`` / ``vision_lengths``; aligned files share the
  text mask.

  Args:
    path: the pickle file.
    dataset: ``"mosi"`` or ``"mosei"`` (for the width check); ``None`` infers
      it from the audio width (5: MOSI, 74: MOSEI; another width: ``"mmsa"``,
      widths not checked), which must be the same in all three splits.
    expected_widths: as in :func:`load_mult`. In any case the splits must
      agree on every feature width.

  Example:
    >>> ds = load_mmsa("MOSI/Processed/unaligned_50.pkl")
  """
  data = _read_splits(path)
  unaligned = "unaligned" in os.path.basename(path)
  checkers = {s: _Checker(path, s, data[s]) for s in SPLITS}
  if dataset is None:
    # From every split, not train alone: a width corrupted in one split would
    # otherwise infer "mmsa" and switch the width checks off.
    audio = {s: c.numeric("audio", 3, None, "(N, L, d)").shape[2]
             for s, c in checkers.items()}
    _check_widths_agree(path, "audio", audio)
    dataset = {5: "mosi", 74: "mosei"}.get(audio["train"], "mmsa")
  widths = _widths("mmsa", dataset, expected_widths)
  splits, nonfinite = {}, {}
  for s, c in checkers.items():
    counts: dict[str, int] = {}
    text = c.features("text", None, widths.get("text"), counts)
    n, length = text.shape[:2]
    bert = c.numeric("text_bert", 3, n, f"({n}, 3, {length})")
    if bert.shape[1:] != (3, length):
      c.fail("text_bert", f"expected shape ({n}, 3, {length}), got {bert.shape}")
    text_mask = bert[:, 1, :] > 0
    mods = {"text": text}
    masks = {"text": text_mask}
    for m in ("audio", "vision"):
      mods[m] = c.features(m, n, widths.get(m), counts)
      if unaligned or f"{m}_lengths" in c.record:
        masks[m] = _lengths_mask(c, f"{m}_lengths", n, mods[m].shape[1])
      else:
        if mods[m].shape[1] != length:
          c.fail(m, f"aligned file: expected {length} frames like text, got {mods[m].shape[1]}")
        masks[m] = text_mask
    labels = c.numeric("regression_labels", 1, n, f"({n},)").astype(np.float32)
    if not np.all(np.isfinite(labels)):
      c.fail("regression_labels", "non-finite labels")
    raw_text = c.get("raw_text")
    if raw_text.shape[:1] != (n,):
      c.fail("raw_text", f"expected {n} entries, got shape {raw_text.shape}")
    nonfinite[s] = counts
    splits[s] = MultimodalSplit(modalities=mods, masks=masks, labels=labels,
                                task="regression", ids=c.ids("id", n, optional=False),
                                name=f"{dataset}/{s}")
  _check_splits_agree(path, splits)
  _warn_nonfinite(path, nonfinite)
  return MultimodalDataset(
      name=dataset, splits=splits, num_outputs=1,
      meta={"source": os.path.abspath(path), "layout": "MMSA",
            "aligned": not unaligned, "nonfinite": nonfinite})
