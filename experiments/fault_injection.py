"""Fault injection: kill a training run at random moments, corrupt its newest
checkpoint at random, resume each time, and compare with the uninterrupted run.

    python experiments/fault_injection.py [--kills 20] [--corruptions 5] [--out experiments/results/fault_injection]

The run: ``configs/synthetic.py:smoke`` for 150 steps with a checkpoint every
step (so kills land inside checkpoint writes too). Each round starts the
command line, waits a random 0-2 s after training starts, and sends SIGKILL
(or, on a corruption round, lets the run finish a few steps, overwrites the
files of its newest checkpoint, and reruns). At the end the run is finished
and its final train state (parameters, optimiser and method state) compared
bit for bit with an uninterrupted run of the same command.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from modalimmune_jax.provenance import provenance  # noqa: E402

ARGS = ["--config=experiments/configs/synthetic.py:smoke", "--config.train.steps=150",
        "--config.checkpoint.every=1", "--config.train.log_every=1",
        "--config.eval.removals=none", "--config.eval.missing_rates=()",
        "--config.eval.snrs_db=()"]


def start(workdir, cache):
  return subprocess.Popen([sys.executable, "-m", "modalimmune_jax.main", *ARGS,
                           f"--workdir={workdir}", f"--compile_cache={cache}"], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def steps_saved(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def final_state(workdir):
  from tests.helpers import get_config, restore_state
  config = get_config()
  config.train.steps = 150
  config.checkpoint.every = 1
  config.train.log_every = 1
  config.eval.removals, config.eval.missing_rates, config.eval.snrs_db = "none", (), ()
  return restore_state(config, workdir)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--kills", type=int, default=20)
  parser.add_argument("--corruptions", type=int, default=5)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=os.path.join(HERE, "results", "fault_injection"))
  args = parser.parse_args()
  rng = np.random.default_rng(args.seed)
  tmp = tempfile.mkdtemp(prefix="faults-")
  cache = os.path.join(tmp, "xla")
  ref_dir, work = os.path.join(tmp, "reference"), os.path.join(tmp, "faulty")
  assert start(ref_dir, cache).wait() == 0
  rounds = ["kill"] * args.kills + ["corrupt"] * args.corruptions
  rng.shuffle(rounds)
  log = []
  for kind in rounds:
    before = steps_saved(work)
    proc = start(work, cache)
    t0 = time.time()
    while time.time() - t0 < 120 and proc.poll() is None:
      if os.path.isfile(os.path.join(work, "metrics.jsonl")) and steps_saved(work) != before:
        break
      time.sleep(0.01)
    delay = float(rng.uniform(0.0, 1.5 if kind == "kill" else 0.3))
    time.sleep(delay)
    proc.kill()  # SIGKILL; on a corruption round the newest checkpoint is then damaged
    proc.wait()
    saved = steps_saved(work)
    entry = {"kind": kind, "delay_s": round(delay, 3), "returncode": proc.returncode,
             "newest_checkpoint": saved[-1] if saved else None}
    if kind == "corrupt" and saved:
      for root, _, files in os.walk(os.path.join(work, "checkpoints", str(saved[-1]))):
        for f in files:
          with open(os.path.join(root, f), "wb") as fh:
            fh.write(b"\x00garbage")
    partial = [n for n in os.listdir(os.path.join(work, "checkpoints"))
               if "tmp" in n] if os.path.isdir(os.path.join(work, "checkpoints")) else []
    entry["partial_writes_left"] = len(partial)
    log.append(entry)
    print(json.dumps(entry), flush=True)
  done = start(work, cache)
  _, err = done.communicate()
  assert done.returncode == 0, err[-2000:]
  (step_a, a), (step_b, b) = final_state(work), final_state(ref_dir)
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  identical = step_a == step_b == 150 and all(
      np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(leaves_a, leaves_b))
  aside = os.listdir(os.path.join(work, "checkpoints.aside")) \
      if os.path.isdir(os.path.join(work, "checkpoints.aside")) else []
  summary = {"kills": sum(e["kind"] == "kill" and e["returncode"] == -9 for e in log),
             "corruptions": sum(e["kind"] == "corrupt" for e in log),
             "kills_with_partial_write": sum(e["partial_writes_left"] > 0 for e in log),
             "moved_aside": len(aside), "final_step": int(step_a),
             "final_state_bit_identical": bool(identical), "rounds": log,
             "provenance": provenance(seed=args.seed)}
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "fault_injection.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print({k: v for k, v in summary.items() if k not in ("rounds", "provenance")})
  shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
