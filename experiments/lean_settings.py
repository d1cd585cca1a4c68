"""What leaner ModalImmune settings cost in accuracy, beside what they save in arithmetic.

    python experiments/lean_settings.py [--configs mfeat synthetic] [--seeds 0,1,2,3,4]
        [--workdir DIR] [--out DIR]
    python experiments/lean_settings.py --quick    # smoke config, 2 seeds

Issue 17 asks for ModalImmune's step within 1.3x plain's on MOSI-shaped data and
1.5x on mfeat. At the default settings its definition computes more than that
(``bench_methods.py``: 2.2-2.5x plain's FLOPs), so only other settings reach the
targets, and other settings are another method: a choice for the team, which
needs their accuracy. For each row of :data:`VARIANTS` (and modality dropout, the
baseline ModalImmune ties):

1. Arithmetic: the amortised FLOPs of a step against plain's on both benchmark
   workloads (``harness.step_gflops``: XLA's cost analysis of each program, the
   periodic ones divided by their period; a while loop's body is counted once).
2. Accuracy: :func:`modalimmune_jax.train.train_seeds` on each config at
   ``--seeds``, evaluated on the **valid** split (a default is chosen here, so the
   test split is not read): the headline metric with every modality
   ("full") and its mean over the missing-modality conditions ("mean missing", as
   ``compare`` computes it), mean ± std over seeds, and each row's paired
   difference to the defaults with a 95 % t interval over seeds
   (``compare.paired_differences``).

Writes ``OUT/lean_settings.{json,md}`` with provenance (``--out``, default
``experiments/results/lean_settings``); the runs go to ``--workdir`` (default a
temporary directory, removed).
"""

from __future__ import annotations

import os
import shutil
import tempfile

import jax

from harness import (bench_workloads, device_inputs, get_config, log, parser, step_gflops,
                     write_results)
from modalimmune_jax import compare, train
from modalimmune_jax.config import with_overrides
from modalimmune_jax.plots import percent_scale

# label -> (method, overrides of method.modalimmune)
VARIANTS = {
    "ModalImmune, defaults": ("modalimmune", {}),
    "ModalImmune, controller batch 64, refresh every 50":
        ("modalimmune", {"ctrl_batch_size": 64, "mask_every": 50}),
    "ModalImmune, no collapse term, controller batch 64, refresh every 50":
        ("modalimmune", {"collapse": False, "ctrl_batch_size": 64, "mask_every": 50}),
    "modality dropout": ("dropout", {}),
}
BASELINE = "ModalImmune, defaults"


def overrides_of(method: str, overrides: dict) -> dict:
  return {"method.name": method, **{f"method.modalimmune.{k}": v for k, v in overrides.items()}}


def arithmetic(quick: bool) -> dict:
  """``{workload: {label: amortised GFLOP per step / plain's}}``."""
  out = {}
  for w in bench_workloads(quick):
    plain = None
    out[w.name] = {}
    for label, (method, overrides) in [("plain", ("plain", {}))] + list(VARIANTS.items()):
      run = train.setup(with_overrides(w.config, overrides_of(method, overrides)))
      batch, key, _ = device_inputs(run, [0], jax.random.key(0))[0]
      g = step_gflops(run, run.state, batch, key)["amortised"]
      plain = plain or g
      out[w.name][label] = g / plain
      log(f"[{w.name}] {label}: {g:.4f} GFLOP a step, {g / plain:.2f}x plain")
  return out


def accuracy(args, name: str, workdir: str) -> dict:
  """``compare.aggregate``'s table of every row on the valid split, and the
  paired differences to :data:`BASELINE`."""
  summaries, metric = {}, None
  for label, (method, overrides) in VARIANTS.items():
    config = get_config(name, "smoke" if args.quick else "",
                        overrides={**overrides_of(method, overrides), "eval.split": "valid"})
    log(f"[{name}] {label}: training seeds {args.seeds}")
    dirs = [os.path.join(workdir, name, label.replace(" ", "_").replace(",", ""), f"seed{s}")
            for s in args.seeds]
    summaries[label] = train.train_seeds(config, args.seeds, dirs)
    metric = summaries[label][0]["headline_metric"]
  table = compare.aggregate(summaries, metric)
  return {"metric": metric, "aggregate": table,
          "paired": compare.paired_differences(table, BASELINE)}


def render(record) -> list[str]:
  flops = record["arithmetic"]
  names = list(flops)
  out = ["Arithmetic: amortised FLOPs of a step against plain's (XLA's cost analysis; "
         "periodic programs divided by their period; CG loops counted once).", "",
         "| setting | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
  for label in VARIANTS:
    out.append(f"| {label} | " + " | ".join(f"{flops[n][label]:.2f}" for n in names) + " |")
  for name, acc in record["accuracy"].items():
    scale = percent_scale(acc["metric"])
    out += ["", f"**{name}**, {acc['metric']} on the valid split, seeds {record['seeds']}: "
            "mean ± std; paired: the row minus the defaults on the same seed, mean and 95 % "
            "t interval over seeds (percentage points where the metric is a rate).", "",
            "| setting | full | mean missing | full − defaults | mean missing − defaults |",
            "|---|---:|---:|---:|---:|"]
    for label in VARIANTS:
      row = acc["aggregate"][label]
      cells = [f"{row[c]['mean'] * scale:.2f} ± {row[c]['std'] * scale:.2f}"
               for c in ("full", "mean missing")]
      for c in ("full", "mean missing"):
        d = acc["paired"].get(label, {}).get(c)
        cells.append("—" if d is None or d["lo"] is None else
                     f"{d['mean'] * scale:+.2f} [{d['lo'] * scale:+.2f}, {d['hi'] * scale:+.2f}]")
      out.append(f"| {label} | " + " | ".join(cells) + " |")
  return out


def main(argv=None) -> int:
  p = parser(__doc__, "lean_settings")
  p.add_argument("--configs", nargs="+", default=["mfeat", "synthetic"])
  p.add_argument("--seeds", default=None, help="comma-separated (0,1,2,3,4; --quick 0,1)")
  p.add_argument("--workdir", default=None, help="where the runs go (default: a temporary "
                 "directory, removed at the end)")
  args = p.parse_args(argv)
  args.seeds = [int(s) for s in (args.seeds or ("0,1" if args.quick else "0,1,2,3,4"))
                .split(",")]
  workdir = args.workdir or tempfile.mkdtemp(prefix="lean-settings-")
  try:
    record = {"seeds": args.seeds, "variants": {k: {"method": m, "overrides": o}
                                                for k, (m, o) in VARIANTS.items()},
              "arithmetic": arithmetic(args.quick),
              "accuracy": {name: accuracy(args, name, workdir) for name in args.configs}}
  finally:
    if args.workdir is None:
      shutil.rmtree(workdir, ignore_errors=True)
  write_results(args.out, "lean_settings", record, render(record),
                title="Leaner ModalImmune settings: arithmetic and accuracy (issue 17)",
                seeds=args.seeds)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
