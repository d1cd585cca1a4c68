"""Figures: the robustness curves (one line per method, a ±std band) as PNG."""

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
