"""Data sets: the in-memory type, loaders, the offline real data set, synthetic data.

:func:`load_dataset` is the one entry point the configs use::

    load_dataset("mfeat")                                   # offline, real
    load_dataset("synthetic", task="regression", seed=1)   # known ground truth
    load_dataset("mosi", path="data/mosi_data.pkl")        # MulT layout
    load_dataset("mosi", path="MOSI/Processed/unaligned_50.pkl")  # MMSA layout
"""

from __future__ import annotations

import os
from typing import Any

from modalimmune_jax.data.core import (TASKS, DataError, MultimodalDataset, MultimodalSplit,
                                       standardize)
from modalimmune_jax.data.mfeat import load_mfeat
from modalimmune_jax.data.pickles import load_mmsa, load_mult
from modalimmune_jax.data.synthetic import MOSI_SHAPES, make_synthetic

__all__ = [
    "TASKS", "DataError", "MultimodalDataset", "MultimodalSplit", "standardize",
    "load_mfeat", "load_mmsa", "load_mult", "make_synthetic", "MOSI_SHAPES",
    "load_dataset", "DATASETS",
]

DATASETS = ("synthetic", "mfeat", "mosi", "mosei", "iemocap")


def _load_pickle(name: str, path: str | None, **kwargs: Any) -> MultimodalDataset:
  if not path:
    raise DataError(f"data set {name!r} needs path= a MulT (*_data*.pkl) or MMSA "
                    "(aligned_50.pkl / unaligned_50.pkl) pickle; no data is "
                    "downloaded at run time")
  base = os.path.basename(path)
  if base.startswith(("aligned", "unaligned")):
    if name == "iemocap":
      raise DataError(f"{path}: IEMOCAP has no MMSA-layout release; use the MulT "
                      "iemocap_data.pkl")
    return load_mmsa(path, dataset=name, **kwargs)
  return load_mult(path, dataset=name, **kwargs)


def load_dataset(name: str, **kwargs: Any) -> MultimodalDataset:
  """Loads a data set by name (see :data:`DATASETS`); ``kwargs`` go to its loader."""
  if name == "synthetic":
    if "shapes" in kwargs and kwargs["shapes"] is not None:
      kwargs["shapes"] = {m: tuple(s) for m, s in dict(kwargs["shapes"]).items()}
    if "num_samples" in kwargs:
      kwargs["num_samples"] = tuple(kwargs["num_samples"])
    return make_synthetic(**kwargs)
  if name == "mfeat":
    return load_mfeat(**kwargs)
  if name in ("mosi", "mosei", "iemocap"):
    return _load_pickle(name, kwargs.pop("path", None), **kwargs)
  raise DataError(f"unknown data set {name!r}; choose from {DATASETS}")
