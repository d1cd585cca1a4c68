"""What each method's training step costs relative to plain, on mfeat and MOSI-shaped data, in one run.

    python experiments/bench_baselines.py [--workloads mfeat MOSI-shaped] [--steps W]
        [--repeats 3] [--out DIR]
    python experiments/bench_baselines.py --quick    # smoke sizes, W=4, R=1

Workloads (``harness.bench_workloads``, as in ``bench_methods.py``):
``configs/mfeat.py`` and MOSI-shaped synthetic data
(``configs/synthetic.py:mosi_shaped`` with ModalImmune's periods of
``configs/mosi.py``). For each of the seven methods of
``experiments/baselines.sh`` (the config's defaults, ``method.name`` set), the
data-parallel step of :func:`modalimmune_jax.train.setup` on the same model,
data and batch size: compiled (first step, wall time) and stepped once
untimed; every periodic program called once (no timed window compiles one);
then ``W`` warm steps timed with the batches and keys already on the device
(``step_fn(state, batch, key, step)``, ``block_until_ready`` at the end), in two
windows: from the state after step 2 and from the state after step
``train.steps / 2 + 2`` (trained to there, untimed), because distillation
trains its teacher and CMPT pre-trains plainly in the first half and both
change their step after it. Each window starts from a copy of its state, so
every round times the same steps. ``W`` (``harness.amortising_window``) is the
smallest multiple of ModalImmune's periods of at least 100 steps (mfeat 100,
MOSI's periods 250), so ModalImmune's windows hold each periodic part as often
as training does. ``R`` (``--repeats``) rounds, the methods alternated (the
order rotated each round); per window the median over rounds, and the run's
cost per step is the mean of the two windows. Ratios to plain are the figures
to compare across machines. Beside them each method's arithmetic: XLA's cost
analysis of its compiled train step plus each periodic program over its period
(``harness.step_gflops``), against plain's: what the method's definition
costs before any time is measured.

Writes ``OUT/bench_baselines.{json,md}`` with provenance (``--out``, default
``experiments/results/bench_baselines``).
"""

from __future__ import annotations

import os
import statistics

import jax

from harness import (alternate, amortising_window, bench_workloads, compile_periodic,
                     copy_tree, host_steps, log, parser, step_gflops, timed_steps, window_inputs,
                     workload_flags, write_results)
from modalimmune_jax import methods, train
from modalimmune_jax.config import with_overrides

METHODS = methods.BUILTIN  # plain, dropout, consistency, ebr, distill, cmpt, modalimmune


