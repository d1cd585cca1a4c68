"""The comparison's statistics (issue 22): paired differences with Student-t
intervals over seeds, the condition groups of the figure, the specialist's
headroom and the markdown, on aggregates built by hand (no training)."""

import numpy as np
import pytest
from scipy import stats

from modalimmune_jax import compare


def _records(values: dict[int, dict[str, float]]) -> list[dict]:
  """Fake ``results.json`` records: seed -> condition -> accuracy."""
  conditions = [{"name": "full", "kind": "full", "params": {}},
                {"name": "a+b", "kind": "removal", "params": {"kept": ["a", "b"]}},
                {"name": "a only", "kind": "removal", "params": {"kept": ["a"]}},
                {"name": "cell eta 0.3", "kind": "cell_missing", "params": {"eta": 0.3}},
                {"name": "noise 0 dB", "kind": "gaussian_noise", "params": {"snr_db": 0.0}}]
  return [{"config": {"seed": seed},
           "protocol": {"rows": [{"condition": c["name"], "accuracy": per[c["name"]]}
                                 for c in conditions],
                        "meta": {"conditions": conditions}}}
          for seed, per in values.items()]


def _run(seed: int, shift: float) -> dict[str, float]:
  rng = np.random.default_rng(seed)
  base = {"full": 0.95, "a+b": 0.9, "a only": 0.6, "cell eta 0.3": 0.85, "noise 0 dB": 0.8}
  return {c: v + shift + 0.01 * rng.normal() for c, v in base.items()}


@pytest.fixture
def agg():
  records = {"plain": _records({s: _run(s, 0.0) for s in (0, 1, 2, 3)}),
             "dropout": _records({s: _run(10 + s, 0.05) for s in (0, 1, 2, 3)}),
             "ebr": _records({s: _run(20 + s, 0.03) for s in (1, 2, 3, 4)})}  # seed 0 lost
  return compare.aggregate(records, "accuracy")


def test_interval_is_t_over_seeds_and_matches_ttest_rel():
  a = np.array([0.91, 0.93, 0.90, 0.95, 0.92])
  b = np.array([0.90, 0.90, 0.91, 0.92, 0.89])
  d = a - b
  got = compare.paired_interval(d)
  half = stats.t.ppf(0.975, 4) * d.std(ddof=1) / np.sqrt(5)
  assert got["n"] == 5 and got["mean"] == pytest.approx(d.mean(), abs=1e-15)
  assert (got["lo"], got["hi"]) == pytest.approx((d.mean() - half, d.mean() + half), abs=1e-15)
  test = stats.ttest_rel(a, b)
  if hasattr(test, "confidence_interval"):  # scipy >= 1.10
    ci = test.confidence_interval(0.95)
    assert (got["lo"], got["hi"]) == pytest.approx((ci.low, ci.high), abs=1e-12)
  # one seed: a mean, no interval; none: nothing
  assert compare.paired_interval([0.02]) == {"mean": 0.02, "lo": None, "hi": None, "n": 1}
  assert compare.paired_interval([])["mean"] is None


def test_paired_differences_pair_by_seed(agg):
  assert agg["ebr"]["full"]["seeds"] == [1, 2, 3, 4]
  paired = compare.paired_differences(agg, "plain")
  assert set(paired) == {"dropout", "ebr"}
  assert set(paired["ebr"]) == {"full", "a+b", "a only", "cell eta 0.3", "noise 0 dB",
                                "mean missing"}
  # ebr has seeds 1..4, plain 0..3: only 1, 2, 3 pair, value with value of the same seed
  entry = paired["ebr"]["a only"]
  assert entry["seeds"] == [1, 2, 3] and entry["n"] == 3
  ebr = dict(zip(agg["ebr"]["a only"]["seeds"], agg["ebr"]["a only"]["values"]))
  plain = dict(zip(agg["plain"]["a only"]["seeds"], agg["plain"]["a only"]["values"]))
  diffs = [ebr[s] - plain[s] for s in (1, 2, 3)]
  hand = compare.paired_interval(diffs)
  assert entry["mean"] == pytest.approx(np.mean(diffs), abs=1e-15)
  assert (entry["lo"], entry["hi"]) == (hand["lo"], hand["hi"])
  # 'mean missing' pairs the per-seed means over the missing conditions (not noise)
  mm = paired["dropout"]["mean missing"]
  per_seed = [np.mean([agg[m][c]["values"][i] for c in ("a+b", "a only", "cell eta 0.3")])
              for m in ("dropout", "plain") for i in range(4)]
  assert mm["mean"] == pytest.approx(np.mean(per_seed[:4]) - np.mean(per_seed[4:]), abs=1e-12)
  assert mm["lo"] > 0  # dropout is 5 points better by construction
  # a NaN on one seed drops that pair only
  agg["dropout"]["full"]["values"][2] = float("nan")
  again = compare.paired_differences(agg, "plain")["dropout"]
  assert again["full"]["seeds"] == [0, 1, 3] and again["a+b"]["n"] == 4


