"""bfloat16 against float32 compute (``train.compute_dtype``): step time and accuracy.

    python experiments/bench_precision.py [--configs mfeat synthetic]
        [--methods plain modalimmune] [--seeds 0,1,2] [--repeats 3] [--workdir DIR] [--out DIR]
    python experiments/bench_precision.py --quick    # smoke configs, 1 seed, R=1

For each config (``experiments/configs/<name>.py``) and method, the same run in
float32 and in bfloat16 compute (float32 parameters, optimiser state, losses,
spectra and BHGD's solve either way; ``docs/method.md``, "Mixed precision"):

1. Step time: :func:`modalimmune_jax.train.setup` of each, compiled and
   stepped twice, then warm windows (``harness.amortising_window``: every
   ModalImmune part as often as in training; batches and keys already on the
   device), the two dtypes alternated over ``R`` (``--repeats``) rounds, median;
   the ratio bfloat16 / float32.
2. Accuracy: :func:`modalimmune_jax.train.train_seeds` at ``--seeds`` (one
   vmapped program), the config's protocol on its ``eval.split``: the headline
   metric with every modality present ("full") and its mean over the missing
   conditions ("mean missing", as ``compare`` computes it), mean and std over
   seeds, and the paired difference bfloat16 - float32 (mean and std over seeds).

On a CPU bfloat16 has no native arithmetic (XLA converts around it), so the
step-time ratio says nothing about an accelerator's; it is measured where one
is lent. Writes ``OUT/bench_precision.{json,md}`` with provenance (``--out``,
default ``experiments/results/bench_precision``); the runs go to ``--workdir``
(default a temporary directory, removed).
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile

import jax
import numpy as np

from harness import (amortising_window, compile_periodic, get_config, host_steps, log,
                     parser, time_windows, window_inputs, write_results)
from modalimmune_jax import compare, train

DTYPES = ("float32", "bfloat16")


def configs_of(args, name, method):
  """``{dtype: config}`` of ``name``'s config (``smoke`` with ``--quick``) for ``method``."""
  return {d: get_config(name, "smoke" if args.quick else "",
                        overrides={"method.name": method, "train.compute_dtype": d})
          for d in DTYPES}


def step_times(args, configs):
  """``{dtype: [seconds per step per round]}`` and the window."""
  rng = jax.random.key(0)
  window = amortising_window(configs["float32"], 4 if args.quick else 100)
  dataset = train.load_data(configs["float32"])
  jobs, inputs = {}, None
  for dtype, config in configs.items():
    run = train.setup(config, dataset=dataset)
    state, _, first = host_steps(run, run.state, rng, range(2), timed=True)
    log(f"  {dtype}: first step {first[0]:.1f} s")
    if inputs is None:
      inputs = window_inputs(run, 2, window, rng)
    compile_periodic(run, state, *inputs[0][:2], [s for _, _, s in inputs])
    jobs[dtype] = (run.step_fn, state)
  times, _ = time_windows(jobs, inputs, args.repeats)
  return times, window


def accuracy(args, configs, workdir):
  """Per dtype, the seeds' summaries and ``compare.aggregate``'s table."""
  out = {}
  for dtype, config in configs.items():
    dirs = [os.path.join(workdir, dtype, f"seed{s}") for s in args.seeds]
    log(f"  {dtype}: training seeds {args.seeds}")
    summaries = train.train_seeds(config, args.seeds, dirs)
    metric = summaries[0]["headline_metric"]
    table = compare.aggregate({dtype: summaries}, metric)[dtype]
    out[dtype] = {"metric": metric,
                  "full": table["full"]["values"], "mean missing": table["mean missing"]["values"],
                  "nonfinite_skipped": [s["nonfinite_skipped"] for s in summaries],
                  "train_seconds": [s["train_seconds"] for s in summaries]}
  return out


def mean_std(values):
  values = [float(v) for v in values]
  return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def render(record):
  out = ["Step time: warm windows of W steps (every periodic part as often as in training), "
         f"{record['repeats']} round(s) alternating the dtypes, median. Accuracy: seeds "
         f"{record['seeds']}, mean ± std; paired: bfloat16 - float32 per seed, mean ± std.", "",
         "| config | method | W | float32 ms/step | bfloat16 ms/step | bf16 / f32 | metric "
         "| full, f32 | full, bf16 | paired | mean missing, f32 | mean missing, bf16 | paired |",
         "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
  fmt = lambda ms: f"{ms[0]:.4g} ± {ms[1]:.2g}"
  for r in record["rows"]:
    acc = r["accuracy"]
    cells = []
    for col in ("full", "mean missing"):
      f32, bf16 = acc["float32"][col], acc["bfloat16"][col]
      cells += [fmt(mean_std(f32)), fmt(mean_std(bf16)),
                fmt(mean_std([b - a for a, b in zip(f32, bf16)]))]
    ms = r["ms_per_step"]
    out.append(f"| {r['config']} | {r['method']} | {r['window']} | {ms['float32']:.2f} | "
               f"{ms['bfloat16']:.2f} | {ms['bfloat16'] / ms['float32']:.2f} | "
               f"{acc['float32']['metric']} | " + " | ".join(cells) + " |")
  skipped = {(r["config"], r["method"], d): r["accuracy"][d]["nonfinite_skipped"]
             for r in record["rows"] for d in DTYPES}
  out += ["", "Non-finite steps skipped: " + ", ".join(
      f"{c} {m} {d} {v}" for (c, m, d), v in skipped.items()) + ".", ""]
  return "\n".join(out)


def main(argv=None) -> int:
  p = parser(__doc__, "bench_precision")
  p.add_argument("--configs", nargs="+", default=["mfeat", "synthetic"])
  p.add_argument("--methods", nargs="+", default=["plain", "modalimmune"])
  p.add_argument("--seeds", default=None, help="comma-separated (0,1,2; --quick 0)")
  p.add_argument("--repeats", type=int, default=None, help="R rounds (3; --quick 1)")
  p.add_argument("--workdir", default=None, help="where the runs go (default: a temporary "
                 "directory, removed at the end)")
  args = p.parse_args(argv)
  args.seeds = [int(s) for s in (args.seeds or ("0" if args.quick else "0,1,2")).split(",")]
  args.repeats = args.repeats or (1 if args.quick else 3)
  workdir = args.workdir or tempfile.mkdtemp(prefix="bench-precision-")
  rows = []
  try:
    for name in args.configs:
      for method in args.methods:
        configs = configs_of(args, name, method)
        log(f"{name}, {method}: step time")
        times, window = step_times(args, configs)
        log(f"{name}, {method}: accuracy")
        acc = accuracy(args, configs, os.path.join(workdir, name, method))
        rows.append({"config": name, "method": method, "window": window,
                     "ms_per_step": {d: statistics.median(times[d]) * 1e3 for d in DTYPES},
                     "ms_per_round": {d: [t * 1e3 for t in times[d]] for d in DTYPES},
                     "accuracy": acc})
  finally:
    if args.workdir is None:
      shutil.rmtree(workdir, ignore_errors=True)
  record = {"rows": rows, "seeds": args.seeds, "repeats": args.repeats, "quick": args.quick,
            "platform": jax.devices()[0].platform, "devices": jax.device_count()}
  text = render(record)
  print("\n" + text)
  write_results(args.out, "bench_precision", record, text.splitlines(),
                title="bench_precision: bfloat16 against float32 compute", seeds=args.seeds)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
