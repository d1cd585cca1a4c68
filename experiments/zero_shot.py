"""Zero-shot cross-modal robustness: train with one subset of modalities, test on another.

    python experiments/zero_shot.py [--data synthetic mosi_shaped mfeat]
        [--methods plain,dropout,...] [--seeds 0,1,2,3,4] [--settings chosen|defaults]
        [--mfeat_pairs 3] [--workdir runs/zero_shot] [--separately] [--out DIR] [--quick]

The paper's claim (ModalImmune, ../shared/METHOD.md): trained on text+audio,
tested on text+vision, up to +7.9 points over the baselines. Each method trains
with ``train.present`` set to the training subset: the other modalities are
absent from the train and valid splits (every training batch, every batch a
method draws, every use of valid; ``modalimmune_jax/config.py``), and it is
tested on the **test** split, which has every modality, under the protocol's
fixed removals (``eval.removals = all``). Pairs (training subset -> test subset):

* ``synthetic`` (``configs/synthetic.py``) and ``mosi_shaped``
  (``configs/synthetic.py:mosi_shaped``, MOSI-shaped sequences, regression):
  text+audio -> text+vision (the paper's pair);
* ``mfeat`` (``configs/mfeat.py``, 6 views): pairs of 2-view subsets that share
  exactly one view. There are 120 ordered pairs; a fixed sample of
  ``--mfeat_pairs`` (default 3) is drawn once with ``numpy.random.default_rng(0)``
  from their enumeration (``itertools.combinations`` of the views in the data
  set's order, training subset first), so every run of this script uses the same
  pairs, listed in the report.

Per (data set, pair, method), over ``--seeds`` (each in its own work directory
``WORKDIR/<data>/<train>__<test>/<method>/seed<k>``, resumed or skipped when
done; the seeds of a method train as one vmapped program unless ``--separately``,
``modalimmune_jax.train.seeds.train_seeds``): the headline metric (accuracy;
``Has0_acc_2`` for the regression data) on the test split under the test subset's condition, mean ± std over seeds, and
its paired differences to ``plain`` and ``dropout`` (those of them trained) with
95 % t intervals over seeds (``compare.aggregate`` / ``compare.paired_differences``);
beside it, for scale, the same metric under the training subset's own condition.

Each method's settings (``--settings``): ``chosen`` (default), the setting the
committed comparison chose for it on the valid split
(``experiments/results/baselines/<data>/comparison.json``, ``chosen``; for
``mosi_shaped``, whose committed comparison was not tuned, the synthetic data's,
as that comparison did), tuned with every modality trained on, not under the
zero-shot pattern; or ``defaults``, the config's defaults. No choice here reads
the test split. ``--quick``: the synthetic smoke config, plain and dropout, seed 0.

Writes ``zero_shot.{json,md}`` into ``--out``: one table per data set.

Time on a 2-core CPU, every method and 5 seeds: ``synthetic`` (the default)
about 11 minutes; ``mosi_shaped`` 38 minutes (4000-sample test split, 7
conditions per seed); ``mfeat`` about 20 minutes a pair (``--mfeat_pairs 1``
fits in 30 minutes; the default 3 pairs take about an hour). Runs are kept in
``--workdir``, so a later call with several data sets reuses them and renders
one file.
"""

from __future__ import annotations

import itertools
import json
import os
import sys

import numpy as np

from harness import RESULTS, ROOT, get_config, log, parser, write_results
from modalimmune_jax import build
from modalimmune_jax import methods as methods_lib
from modalimmune_jax.compare import (aggregate, mean_std_cell, paired_cell,
                                     paired_differences, removal_name, run_seeds)

NAME = "zero_shot"
DATA = {  # name -> (config file, variant, committed comparison whose choice is used)
    "synthetic": ("synthetic", "", "synthetic"),
    "mosi_shaped": ("synthetic", "mosi_shaped", "synthetic"),
    "mfeat": ("mfeat", "", "mfeat"),
}
PAPER_PAIR = (("text", "audio"), ("text", "vision"))
PAIR_SEED = 0
BASELINES = ("plain", "dropout")
# every fixed removal (the test and the training subsets among them), nothing random
EVAL = {"eval.removals": "all", "eval.missing_rates": (), "eval.cell_etas": (),
        "eval.sample_rates": (), "eval.frame_rates": (), "eval.snrs_db": (), "eval.draws": 1,
        "eval.split": "test", "eval.select": "final"}