def test_a_method_against_itself_is_zero_with_zero_width(agg):
  same = dict(agg, copy=agg["plain"])
  got = compare.paired_differences(same, "plain")["copy"]
  for entry in got.values():
    assert (entry["mean"], entry["lo"], entry["hi"], entry["n"]) == (0.0, 0.0, 0.0, 4)


def test_baselines_groups_and_headroom(agg):
  assert compare.paired_baselines(agg) == ["plain", "dropout"]
  assert compare.paired_baselines(["dropout", "ebr"]) == ["dropout"]
  assert compare.paired_baselines(["mi (full)", "no BHGD"]) == ["mi (full)"]
  conditions = [{"name": "full", "kind": "full"},
                {"name": "b+c", "kind": "removal", "params": {"kept": ["b", "c"]}},
                {"name": "a only", "kind": "removal", "params": {"kept": ["a"]}},
                {"name": "missing rate 0.5", "kind": "random_missing"},
                {"name": "a+c", "kind": "removal"},  # no params: from the name
                {"name": "sample eta 0.7", "kind": "sample_missing"},
                {"name": "frame missing 0.3", "kind": "frame_missing"}]
  assert compare.condition_groups(conditions, 3) == [
      ("full", ["full"]), ("drop one", ["b+c", "a+c"]), ("keep one", ["a only"]),
      ("random missing rate", ["missing rate 0.5"]), ("sample eta", ["sample eta 0.7"]),
      ("frame missing rate", ["frame missing 0.3"]), ("mean missing", ["mean missing"])]
  four = [{"name": "a+b", "kind": "removal", "params": {"kept": ["a", "b"]}}]
  assert compare.condition_groups(four, 4)[0] == ("keep 2 of 4", ["a+b"])

  specialist = {"rows": {"full": 0.97, "a only": 0.7}, "mean_missing": 0.8,
                "mean_missing_complete": True}
  room = compare.headroom(agg, specialist, ["plain", "dropout"])
  assert room["plain"]["a only"] == pytest.approx(0.7 - agg["plain"]["a only"]["mean"])
  assert room["dropout"]["mean missing"] == pytest.approx(
      0.8 - agg["dropout"]["mean missing"]["mean"])
  specialist["mean_missing_complete"] = False  # a mean over fewer conditions: not compared
  assert "mean missing" not in compare.headroom(agg, specialist, ["plain"])["plain"]
  assert compare.headroom(agg, None, ["plain"]) == {}


def test_markdown_tables(agg):
  bases = compare.paired_baselines(agg)
  paired = {b: compare.paired_differences(agg, b) for b in bases}
  specialist = {"rows": {"full": 0.97, "a+b": 0.93, "a only": 0.7, "cell eta 0.3": 0.9},
                "mean_missing": 0.8433, "mean_missing_over": ["a+b", "a only", "cell eta 0.3"],
                "mean_missing_complete": True, "skipped": {"noise 0 dB": "gaussian_noise: ..."},
                "C": {"a+b": 0.1, "a": 1.0, "b": 0.1}, "subsets": 3, "fit_seconds": 0.5,
                "seed": 0}
  room = compare.headroom(agg, specialist, bases)
  info = {"seeds": [0, 1, 2, 3], "split": "test", "command": "cmd", "commit": "abc",
          "dirty": False, "machine": "cpu", "modalities": ["a", "b"], "dominant_how": ""}
  md = compare.render(agg, "accuracy", title="T", dominant=None, reference=None,
                      runs_info=info, chosen={}, specialist=specialist, paired=paired,
                      room=room)
  assert "t over seeds, paired by seed" in md and "percentage points" in md
  lines = md.splitlines()
  head = lines.index("| method | full − plain | mean missing − plain | full − dropout "
                     "| mean missing − dropout |")
  dropout = next(ln for ln in lines[head:] if ln.startswith("| dropout |"))
  mm = paired["plain"]["dropout"]["mean missing"]
  cell = (f"**{compare._signed(100 * mm['mean'])} [{compare._signed(100 * mm['lo'])}, "
          f"{compare._signed(100 * mm['hi'])}]**")
  assert cell in dropout and dropout.count("—") == 2  # bold: excludes 0; itself: a dash
  ebr = next(ln for ln in lines[head:] if ln.startswith("| ebr |"))
  assert ebr.count("(n=3)") == 4  # ebr shares 3 of the 4 seeds
  assert any(ln.startswith("| specialist (linear, refit per subset) | ") for ln in lines)
  per_condition = lines.index("| condition | plain | ebr | specialist − dropout |")
  noise = next(ln for ln in lines[per_condition:] if ln.startswith("| noise 0 dB |"))
  assert noise.endswith("|  |")  # no specialist under noise
  assert "| specialist (linear, refit per subset; seed-0 data) | 97.00 | 84.33 |" in md
  assert "No specialist for frame-rate and noise conditions" in md
