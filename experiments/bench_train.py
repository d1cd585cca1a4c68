"""Training throughput: the loop against its step, seeds under vmap, compilation.

    python experiments/bench_train.py [--steps 200] [--methods plain,modalimmune] [--out DIR]
    python experiments/bench_train.py --quick    # smoke run: plain only, 8 steps

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
machine and its load (the provenance is written beside them). Writes
``OUT/bench_train.{json,md}`` (``--out``, default
``experiments/results/bench_train``). ``--quick``: ``plain`` only (unless
``--methods``), 8 steps per rate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import jax
import numpy as np

from harness import (ROOT, alternate, bench_config, copy_tree, get_config, log,
                     loop_steps_per_s, parser, step_rate, timed_steps, write_results)
from modalimmune_jax import train
from modalimmune_jax.config import with_overrides
from modalimmune_jax.step import host_copy, make_parallel_step, shard_batch, stack_states


def workloads():
  """``(name, --config argument, overrides, config)`` of each workload."""
  yield "mfeat", "experiments/configs/mfeat.py", {}, get_config("mfeat")
  over = {"data.synthetic.num_samples": (1024, 64, 64)}
  yield ("MOSI-shaped", "experiments/configs/synthetic.py:mosi_shaped", over,
         get_config("synthetic", "mosi_shaped", overrides=over))


def old_loop_rate(run, steps):
  """The loop as it was: host batch, transfer, step, non-finite flag read back."""
  rng = jax.random.key(0)
  state = timed_steps(run.step_fn, copy_tree(run.state),
                      [(shard_batch(run.batches(0), run.mesh), rng)]).state  # compile

  def host_inputs():
    for s in range(1, steps + 1):
      yield shard_batch(run.batches(s), run.mesh), jax.random.fold_in(rng, s)

  def step_fn(state, batch, key):
    state, m = run.step_fn(state, batch, key)
    bool(host_copy(m["nonfinite"]) > 0)
    return state, m
  return steps / timed_steps(step_fn, state, host_inputs()).seconds


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
  state = {"1": timed_steps(lead.step_fn, copy_tree(lead.state), [(batch1, keys[0])]).state,
           "many": timed_steps(many, stack_states([copy_tree(r.state) for r in runs]),
                               [(batch, keys)]).state}  # compiled
  inputs = {"1": lambda: ((batch1, jax.random.fold_in(keys[0], s)) for s in range(steps)),
            "many": lambda: ((batch, keys) for _ in range(steps))}
  samples = {"1": steps * config.train.batch_size,
             "many": seeds * steps * config.train.batch_size}

  def job(name, step_fn):
    def rate():
      timed = timed_steps(step_fn, state[name], inputs[name]())
      state[name] = timed.state
      return samples[name] / timed.seconds
    return rate

  rates = alternate({"1": job("1", lead.step_fn), "many": job("many", many)}, rounds)
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


def main(argv=None) -> int:
  p = parser(__doc__, "bench_train")
  p.add_argument("--steps", type=int, default=None, help="timed steps per rate (200)")
  p.add_argument("--methods", default=None, help="(plain,modalimmune; --quick: plain)")
  args = p.parse_args(argv)
  args.steps = args.steps or (8 if args.quick else 200)
  args.methods = args.methods or ("plain" if args.quick else "plain,modalimmune")
  rows = []
  for name, config_arg, overrides, base in workloads():
    for method in args.methods.split(","):
      config = bench_config(base, args.steps + 1, method)
      log(f"[{name} / {method}] step ...")
      run = train.setup(config)
      step = step_rate(run, args.steps)
      old = old_loop_rate(run, args.steps)
      log(f"[{name} / {method}] loop ...")
      loop = loop_steps_per_s(config)
      log(f"[{name} / {method}] vmap ...")
      one, four = vmap_rates(config, max(args.steps // 4, 10))
      log(f"[{name} / {method}] first step ...")
      cold, warm = first_step_cold_warm(config_arg, {k: (v if not isinstance(v, tuple) else
                                                         f"({','.join(map(str, v))},)")
                                                     for k, v in overrides.items()}, method)
      rows.append({"workload": name, "method": method, "batch_size": config.train.batch_size,
                   "step_per_s": step, "loop_per_s": loop, "old_loop_per_s": old,
                   "loop_over_step": loop / step, "old_loop_over_step": old / step,
                   "samples_per_s_1": one, "samples_per_s_4_vmapped": four,
                   "vmap_gain": four / one, "first_step_cold_s": cold,
                   "first_step_warm_s": warm})
      log(json.dumps(rows[-1]))
  lines = [
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
  write_results(args.out, "bench_train", {"rows": rows, "steps": args.steps}, lines,
                title="Training throughput", details=(f"{jax.device_count()} device(s)",),
                seed=0)
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