def mfeat_pairs(names, count: int, seed: int = PAIR_SEED) -> list[tuple[tuple, tuple]]:
  """``count`` ordered pairs (training subset, test subset) of 2-view subsets sharing
  exactly one view, drawn without replacement from their enumeration."""
  subsets = list(itertools.combinations(names, 2))
  pairs = [(a, b) for a in subsets for b in subsets if len(set(a) & set(b)) == 1]
  pick = np.random.default_rng(seed).choice(len(pairs), size=min(count, len(pairs)),
                                            replace=False)
  return [pairs[i] for i in sorted(pick)]


def chosen_settings(data: str) -> tuple[dict, str]:
  """``{method: overrides}`` the committed comparison chose, and its path."""
  path = os.path.join(RESULTS, "baselines", DATA[data][2], "comparison.json")
  with open(path) as f:
    chosen = json.load(f).get("chosen") or {}
  return {m: dict(c["overrides"]) for m, c in chosen.items()}, os.path.relpath(path, ROOT)


def describe(method: str, overrides: dict) -> str:
  """``rate=0.3`` for the method's own keys, ``model.dropout=0.3`` for the others."""
  own = f"method.{method}."
  return ", ".join(f"{key[len(own):] if key.startswith(own) else key}={value}"
                   for key, value in overrides.items())


def ordered(subset, names) -> tuple[str, ...]:
  return tuple(m for m in names if m in subset)


def pair_label(pair) -> str:
  return f"{'+'.join(pair[0])}__{'+'.join(pair[1])}"


def run_pair(data: str, pair, method_names, seeds, settings: dict, workdir: str,
             quick: bool, together: bool = True) -> dict:
  """Every method's runs of one pair: aggregate, paired differences, the two rows."""
  name, variant, _ = DATA[data]
  train_set, test_set = pair
  records, used, run_dirs = {}, {}, {}
  for method in method_names:
    overrides = {**EVAL, **settings.get(method, {}), "method.name": method,
                 "train.present": tuple(train_set)}
    config = get_config(name, "smoke" if quick else variant, overrides=overrides)
    dirs = [os.path.join(workdir, data, pair_label(pair), method, f"seed{s}") for s in seeds]
    log(f"{data} {'+'.join(train_set)} -> {'+'.join(test_set)}: {method}, seeds {seeds}")
    records[method] = run_seeds(config, seeds, dirs, together)
    run_dirs[method] = dirs
    used[method] = settings.get(method, {})
  metric = records[method_names[0]][0]["headline_metric"]
  agg = aggregate(records, metric)
  rows = {"test": removal_name(test_set), "train": removal_name(train_set)}
  paired = {b: paired_differences(agg, b) for b in BASELINES if b in agg}
  keep = lambda table: {k: table[r] for k, r in rows.items() if r in table}
  return {
      "data": data, "train_present": list(train_set), "test_present": list(test_set),
      "conditions": rows, "metric": metric, "settings": used,
      "aggregate": {m: {**keep(t), "full": t["full"]} for m, t in agg.items()},
      "paired": {b: {m: keep(t) for m, t in d.items()} for b, d in paired.items()},
      "run_dirs": run_dirs,
  }


def render(points: list[dict], seeds, settings_note: dict) -> list[str]:
  lines = ["Trained with only the training subset present (`train.present`: absent from the "
           "train and valid splits), tested on the **test** split (every modality) under the "
           "test subset's fixed-removal condition. Mean ± std over seeds "
           f"{','.join(map(str, seeds))}, in points; paired differences to plain and dropout "
           "(method − baseline, same seed) with 95 % t intervals over seeds, bold where the "
           "interval excludes 0, (n=k) where only k seeds paired. Last column, for scale: "
           "the same metric under the training subset's own condition. The paper claims up "
           "to +7.9 points (text+audio -> text+vision).", ""]
  for data in dict.fromkeys(p["data"] for p in points):
    rows = [p for p in points if p["data"] == data]
    metric = rows[0]["metric"]
    lines += [f"## {data} ({metric})", "", f"Settings: {settings_note[data]}.", "",
              "| train -> test | method | test subset | − plain | − dropout | train subset |",
              "|---|---|---:|---:|---:|---:|"]
    for p in rows:
      pair = f"{'+'.join(p['train_present'])} -> {'+'.join(p['test_present'])}"
      for m, t in p["aggregate"].items():
        diff = lambda b: ("" if b == m else paired_cell(
            p["paired"].get(b, {}).get(m, {}).get("test"), 100, len(seeds)))
        lines.append(f"| {pair} | {m} | {mean_std_cell(t['test'], 100)} | {diff('plain')} | "
                     f"{diff('dropout')} | {mean_std_cell(t['train'], 100)} |")
    lines.append("")
  return lines


