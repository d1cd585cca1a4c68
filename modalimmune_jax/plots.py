"""PNG figures of protocol results (matplotlib, headless ``Agg`` backend):
bars per condition (:func:`plot_protocol`) and robustness curves over a
missing rate (:func:`robustness_curves`)."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from modalimmune_jax.protocol import ProtocolResult

__all__ = ["plot_protocol", "robustness_curves", "percent_scale"]

# Metrics plotted as they are; every other (accuracies, F1) in percent.
UNSCALED = ("MAE", "Corr")


def percent_scale(metric: str) -> float:
  """100 for accuracy-like metrics (plotted in %), 1 for MAE and correlation."""
  return 1.0 if metric in UNSCALED else 100.0


_KIND_COLORS = {"full": "#333333", "removal": "#4C72B0", "random_missing": "#DD8452",
                "frame_missing": "#55A868", "gaussian_noise": "#C44E52"}


def plot_protocol(results: dict[str, ProtocolResult] | ProtocolResult, metric: str,
                  path: str, title: str = "",
                  conditions: Sequence[str] | None = None) -> str:
  """Horizontal bars of ``metric`` per condition, one bar per run (method).

  Args:
    results: a result, or name -> result for several runs side by side.
    metric: the metric to plot (e.g. ``"accuracy"``, ``"Has0_acc_2"``).
    path: the PNG file to write.
    title: figure title.
    conditions: which conditions, in order (default: all, as run).

  Returns:
    ``path``.

  Example:
    >>> plot_protocol({"plain": r1, "modalimmune": r2}, "accuracy", "runs/cmp.png")
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  if isinstance(results, ProtocolResult):
    results = {"": results}
  names = list(conditions or [n for n, _ in next(iter(results.values())).rows])
  kinds = {}
  for r in results.values():
    for c in r.meta.get("conditions", []):
      kinds[c["name"]] = c["kind"]
  n_runs = len(results)
  height = 0.8 / n_runs
  fig, ax = plt.subplots(figsize=(7, 0.9 + 0.32 * len(names) * max(1, n_runs * 0.6)))
  y = np.arange(len(names))
  for i, (run, r) in enumerate(results.items()):
    values = [r.get(n).get(metric, np.nan) if n in dict(r.rows) else np.nan for n in names]
    values = [np.nan if v is None else v for v in values]
    colors = ([_KIND_COLORS.get(kinds.get(n, ""), "#777777") for n in names]
              if n_runs == 1 else None)
    bars = ax.barh(y + (i - (n_runs - 1) / 2) * height, values, height=height,
                   color=colors, label=run or None)
    for bar, v in zip(bars, values):
      if np.isfinite(v):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v:.3f}",
                va="center", fontsize=7)
  first = next(iter(results.values()))
  if "full" in dict(first.rows):
    ax.axvline(first.get("full").get(metric, np.nan), color="#333333", lw=0.8, ls="--")
  ax.set_yticks(y, names, fontsize=8)
  ax.set_ylim(len(names) - 0.5, -0.5)  # first condition on top, no padding
  ax.set_xlabel(metric)
  ax.set_title(title or f"{metric} under missing / corrupted modalities", fontsize=10)
  if n_runs > 1:
    ax.legend(fontsize=8, loc="lower right")
  ax.margins(x=0.12)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def robustness_curves(curves: Mapping[str, Mapping[str, Sequence[float]]], metric: str,
                      path: str, title: str,
                      xlabel: str = "missing rate eta (cell-eta, CPM-Net/GCNet)") -> str:
  """One line per method over a missing rate, with a shaded band of ±1 std.

  Args:
    curves: ``{label: {"x": [...], "mean": [...], "std": [...]}}`` (``std``
      over seeds; the values in the metric's own unit, accuracies as
      fractions).
    metric: the metric's name; accuracy-like metrics are drawn in percent,
      ``MAE`` and ``Corr`` as they are (:func:`percent_scale`).
    path: the PNG file to write.
    title: figure title.
    xlabel: the x axis, naming the missing-rate convention of ``x``.

  Returns:
    ``path``.

  Example:
    >>> robustness_curves({"plain": {"x": [0.1, 0.4, 0.7], "mean": [0.9, 0.8, 0.6],
    ...                              "std": [0.01, 0.02, 0.03]}},
    ...                   "accuracy", "runs/curves.png", "mfeat, 3 seeds")
    'runs/curves.png'
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  scale = percent_scale(metric)
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  for label, c in curves.items():
    x = np.asarray(c["x"], float)
    mean = scale * np.asarray(c["mean"], float)
    std = scale * np.asarray(c.get("std", np.zeros_like(mean)), float)
    if not x.shape == mean.shape == std.shape:
      raise ValueError(f"curve {label!r}: x, mean and std need one value each per point, "
                       f"got {x.shape}, {mean.shape}, {std.shape}")
    order = np.argsort(x)
    x, mean, std = x[order], mean[order], std[order]
    (line,) = ax.plot(x, mean, marker="o", ms=3.5, lw=1.4, label=label)
    ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.18, lw=0)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(f"{metric}{' (%)' if scale != 1.0 else ''} (mean ± std)")
  ax.set_title(title, fontsize=10)
  ax.grid(alpha=0.3)
  if curves:
    ax.legend(fontsize=8, loc="best")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path
