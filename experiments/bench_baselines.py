"""What each method's training step costs relative to plain, measured in one run.

    python experiments/bench_baselines.py [--data mfeat|synthetic] [--steps 100]
        [--repeats 3] [--out DIR]
    python experiments/bench_baselines.py --quick    # smoke run: smoke config, W=5, R=1

For each of the seven methods of ``experiments/baselines.sh`` (the config's
defaults, ``method.name`` set), the data-parallel step of
:func:`modalimmune_jax.train.setup` on the same model, data and batch size:
compiled (first step, wall time) and stepped once untimed; then ``W``
(``--steps``) warm steps timed with the batches and keys already on the device,
``block_until_ready`` at the end, in two windows: from the state after step 2
and from the state after step ``train.steps / 2 + 2`` (trained to there,
untimed), because distillation trains its teacher and CMPT pre-trains plainly
in the first half and both change their step after it. Each window starts
from a copy of its state, so every round times the same steps. ``R``
(``--repeats``) rounds,
round-robin over the methods (the order rotated each round); per window the
median over rounds, and the run's cost per step is the mean of the two
windows. Ratios to plain are the figures to compare across machines.

With ``W = 100`` ModalImmune's windows hold 2 hyper-steps and 10 controller
and curvature-mask refreshes at the mfeat config's periods (amortised as in
training).

Writes ``OUT/bench_baselines[_DATA].{json,md}`` with provenance (``--out``,
default ``experiments/results/bench_baselines``). ``--quick``: the config's
``smoke`` variant (12 steps, a small model), ``W = 5``, ``R = 1``.
"""

from __future__ import annotations

import os
import statistics

import jax

from harness import (alternate, copy_tree, device_inputs, get_config, host_steps, log,
                     parser, timed_steps, write_results)
from modalimmune_jax import methods, train

METHODS = methods.BUILTIN  # plain, dropout, consistency, ebr, distill, cmpt, modalimmune


def bench(args):
  configs = {m: get_config(args.data, args.variant, overrides={"method.name": m})
             for m in METHODS}
  dataset = train.load_data(configs["plain"])
  total = configs["plain"].train.steps
  starts = (2, total // 2 + 2)
  base_rng = jax.random.key(0)
  runs, states, first = {}, {}, {}
  for method in METHODS:
    log(f"setup {method}")
    run = train.setup(configs[method], dataset=dataset)
    state, _, t = host_steps(run, run.state, base_rng, range(2), timed=True)  # compile, one more
    log(f"  first step {t[0]:.1f} s, second {t[1] * 1e3:.1f} ms")
    snapshots = {starts[0]: copy_tree(state)}
    state, _, _ = host_steps(run, state, base_rng, range(*starts))  # to the second window
    snapshots[starts[1]] = copy_tree(state)
    runs[method], states[method], first[method] = run, snapshots, t

  plain = runs["plain"]
  log(f"placing {args.steps} batches on the device")
  inputs = device_inputs(plain, range(2, args.steps + 2), base_rng)

  def job(method):
    def both_windows():
      ms = []
      for start in starts:
        state = jax.block_until_ready(copy_tree(states[method][start]))
        ms.append(timed_steps(runs[method].step_fn, state, inputs).seconds / args.steps * 1e3)
      log(f"{method}: " + ", ".join(f"{x:.2f}" for x in ms) + " ms/step")
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
  plain_ms = rows[0]["ms_per_step"]
  for row in rows:
    row["ratio_to_plain"] = row["ms_per_step"] / plain_ms
  return {"setup": {"data": dataset.name, "platform": jax.devices()[0].platform,
                    "devices": plain.mesh.devices.size, "cpus": len(os.sched_getaffinity(0)),
                    "batch_size": configs["plain"].train.batch_size, "steps": args.steps,
                    "repeats": args.repeats, "window_starts": list(starts)},
          "rows": rows}


def render(record):
  s = record["setup"]
  a, b = s["window_starts"]
  out = [f"Cost per training step on {s['data']} ({s['platform']}, {s['cpus']} CPUs, "
         f"{s['devices']} device(s), batch {s['batch_size']}, the config's defaults): "
         f"{s['steps']} warm steps from step {a} and from step {b}, median over "
         f"{s['repeats']} round-robin rounds each; per step: the mean of the two.", "",
         f"| method | first step (s) | ms/step from {a} | ms/step from {b} | ms/step "
         "| x plain |", "|---|---:|---:|---:|---:|---:|"]
  for r in record["rows"]:
    h = r["ms_per_step_halves"]
    out.append(f"| {r['method']} | {r['first_step_s']:.1f} | {h[0]:.2f} | {h[1]:.2f} | "
               f"{r['ms_per_step']:.2f} | {r['ratio_to_plain']:.2f} |")
  return "\n".join(out) + "\n"


def main(argv=None) -> int:
  p = parser(__doc__, "bench_baselines")
  p.add_argument("--data", default="mfeat", choices=("mfeat", "synthetic"))
  p.add_argument("--steps", type=int, default=None, help="W timed steps per window (100)")
  p.add_argument("--repeats", type=int, default=None, help="R rounds (3)")
  args = p.parse_args(argv)
  args.steps = args.steps or (5 if args.quick else 100)
  args.repeats = args.repeats or (1 if args.quick else 3)
  args.variant = "smoke" if args.quick else ""
  record = bench(args)
  text = render(record)
  print("\n" + text)
  name = "bench_baselines" + ("" if args.data == "mfeat" else f"_{args.data}")
  write_results(args.out, name, record, text.splitlines(),
                title=f"bench_baselines ({record['setup']['data']})", seed=0)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
