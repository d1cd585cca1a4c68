"""What each method's training step costs relative to plain, measured in one run.

    python experiments/bench_baselines.py [--data mfeat|synthetic] [--steps 100]
        [--repeats 3] [--out results/bench_baselines.json]

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
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_methods import copy_tree, get_config, log  # noqa: E402

from modalimmune_jax import train  # noqa: E402
from modalimmune_jax.config import validate_config  # noqa: E402
from modalimmune_jax.provenance import markdown_lines, provenance  # noqa: E402
from modalimmune_jax.step import shard_batch  # noqa: E402

METHODS = ("plain", "dropout", "consistency", "ebr", "distill", "cmpt", "modalimmune")
HERE = os.path.dirname(os.path.abspath(__file__))


def bench(args):
  configs = {}
  for method in METHODS:
    config = get_config(args.data)
    config.method.name = method
    validate_config(config)
    configs[method] = config
  dataset = train.load_data(configs["plain"])
  total = configs["plain"].train.steps
  starts = (2, total // 2 + 2)
  base_rng = jax.random.key(0)
  runs, states, first = {}, {}, {}
  for method in METHODS:
    log(f"setup {method}")
    run = train.setup(configs[method], dataset=dataset)
    state = run.state
    t = []
    for s in range(2):  # compile, then one untimed step
      t0 = time.perf_counter()
      state, metrics = run.step_fn(state, shard_batch(run.batches(s), run.mesh),
                                   jax.random.fold_in(base_rng, s))
      jax.block_until_ready((state, metrics))
      t.append(time.perf_counter() - t0)
    log(f"  first step {t[0]:.1f} s, second {t[1] * 1e3:.1f} ms")
    snapshots = {starts[0]: copy_tree(state)}
    for s in range(starts[0], starts[1]):  # on to the second window, untimed
      state, metrics = run.step_fn(state, shard_batch(run.batches(s), run.mesh),
                                   jax.random.fold_in(base_rng, s))
    snapshots[starts[1]] = copy_tree(jax.block_until_ready(state))
    runs[method], states[method], first[method] = run, snapshots, t

  plain = runs["plain"]
  log(f"placing {args.steps} batches on the device")
  batches = jax.block_until_ready([shard_batch(plain.batches(s), plain.mesh)
                                   for s in range(2, args.steps + 2)])
  keys = jax.block_until_ready([jax.random.fold_in(base_rng, s)
                                for s in range(2, args.steps + 2)])
  times = {(m, w): [] for m in METHODS for w in starts}
  for r in range(args.repeats):
    order = METHODS[r % len(METHODS):] + METHODS[:r % len(METHODS)]
    for method in order:
      step_fn = runs[method].step_fn
      for start in starts:
        state = jax.block_until_ready(copy_tree(states[method][start]))
        t0 = time.perf_counter()
        for batch, key in zip(batches, keys):
          state, metrics = step_fn(state, batch, key)
        jax.block_until_ready((state, metrics))
        times[method, start].append((time.perf_counter() - t0) / args.steps * 1e3)
      log(f"round {r + 1}/{args.repeats} {method}: "
          + ", ".join(f"{times[method, w][-1]:.2f}" for w in starts) + " ms/step")

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


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", default="mfeat", choices=("mfeat", "synthetic"))
  parser.add_argument("--steps", type=int, default=100, help="W timed steps per window")
  parser.add_argument("--repeats", type=int, default=3, help="R rounds")
  parser.add_argument("--out", default=None, help="JSON path (results/bench_baselines"
                      "[_DATA].json); the table goes next to it as .md")
  args = parser.parse_args()
  if args.out is None:
    suffix = "" if args.data == "mfeat" else f"_{args.data}"
    args.out = os.path.join(HERE, "results", f"bench_baselines{suffix}.json")
  record = bench(args)
  record["provenance"] = prov = provenance(seed=0)
  text = render(record)
  print("\n" + text)
  head = [f"# bench_baselines ({record['setup']['data']})", "", *markdown_lines(prov), ""]
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(record, f, indent=2, default=float)
  with open(os.path.splitext(args.out)[0] + ".md", "w") as f:
    f.write("\n".join(head) + "\n" + text)


if __name__ == "__main__":
  main()
