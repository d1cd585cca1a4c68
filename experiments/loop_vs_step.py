"""The training loop against its own step, alternated, on UCI Multiple Features.

    python experiments/loop_vs_step.py [--steps 600] [--rounds 3] [--method plain]

``bench_train.py`` measures the loop and the step once each; on a shared
2-core machine one pair is noisy, and at its default length a few logging
intervals weigh in. This alternates the two ``--rounds`` times and reports the
medians: ``step`` is the jitted step on a batch already on the device (one
``block_until_ready`` at the end); ``loop`` is ``train.train_and_evaluate``
itself (checkpoints and validation off, a log record every 50 steps), steps/s
from its ``metrics.jsonl`` timestamps after the first record.
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "configs"))

import numpy as np  # noqa: E402

import bench_train  # noqa: E402
import mfeat  # noqa: E402
from modalimmune_jax import train  # noqa: E402
from modalimmune_jax.provenance import provenance  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--method", default="plain")
  args = parser.parse_args()
  config = bench_train.quick(mfeat.get_config(), args.steps + 1, args.method)
  config.train.log_every = 50
  run = train.setup(config)
  rates = {"step": [], "loop": []}
  for r in range(args.rounds):
    rates["step"].append(bench_train.step_rate(run, args.steps))
    rates["loop"].append(bench_train.loop_rate(config, args.steps))
    print(f"round {r}: step {rates['step'][-1]:.1f}/s, loop {rates['loop'][-1]:.1f}/s",
          file=sys.stderr, flush=True)
  step, loop = (float(np.median(rates[k])) for k in ("step", "loop"))
  print(json.dumps({"method": args.method, "steps": args.steps, "rounds": rates,
                    "step_per_s": step, "loop_per_s": loop, "loop_over_step": loop / step,
                    "provenance": provenance(seed=0)}, indent=2))


if __name__ == "__main__":
  main()
