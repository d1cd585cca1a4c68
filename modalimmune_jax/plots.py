"""PNG figures of protocol results (matplotlib, headless ``Agg`` backend):
bars per condition (:func:`plot_protocol`), robustness curves over a
missing rate (:func:`robustness_curves`) and paired differences to baselines
with their confidence intervals, per condition group
(:func:`plot_paired_differences`, the comparison's figure)."""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from modalimmune_jax.protocol import ProtocolResult
from modalimmune_jax.reference import LOWER_IS_BETTER

__all__ = ["plot_protocol", "robustness_curves", "plot_paired_differences",
           "percent_scale"]

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


_MARKERS = ("o", "s", "D", "^", "v", "P", "X", "<", ">", "p", "h", "*")


def _excludes_zero(entry: Mapping) -> bool:
  lo, hi = entry.get("lo"), entry.get("hi")
  return lo is not None and hi is not None and (lo > 0 or hi < 0)


def plot_paired_differences(paired: Mapping[str, Mapping[str, Mapping[str, Mapping]]],
                            metric: str, path: str, title: str,
                            groups: Sequence[tuple[str, Sequence[str]]],
                            headroom: Mapping[str, Mapping[str, float]] | None = None,
                            level: float = 0.95,
                            methods: Sequence[str] | None = None) -> str:
  """Each method's paired difference to each baseline, with its interval.

  One column per baseline (``method - baseline``), one block of rows per
  condition group (``groups``, top to bottom), one row per condition; in a
  row each method is a marker at its mean difference with a horizontal bar
  over its interval, filled where the interval excludes 0, open where it does
  not (or where there is none: one seed). Every block has its own x range (in
  points for accuracy-like metrics, :func:`percent_scale`) with a vertical line
  at 0, so that differences of a fraction of a point stay visible beside those
  of twenty. ``headroom``, when given, is drawn as a grey tick per condition
  (one that would more than double a block's range: a grey arrow at its edge,
  with the value).

  Args:
    paired: ``{baseline: {method: {condition: {"mean", "lo", "hi", "n"}}}}`` in
      the metric's own unit (accuracies as fractions;
      :func:`modalimmune_jax.compare.paired_differences`); ``mean`` None: no
      common seed; ``lo``/``hi`` None: no interval.
    metric: the metric's name (drawn in points unless ``MAE``/``Corr``).
    path: the PNG file to write.
    title: figure title.
    groups: ``(label, condition names)`` per block; conditions absent from
      ``paired`` are left blank.
    headroom: ``{baseline: {condition: value}}`` (the specialist's score minus
      the baseline's mean), drawn as grey ticks.
    level: the intervals' confidence level (for the axis labels).
    methods: the order of the methods, which sets their colours and markers
      (the same in every column) and their places in a row (default: the
      order first met in ``paired``).

  Returns:
    ``path``.

  Example:
    >>> paired = {"plain": {"dropout": {"full": {"mean": -0.005, "lo": -0.02,
    ...                                          "hi": 0.01, "n": 3}}}}
    >>> plot_paired_differences(paired, "accuracy", "runs/cmp.png", "mfeat",
    ...                         [("full", ["full"])])
    'runs/cmp.png'
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.lines import Line2D

  scale = percent_scale(metric)
  unit = " (points)" if scale != 1.0 else ""
  if metric in LOWER_IS_BETTER:
    unit += ", lower is better"
  baselines = list(paired)
  groups = [(label, list(rows)) for label, rows in groups if rows]
  if not baselines or not groups:
    raise ValueError("plot_paired_differences needs at least one baseline and one group")
  methods = list(methods or [])  # one colour and marker each
  for per_method in paired.values():
    methods += [m for m in per_method if m not in methods]
  methods = [m for m in methods if any(m in per_method for per_method in paired.values())]
  colors = plt.get_cmap("tab10")
  style = {m: (colors(i % 10), _MARKERS[i % len(_MARKERS)]) for i, m in enumerate(methods)}
  headroom = headroom or {}

  n_rows = sum(len(rows) for _, rows in groups)
  per_panel = max(len(per_method) for per_method in paired.values())
  row_in = max(0.18, 0.03 * per_panel + 0.02)  # inches per condition
  height = min(22.0, 1.7 + row_in * n_rows + 0.38 * len(groups))
  width = 7.0 if len(baselines) > 1 else 5.0
  fig = plt.figure(figsize=(width, height), layout="constrained")
  axes = fig.subplots(len(groups), len(baselines), squeeze=False, sharey="row",
                      gridspec_kw={"height_ratios": [len(rows) + 0.4 for _, rows in groups]})
  step = 0.8 / max(len(methods), 1)
  for j, base in enumerate(baselines):
    shown = [m for m in methods if m in paired[base]]
    for g, (label, rows) in enumerate(groups):
      ax = axes[g, j]
      y = np.arange(len(rows))
      xs = [0.0]
      for k, m in enumerate(shown):
        offset = (k - (len(shown) - 1) / 2) * step
        for i, row in enumerate(rows):
          entry = paired[base][m].get(row)
          if not entry or entry.get("mean") is None:
            continue
          mean = scale * entry["mean"]
          lo = mean if entry.get("lo") is None else scale * entry["lo"]
          hi = mean if entry.get("hi") is None else scale * entry["hi"]
          color, marker = style[m]
          ax.errorbar([mean], [i + offset], xerr=[[mean - lo], [hi - mean]], fmt=marker,
                      color=color, mfc=color if _excludes_zero(entry) else "white",
                      mec=color, ms=3.6, mew=0.9, elinewidth=0.9, capsize=0)
          xs += [lo, hi]
      lo, hi = min(xs), max(xs)
      ticks = {i: scale * h for i, row in enumerate(rows)
               if (h := headroom.get(base, {}).get(row)) is not None and np.isfinite(h)}
      span = hi - lo if hi > lo else 1.0
      for x in ticks.values():  # a tick widens the block at most to twice the methods' span
        if lo - span <= x <= hi + span:
          lo, hi = min(lo, x), max(hi, x)
      pad = 0.08 * (hi - lo) if hi > lo else 0.5
      left, right = lo - pad, hi + pad
      ax.set_xlim(left, right)
      for i, x in ticks.items():
        if left <= x <= right:
          ax.plot([x, x], [i - 0.45, i + 0.45], color="0.6", lw=2.2, solid_capstyle="butt",
                  zorder=0)
        else:  # off the scale: an arrow at the edge, with its value
          out = x > right
          ax.plot([right if out else left], [i], marker=">" if out else "<", color="0.55",
                  ms=5, clip_on=False, zorder=3)
          ax.annotate(f"{x:+.1f}".replace("-", "\u2212"), (right if out else left, i),
                      xytext=(-5 if out else 5, 0), textcoords="offset points",
                      ha="right" if out else "left", va="center", fontsize=6, color="0.35")
      ax.axvline(0.0, color="black", lw=0.8, zorder=1)
      ax.set_yticks(y, rows, fontsize=7)
      ax.set_ylim(len(rows) - 0.5, -0.5)  # first condition on top
      for i in range(1, len(rows)):
        ax.axhline(i - 0.5, color="0.92", lw=0.6, zorder=0)
      ax.tick_params(axis="x", labelsize=7, pad=1.5, length=2.5)
      ax.tick_params(axis="y", length=0)
      ax.grid(axis="x", color="0.9", lw=0.5)
      ax.set_axisbelow(True)
      if j == 0 and not (len(rows) == 1 and rows[0] == label):
        ax.set_title(label, loc="left", fontsize=8, fontweight="bold", pad=2)
      if g == 0:
        ax.set_title(f"method \u2212 {base}", fontsize=9, pad=4)
    axes[-1, j].set_xlabel(f"method \u2212 {base}, {metric}{unit}", fontsize=7.5)

  handles = [Line2D([], [], ls="none", marker=style[m][1], color=style[m][0], ms=4.5,
                    label=m) for m in methods]
  handles += [Line2D([], [], ls="none", marker="o", color="0.3", ms=4.5,
                     label="filled: interval excludes 0"),
              Line2D([], [], ls="none", marker="o", color="0.3", mfc="white", ms=4.5,
                     label="open: includes 0 (or 1 seed)")]
  if any(headroom.values()):
    handles.append(Line2D([], [], color="0.6", lw=2.2, label="specialist \u2212 baseline mean"))
  fig.legend(handles=handles, loc="outside lower center",
             ncol=min(len(handles), 4 if len(baselines) > 1 else 3),
             fontsize=7, frameon=False, handletextpad=0.3, columnspacing=1.2,
             title=f"marker: mean over seeds of method \u2212 baseline (same seed); bar: "
                   f"{100 * level:g}% interval,\nt over seeds, paired by seed; every block "
                   "on its own scale", title_fontsize=7)
  fig.suptitle(title, fontsize=10)
  fig.savefig(path, dpi=150)
  plt.close(fig)
  return path
