"""Training throughput: the loop against its step, seeds under vmap, compilation.

    python experiments/bench_train.py [--steps 200] [--out experiments/results/bench_train]

Workloads: mfeat (UCI Multiple Features, 6 vector views, batch 64) and
MOSI-shaped synthetic data (3 sequence modalities of 50 frames, widths
300 / 74 / 35, variable lengths, regression, batch 32), each with ``plain``
and ``modalimmune`` (the configs' defaults). Measured in one run, per row:

* ``step``: the same jitted data-parallel step on a batch already on the
  device, ``--steps`` calls, one ``block_until_ready`` at the end (the
  device's pace);
* ``loop``: ``train.train_and_evaluate`` itself (checkpoints off, logging
  every 50 steps), steps/s from its own ``metrics.jsonl`` timestamps after
  the first log record (compilation excluded);
* ``old loop``: what the loop did before (host builds and transfers each
  batch, reads the non-finite flag back every step), for the before/after
  ratio on the same machine in the same run;
* ``1 seed`` / ``4 vmapped seeds``: the loop's step against the one-program
  step of 4 seeds that ``train.train_seeds`` runs
  (``make_parallel_step(seeds=True)``: the step counter shared, so
  ModalImmune's periodic ``lax.cond`` stay branches), alternated 3 times,
  medians; samples/s of each and the ratio;
* first step, cold and warm: the command line in a fresh process with an
  empty persistent compilation cache, then again with the cache it filled.

Ratios are what to compare across machines; absolute figures depend on the
machine and its load (the provenance is written beside them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "configs"))

import jax  # noqa: E402

from modalimmune_jax import train  # noqa: E402
from modalimmune_jax.config import with_overrides  # noqa: E402
from modalimmune_jax.provenance import markdown_lines, provenance  # noqa: E402
import numpy as np  # noqa: E402

from modalimmune_jax.step import (host_copy, make_parallel_step, shard_batch,  # noqa: E402
                                  stack_states)


def workloads():
  import mfeat
  import synthetic
  yield "mfeat", "experiments/configs/mfeat.py", {}, mfeat.get_config()
  over = {"data.synthetic.num_samples": (1024, 64, 64)}
  yield ("MOSI-shaped", "experiments/configs/synthetic.py:mosi_shaped", over,
         with_overrides(synthetic.get_config("mosi_shaped"), over))


def quick(config, steps, method):
  return with_overrides(config, {
      "method.name": method, "train.steps": steps,
      "train.log_every": 50 if steps >= 200 else max(steps // 4, 1),
      "train.eval_every": 0, "checkpoint.enabled": False, "eval.removals": "none",
      "eval.missing_rates": (), "eval.snrs_db": (), "eval.frame_rates": ()})


def fresh(state):
  return jax.tree.map(lambda x: x.copy(), state)  # the step donates its state


def step_rate(run, steps):
  state, rng = fresh(run.state), jax.random.key(0)
  batch = shard_batch(run.batches(0), run.mesh)
  state, m = run.step_fn(state, batch, rng)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for s in range(steps):
    state, m = run.step_fn(state, batch, jax.random.fold_in(rng, s))
  jax.block_until_ready((state, m))
  return steps / (time.perf_counter() - t0)


def old_loop_rate(run, steps):
  """The loop as it was: host batch, transfer, step, non-finite flag read back."""
  state, rng = fresh(run.state), jax.random.key(0)
  state, m = run.step_fn(state, shard_batch(run.batches(0), run.mesh), rng)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for s in range(1, steps + 1):
    state, m = run.step_fn(state, shard_batch(run.batches(s), run.mesh),
                           jax.random.fold_in(rng, s))
    bool(host_copy(m["nonfinite"]) > 0)
  jax.block_until_ready(state)
  return steps / (time.perf_counter() - t0)


def loop_rate(config, steps):
  workdir = tempfile.mkdtemp(prefix="bench-loop-")
  train.train_and_evaluate(config, workdir)
  logs = [json.loads(ln) for ln in open(os.path.join(workdir, "metrics.jsonl"))
          if '"split": "train"' in ln]
  (s0, t0), (s1, t1) = ((logs[0]["step"], logs[0]["seconds"]),
                        (logs[-1]["step"], logs[-1]["seconds"]))
  return (s1 - s0) / (t1 - t0)


def vmap_rates(config, steps, seeds=4, rounds=3):
  """samples/s of one seed (the loop's step) and of ``seeds`` seeds in the
  library's one-program step (``make_parallel_step(seeds=True)``, what
  ``train.train_seeds`` runs), alternated ``rounds`` times; the medians."""
  runs = [train.setup(with_overrides(config, {"seed": s})) for s in range(seeds)]
  lead = runs[0]
  many = make_parallel_step(lead.method, lead.optimizer, lead.mesh, seeds=True)
  batch1 = shard_batch(lead.batches(0), lead.mesh)
  batch = shard_batch(jax.tree.map(lambda *xs: np.stack(xs), *[r.batches(0) for r in runs]),
                      lead.mesh, seeds=True)
  keys = jax.numpy.stack([jax.random.key(s) for s in range(seeds)])
  state1 = fresh(lead.state)
  state = stack_states([fresh(r.state) for r in runs])
  state1, m = lead.step_fn(state1, batch1, keys[0])
  state, m = many(state, batch, keys)
  jax.block_until_ready((state1, state))
  rates = {"1": [], "many": []}
  for _ in range(rounds):
    t0 = time.perf_counter()
    for s in range(steps):
      state1, m = lead.step_fn(state1, batch1, jax.random.fold_in(keys[0], s))
    jax.block_until_ready((state1, m))
    rates["1"].append(steps * config.train.batch_size / (time.perf_counter() - t0))
    t0 = time.perf_counter()
    for _ in range(steps):
      state, m = many(state, batch, keys)
    jax.block_until_ready((state, m))
    rates["many"].append(seeds * steps * config.train.batch_size / (time.perf_counter() - t0))
  return float(np.median(rates["1"])), float(np.median(rates["many"]))


def first_step_cold_warm(config_arg, overrides, method):
  cache = tempfile.mkdtemp(prefix="bench-xla-cache-")
  out = []
  for attempt in ("cold", "warm"):
    workdir = tempfile.mkdtemp(prefix=f"bench-{attempt}-")
    args = [sys.executable, "-m", "modalimmune_jax.main", f"--config={config_arg}",
            f"--workdir={workdir}/run", f"--compile_cache={cache}",
            f"--config.method.name={method}", "--config.train.steps=2",
            "--config.checkpoint.enabled=False", "--config.eval.removals=none",
            "--config.eval.missing_rates=()", "--config.eval.snrs_db=()",
            "--config.train.log_every=1", "--config.train.eval_every=0"]
    args += [f"--config.{k}={v}" for k, v in overrides.items()]
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    subprocess.run(args, check=True, cwd=ROOT, env=env, capture_output=True)
    with open(os.path.join(workdir, "run", "results.json")) as f:
      out.append(json.load(f)["first_step_seconds"])
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--methods", default="plain,modalimmune")
  parser.add_argument("--out", default=os.path.join(HERE, "results", "bench_train"))
  args = parser.parse_args()
  rows = []
  for name, config_arg, overrides, base in workloads():
    for method in args.methods.split(","):
      config = quick(base, args.steps + 1, method)
      print(f"[{name} / {method}] step ...", file=sys.stderr, flush=True)
      run = train.setup(config)
      step = step_rate(run, args.steps)
      old = old_loop_rate(run, args.steps)
      print(f"[{name} / {method}] loop ...", file=sys.stderr, flush=True)
      loop = loop_rate(config, args.steps)
      print(f"[{name} / {method}] vmap ...", file=sys.stderr, flush=True)
      one, four = vmap_rates(config, max(args.steps // 4, 10))
      print(f"[{name} / {method}] first step ...", file=sys.stderr, flush=True)
      cold, warm = first_step_cold_warm(config_arg, {k: (v if not isinstance(v, tuple) else
                                                         f"({','.join(map(str, v))},)")
                                                     for k, v in overrides.items()}, method)
      rows.append({"workload": name, "method": method, "batch_size": config.train.batch_size,
                   "step_per_s": step, "loop_per_s": loop, "old_loop_per_s": old,
                   "loop_over_step": loop / step, "old_loop_over_step": old / step,
                   "samples_per_s_1": one, "samples_per_s_4_vmapped": four,
                   "vmap_gain": four / one, "first_step_cold_s": cold,
                   "first_step_warm_s": warm})
      print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
  prov = provenance(seed=0)
  lines = [
      "# Training throughput", "",
      *markdown_lines(prov, f"{jax.device_count()} device(s)"),
      f"- {args.steps} timed steps per rate, one run", "",
      "| workload | method | step/s (device batch) | loop step/s | loop / step | "
      "old loop / step | samples/s 1 seed | samples/s 4 vmapped | vmap gain | "
      "first step cold (s) | warm (s) |",
      "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(
        f"| {r['workload']} | {r['method']} | {r['step_per_s']:.1f} | {r['loop_per_s']:.1f} | "
        f"{r['loop_over_step']:.2f} | {r['old_loop_over_step']:.2f} | "
        f"{r['samples_per_s_1']:.0f} | {r['samples_per_s_4_vmapped']:.0f} | "
        f"{r['vmap_gain']:.2f} | {r['first_step_cold_s']:.1f} | {r['first_step_warm_s']:.1f} |")
  md = "\n".join(lines) + "\n"
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "bench_train.md"), "w") as f:
    f.write(md)
  with open(os.path.join(args.out, "bench_train.json"), "w") as f:
    json.dump({"rows": rows, "steps": args.steps, "provenance": prov}, f, indent=2,
              default=float)
  print(md)


if __name__ == "__main__":
  main()