def bench(args, workload):
  configs = {m: with_overrides(workload.config, {"method.name": m}) for m in METHODS}
  steps = args.steps or amortising_window(workload.config, 4 if args.quick else 100)
  dataset = train.load_data(configs["plain"])
  total = configs["plain"].train.steps
  starts = (2, total // 2 + 2)
  base_rng = jax.random.key(0)
  runs, states, first, inputs = {}, {}, {}, None
  for method in METHODS:
    log(f"[{workload.name}] setup {method}")
    run = train.setup(configs[method], dataset=dataset)
    state, _, t = host_steps(run, run.state, base_rng, range(2), timed=True)  # compile, one more
    log(f"  first step {t[0]:.1f} s, second {t[1] * 1e3:.1f} ms")
    if inputs is None:
      inputs = window_inputs(run, 2, steps, base_rng)
    compile_periodic(run, state, *inputs[0][:2], [s for _, _, s in inputs])
    snapshots = {starts[0]: copy_tree(state)}
    state, _, _ = host_steps(run, state, base_rng, range(*starts))  # to the second window
    snapshots[starts[1]] = copy_tree(state)
    runs[method], states[method], first[method] = run, snapshots, t

  plain = runs["plain"]

  def job(method):
    def both_windows():
      ms = []
      for start in starts:
        state = jax.block_until_ready(copy_tree(states[method][start]))
        ms.append(timed_steps(runs[method].step_fn, state, inputs).seconds / steps * 1e3)
      log(f"  {method}: " + ", ".join(f"{x:.2f}" for x in ms) + " ms/step")
      return ms
    return both_windows

  rounds = alternate({m: job(m) for m in METHODS}, args.repeats)
  times = {(m, w): [r[i] for r in rounds[m]] for m in METHODS for i, w in enumerate(starts)}
  rows = []
  for method in METHODS:
    halves = [statistics.median(times[method, w]) for w in starts]
    rows.append({"method": method, "first_step_s": first[method][0],
                 "ms_per_step_halves": halves, "ms_per_step": sum(halves) / 2,
                 "ms_per_round": {str(w): times[method, w] for w in starts}})
  log(f"[{workload.name}] FLOPs of each method's programs (XLA cost analysis of the compiled programs)")
  batch, key, _ = inputs[0]
  for row in rows:
    row["gflops"] = step_gflops(runs[row["method"]], states[row["method"]][starts[0]], batch,
                                key)
  plain_ms, plain_gf = rows[0]["ms_per_step"], rows[0]["gflops"]["amortised"]
  for row in rows:
    row["ratio_to_plain"] = row["ms_per_step"] / plain_ms
    row["flop_ratio_to_plain"] = row["gflops"]["amortised"] / plain_gf
  return {"setup": {"workload": workload.name, "source": workload.source,
                    "overrides": workload.overrides, "data": dataset.name,
                    "platform": jax.devices()[0].platform,
                    "devices": plain.mesh.devices.size, "cpus": len(os.sched_getaffinity(0)),
                    "batch_size": configs["plain"].train.batch_size, "steps": steps,
                    "repeats": args.repeats, "window_starts": list(starts)},
          "rows": rows}


def render_workload(record):
  s = record["setup"]
  a, b = s["window_starts"]
  out = [f"## {s['workload']}", "", f"{s['source']}.", "",
         f"Cost per training step on {s['data']} ({s['platform']}, {s['cpus']} CPUs, "
         f"{s['devices']} device(s), batch {s['batch_size']}, the config's defaults): "
         f"{s['steps']} warm steps from step {a} and from step {b}, median over "
         f"{s['repeats']} round-robin rounds each; per step: the mean of the two.", "",
         f"| method | first step (s) | ms/step from {a} | ms/step from {b} | ms/step "
         "| x plain | GFLOP/step | FLOPs x plain |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for r in record["rows"]:
    h = r["ms_per_step_halves"]
    gf = (f"{r['gflops']['amortised']:.4f} | {r['flop_ratio_to_plain']:.2f}" if "gflops" in r
          else "- | -")
    out.append(f"| {r['method']} | {r['first_step_s']:.1f} | {h[0]:.2f} | {h[1]:.2f} | "
               f"{r['ms_per_step']:.2f} | {r['ratio_to_plain']:.2f} | {gf} |")
  return out + ["", "GFLOP/step: XLA's cost analysis of the method's compiled train step "
                "(lax.cond branches as XLA counts them) plus each periodic program's per call "
                "over its period (`harness.step_gflops`); FLOPs x plain: what the arithmetic "
                "alone makes the step cost.", ""]


def render(records):
  rows = {w["setup"]["workload"]: {r["method"]: r["ratio_to_plain"] for r in w["rows"]}
          for w in records}
  out = ["## Summary: ms/step against plain", "",
         "| method | " + " | ".join(rows) + " |", "|---|" + "---:|" * len(rows)]
  for method in METHODS:
    out.append(f"| {method} | " + " | ".join(f"{rows[w][method]:.2f}" for w in rows) + " |")
  out.append("")
  for w in records:
    out += render_workload(w)
  return "\n".join(out)


def main(argv=None) -> int:
  p = parser(__doc__, "bench_baselines")
  workload_flags(p)
  p.add_argument("--repeats", type=int, default=None, help="R rounds (3; --quick 1)")
  args = p.parse_args(argv)
  args.repeats = args.repeats or (1 if args.quick else 3)
  records = [bench(args, w) for w in bench_workloads(args.quick) if w.name in args.workloads]
  text = render(records)
  print("\n" + text)
  write_results(args.out, "bench_baselines", {"workloads": records}, text.splitlines(),
                title="bench_baselines: every method's step against plain", seed=0)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
