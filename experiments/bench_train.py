"""Training throughput: steps per second and the first (compiling) step.

    python experiments/bench_train.py [--steps 50] [--out results/bench_train.json]

Workloads (the default model of the configs, the data-parallel step on all
local devices, Adam):
  * mfeat: UCI Multiple Features, 6 vector views, batch 64;
  * mosi-shaped synthetic: 3 sequence modalities of 50 steps, widths
    300 / 74 / 35, variable lengths, regression, batch 32.
Each row: the first step's wall time (tracing + compilation + one step), then
the median steps/s over 3 timed runs of ``--steps`` steps each.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs"))

import jax  # noqa: E402

from modalimmune_jax import train  # noqa: E402
from modalimmune_jax.step import shard_batch  # noqa: E402
from modalimmune_jax.provenance import provenance  # noqa: E402


def workloads():
  import mfeat
  import synthetic
  yield "mfeat (6 views, batch 64)", mfeat.get_config()
  cfg = synthetic.get_config("mosi_shaped")
  cfg.data.synthetic.num_samples = (1024, 64, 64)
  yield "MOSI-shaped synthetic (3 x 50 steps, 300/74/35, batch 32)", cfg


def bench(config, steps):
  run = train.setup(config)
  state, step, batches, mesh = run.state, run.step_fn, run.batches, run.mesh
  rng = jax.random.key(0)
  t0 = time.perf_counter()
  state, m = step(state, shard_batch(batches(0), mesh), rng)
  jax.block_until_ready(m)
  first = time.perf_counter() - t0
  rates, s = [], 1
  for _ in range(3):
    t0 = time.perf_counter()
    for _ in range(steps):
      state, m = step(state, shard_batch(batches(s), mesh), jax.random.fold_in(rng, s))
      s += 1
    jax.block_until_ready(m)
    rates.append(steps / (time.perf_counter() - t0))
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  return first, statistics.median(rates), n_params, mesh.devices.size


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--out", default="results/bench_train.json")
  args = parser.parse_args()
  rows = []
  for name, config in workloads():
    first, rate, n_params, n_dev = bench(config, args.steps)
    rows.append({"workload": name, "first_step_s": first, "steps_per_s": rate,
                 "params": int(n_params), "devices": n_dev,
                 "batch_size": config.train.batch_size})
  print(f"\nTraining throughput on {jax.devices()[0].platform} ({os.cpu_count()} cores)\n")
  print("| workload | params | devices | first step (s) | steps/s | samples/s |")
  print("|---|---:|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['workload']} | {r['params']:,} | {r['devices']} | {r['first_step_s']:.2f} | "
          f"{r['steps_per_s']:.1f} | {r['steps_per_s'] * r['batch_size']:.0f} |")
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"rows": rows, "steps_per_run": args.steps,
               "provenance": provenance(seed=0)}, f, indent=2)
  print(f"written {args.out}")


if __name__ == "__main__":
  main()
