"""A synthetic multimodal benchmark with known ground truth.

Generative model (all by ``np.random.default_rng(seed)``):

* latent factors ``u ~ N(0, I_K)`` per sample;
* label from ``u``: classification ``argmax(u W)`` (``W`` ``K x C``);
  regression ``3 tanh(1.5 u.w / ||w||)`` rounded to the 0.2 grid (sentiment in
  [-3, 3], with exact zeros as in MOSI's averaged annotations);
* the **dominant** modality sees every factor with noise ``noise``: it can fit
  the task alone;
* each **weak** modality sees its own block of factors plus a fraction
  ``redundancy`` of the other factors, with noise ``noise * weak_noise``: none
  suffices alone, together they cover every factor;
* a sequence modality ``(L, d)`` carries its signal ``u_S A_m`` under a random
  positive temporal envelope over its real frames; with ``variable_length`` the
  number of real frames is uniform in ``[L // 2, L]`` and the rest are zero
  padding (mask ``False``).

``dataset.meta["factors"]`` lists the factors each modality sees.
"""

from __future__ import annotations

import numpy as np

from modalimmune_jax.data.core import MultimodalDataset, MultimodalSplit

__all__ = ["make_synthetic", "MOSI_SHAPES"]

# MOSI-shaped modalities (aligned, 50 steps; MulT's MOSEI/IEMOCAP widths).
MOSI_SHAPES = {"text": (50, 300), "audio": (50, 74), "vision": (50, 35)}


def make_synthetic(num_samples: tuple[int, int, int] = (1000, 200, 400),
                   shapes: dict[str, tuple[int, int]] | None = None,
                   task: str = "classification", num_classes: int = 4,
                   num_factors: int = 8, dominant: str | None = None,
                   noise: float = 0.5, weak_noise: float = 2.0,
                   redundancy: float = 0.25, variable_length: bool = False,
                   seed: int = 0) -> MultimodalDataset:
  """Generates the synthetic benchmark (train, valid, test sizes in ``num_samples``).

  Args:
    num_samples: sizes of the train, valid and test splits.
    shapes: modality -> ``(L, d)``; default three vector modalities
      ``{"text": (1, 32), "audio": (1, 16), "vision": (1, 16)}``.
    task: ``"classification"`` or ``"regression"``.
    num_classes: classes for classification.
    num_factors: latent factors ``K`` (at least the number of weak modalities).
    dominant: the dominant modality (default: the first).
    noise: noise standard deviation of the dominant modality (signal has unit
      variance per factor).
    weak_noise: the weak modalities' noise is ``noise * weak_noise``.
    redundancy: fraction in [0, 1] of the other factors each weak modality
      also sees.
    variable_length: random numbers of real frames per sample.
    seed: seed of everything.

  Example:
    >>> ds = make_synthetic((256, 64, 64), shapes={"a": (10, 8), "b": (1, 4)},
    ...                     task="regression", seed=1)
  """
  shapes = dict(shapes or {"text": (1, 32), "audio": (1, 16), "vision": (1, 16)})
  for m, shape in shapes.items():
    if (len(tuple(shape)) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0
                                          for v in shape)):
      raise ValueError(f"shapes[{m!r}] must be (L, d) with positive integers, got {shape!r}")
  if len(num_samples) != 3 or min(num_samples) < 1:
    raise ValueError(f"num_samples must be 3 positive sizes (train, valid, test), "
                     f"got {num_samples!r}")
  if task not in ("classification", "regression"):
    raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")
  names = list(shapes)
  dominant = dominant or names[0]
  if dominant not in shapes:
    raise ValueError(f"dominant modality {dominant!r} not in {names}")
  weak = [m for m in names if m != dominant]
  if num_factors < max(len(weak), 1):
    raise ValueError(f"num_factors ({num_factors}) must be >= the number of weak "
                     f"modalities ({len(weak)})")
  if not 0.0 <= redundancy <= 1.0:
    raise ValueError(f"redundancy must be in [0, 1], got {redundancy}")
  rng = np.random.default_rng(seed)

  # Which factors each modality sees.
  factors = {dominant: np.arange(num_factors)}
  blocks = np.array_split(rng.permutation(num_factors), max(len(weak), 1))
  for m, block in zip(weak, blocks):
    others = np.setdiff1d(np.arange(num_factors), block)
    extra = rng.choice(others, size=int(round(redundancy * len(others))), replace=False)
    factors[m] = np.sort(np.concatenate([block, extra]))
  mixing = {m: rng.normal(size=(len(factors[m]), shapes[m][1])) / np.sqrt(len(factors[m]))
            for m in names}
  w_class = rng.normal(size=(num_factors, num_classes))
  w_reg = rng.normal(size=num_factors)

  def split(n, name):
    u = rng.normal(size=(n, num_factors))
    if task == "classification":
      labels = np.argmax(u @ w_class, axis=1).astype(np.int32)
    else:
      score = 3.0 * np.tanh(1.5 * (u @ w_reg) / np.linalg.norm(w_reg))
      labels = (np.round(score * 5.0) / 5.0).astype(np.float32)
    mods, masks = {}, {}
    for m in names:
      length, width = shapes[m]
      sigma = noise if m == dominant else noise * weak_noise
      signal = u[:, factors[m]] @ mixing[m]  # (n, d)
      if variable_length and length > 1:
        lengths = rng.integers(length // 2, length + 1, size=n)
      else:
        lengths = np.full(n, length)
      mask = np.arange(length)[None, :] < lengths[:, None]
      centre = rng.uniform(0, 1, size=(n, 1)) * lengths[:, None]
      t = np.arange(length)[None, :]
      env = 0.5 + np.exp(-0.5 * ((t - centre) / max(length / 4, 1.0)) ** 2)
      env = np.where(mask, env, 0.0)
      env = env / np.maximum(env.sum(1, keepdims=True) / lengths[:, None], 1e-9)
      x = env[:, :, None] * signal[:, None, :] + sigma * rng.normal(size=(n, length, width))
      mods[m] = np.where(mask[:, :, None], x, 0.0).astype(np.float32)
      masks[m] = mask
    return MultimodalSplit(modalities=mods, masks=masks, labels=labels, task=task,
                           ids=np.array([f"{name}_{i}" for i in range(n)]),
                           name=f"synthetic/{name}")

  splits = {s: split(n, s) for s, n in zip(("train", "valid", "test"), num_samples)}
  return MultimodalDataset(
      name="synthetic", splits=splits,
      num_outputs=num_classes if task == "classification" else 1,
      label_names=tuple(str(c) for c in range(num_classes)) if task == "classification" else (),
      meta={"seed": seed, "dominant": dominant,
            "factors": {m: factors[m].tolist() for m in names},
            "noise": noise, "weak_noise": weak_noise, "redundancy": redundancy})