def main(argv=None) -> int:
  p = parser(__doc__.split("\n\n")[0], NAME)
  p.add_argument("--data", nargs="+", default=None, choices=list(DATA),
                 help="data sets (default: synthetic, about 11 minutes on 2 cores; "
                 "mosi_shaped 38; mfeat about 20 a pair)")
  p.add_argument("--methods", default=None,
                 help="comma-separated (default: every built-in method; --quick: plain,dropout)")
  p.add_argument("--seeds", default=None, help="comma-separated (default 0,1,2,3,4; --quick: 0)")
  p.add_argument("--settings", choices=("chosen", "defaults"), default="chosen",
                 help="each method's settings: the committed comparison's choice, or the "
                 "config's defaults (default: %(default)s)")
  p.add_argument("--mfeat_pairs", type=int, default=3,
                 help="mfeat pairs in the fixed sample (default: %(default)s)")
  p.add_argument("--workdir", default=os.path.join("runs", NAME))
  p.add_argument("--separately", action="store_true",
                 help="train a method's seeds one at a time, not as one vmapped program "
                 "(the default; it compiles each method once per pair)")
  args = p.parse_args(argv)
  data_sets = args.data or ["synthetic"]
  method_names = (args.methods.split(",") if args.methods else
                  ["plain", "dropout"] if args.quick else list(methods_lib.BUILTIN))
  unknown = [m for m in method_names if m not in methods_lib.names()]
  if unknown:
    p.error(f"--methods: unknown {unknown}; have {list(methods_lib.names())}")
  seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2,3,4")).split(",")]
  if args.quick and args.data and args.data != ["synthetic"]:
    p.error("--quick runs the synthetic smoke config only")
  points, notes = [], {}
  for data in data_sets:
    name, variant, _ = DATA[data]
    if data == "mfeat":  # the views, read before any training
      pairs = mfeat_pairs(build.load_data(get_config(name)).modality_names, args.mfeat_pairs)
    else:
      mods = tuple(get_config(name, variant).data.synthetic.modalities)
      pairs = [tuple(ordered(s, mods) for s in PAPER_PAIR)]
    if args.settings == "chosen":
      settings, path = chosen_settings(data)
      notes[data] = (f"each method's choice in `{path}` (`chosen`, tuned on valid with every "
                     "modality trained on): "
                     + "; ".join(f"{m} {describe(m, o)}" for m, o in settings.items()
                                 if m in method_names)
                     + ("; the others at the config's defaults"
                        if set(method_names) - set(settings) else ""))
    else:
      settings, notes[data] = {}, "every method at the config's defaults"
    for pair in pairs:
      points.append(run_pair(data, pair, method_names, seeds, settings, args.workdir,
                             args.quick, together=not args.separately))
  record = {"points": points, "seeds": seeds, "methods": method_names,
            "settings": args.settings, "settings_note": notes,
            "mfeat_pairs": {"count": args.mfeat_pairs, "seed": PAIR_SEED,
                            "enumeration": "itertools.combinations(views, 2), ordered pairs "
                                           "sharing exactly one view, training subset first"},
            "claim": "+7.9 points over baselines, trained on text+audio, tested on "
                     "text+vision (paper)"}
  write_results(args.out, NAME, record, render(points, seeds, notes),
                title="Zero-shot cross-modal robustness (train on one subset, test on another)",
                seeds=seeds, quick=args.quick)
  return 0


if __name__ == "__main__":
  sys.exit(main())
