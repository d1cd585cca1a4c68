"""Figures: the robustness curves (one line per method, a ±std band) as PNG."""

import numpy as np
import pytest

from modalimmune_jax.plots import percent_scale, robustness_curves


def test_robustness_curves_write_a_png(tmp_path):
  curves = {"plain": {"x": [0.1, 0.4, 0.7], "mean": [0.9, 0.8, 0.55], "std": [0.01, 0.02, 0.04]},
            "dropout": {"x": [0.7, 0.1, 0.4], "mean": [0.7, 0.91, 0.85], "std": [0.03, 0, 0.02]}}
  path = str(tmp_path / "curves.png")
  assert robustness_curves(curves, "accuracy", path, "synthetic, 3 seeds") == path
  with open(path, "rb") as f:
    head = f.read()
  assert head.startswith(b"\x89PNG\r\n\x1a\n") and len(head) > 1000
  assert percent_scale("accuracy") == 100.0 and percent_scale("MAE") == 1.0
  with pytest.raises(ValueError, match="'plain'"):
    robustness_curves({"plain": {"x": [0.1], "mean": [0.9, 0.8], "std": [0.0]}}, "MAE",
                      str(tmp_path / "bad.png"), "")


def test_paired_differences_figure_writes_a_png_of_a_page(tmp_path):
  import matplotlib.image

  from modalimmune_jax.plots import plot_paired_differences
  rng = np.random.default_rng(0)
  conds = ["full", "a+b", "b+c", "a only", "b only", "missing rate 0.5", "cell eta 0.3",
           "cell eta 0.6", "noise 0 dB", "mean missing"]
  groups = [("full", conds[:1]), ("drop one", conds[1:3]), ("keep one", conds[3:5]),
            ("random missing rate", conds[5:6]), ("cell eta", conds[6:8]),
            ("noise", conds[8:9]), ("mean missing", conds[9:])]
  methods = ["plain", "dropout", "ebr", "modalimmune"]

  def entry(mean, n=3):
    half = abs(rng.normal(0.01, 0.005))
    return {"mean": mean, "lo": mean - half if n > 1 else None,
            "hi": mean + half if n > 1 else None, "n": n}
  paired = {base: {m: {c: entry(rng.normal(0, 0.05), n=1 if c == "b only" else 3)
                       for c in conds} for m in methods if m != base}
            for base in ("plain", "dropout")}
  paired["plain"]["ebr"]["full"] = {"mean": None, "lo": None, "hi": None, "n": 0}
  room = {base: {c: 0.02 for c in conds if c != "noise 0 dB"} for base in paired}
  room["plain"]["a only"] = 0.6  # far off the block's scale: an arrow at its edge
  path = str(tmp_path / "comparison.png")
  assert plot_paired_differences(paired, "accuracy", path, "fake, 3 seeds", groups,
                                 headroom=room, methods=methods) == path
  height, width = matplotlib.image.imread(path).shape[:2]
  assert width == 1050 and 600 <= height <= 1500, (width, height)  # 7 in at 150 dpi
  one = plot_paired_differences({"plain": paired["plain"]}, "MAE", str(tmp_path / "one.png"),
                                "", groups[:2])
  assert matplotlib.image.imread(one).shape[1] == 750  # one column: 5 in
  with pytest.raises(ValueError, match="baseline"):
    plot_paired_differences({}, "accuracy", str(tmp_path / "none.png"), "", groups)
