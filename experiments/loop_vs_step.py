"""The training loop against its own step, alternated, on UCI Multiple Features.

    python experiments/loop_vs_step.py [--steps 600] [--rounds 3] [--method plain] [--out DIR]
    python experiments/loop_vs_step.py --quick     # smoke run: 8 steps, 1 round

``bench_train.py`` measures the loop and the step once each; on a shared
2-core machine one pair is noisy, and at its default length a few logging
intervals weigh in. This alternates the two ``--rounds`` times (the order
rotated each round) and reports the medians: ``step`` is the jitted step on a
batch already on the device (one ``block_until_ready`` at the end); ``loop``
is ``train.train_and_evaluate`` itself (checkpoints and validation off, a log
record every 50 steps), steps/s from its ``metrics.jsonl`` timestamps after
the first record. Writes ``OUT/loop_vs_step.json`` (``--out``, default
``experiments/results/loop_vs_step``).
"""

from __future__ import annotations

import numpy as np

from harness import (alternate, bench_config, get_config, log, loop_steps_per_s, parser,
                     step_rate, write_results)
from modalimmune_jax import train


def main(argv=None) -> int:
  p = parser(__doc__, "loop_vs_step")
  p.add_argument("--steps", type=int, default=None, help="steps per measurement (600)")
  p.add_argument("--rounds", type=int, default=None, help="(3)")
  p.add_argument("--method", default="plain")
  args = p.parse_args(argv)
  args.steps = args.steps or (8 if args.quick else 600)
  args.rounds = args.rounds or (1 if args.quick else 3)
  config = bench_config(get_config("mfeat"), args.steps + 1, args.method)
  run = train.setup(config)

  def job(name, measure):
    def rate():
      value = measure()
      log(f"{name}: {value:.1f} steps/s")
      return value
    return rate

  rates = alternate({"step": job("step", lambda: step_rate(run, args.steps)),
                     "loop": job("loop", lambda: loop_steps_per_s(config))}, args.rounds)
  step, loop = (float(np.median(rates[k])) for k in ("step", "loop"))
  record = {"method": args.method, "steps": args.steps, "rounds": rates,
            "step_per_s": step, "loop_per_s": loop, "loop_over_step": loop / step}
  write_results(args.out, "loop_vs_step", record, seed=0)
  print(f"loop {loop:.1f} steps/s against step {step:.1f}: {loop / step:.2f}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
