"""PNG figures of protocol results (matplotlib, headless ``Agg`` backend)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from modalimmune_jax.protocol import ProtocolResult

__all__ = ["plot_protocol"]

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
