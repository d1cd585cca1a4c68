"""Fault injection: kill a training run at random moments, corrupt its newest
checkpoint at random, resume each time, and compare with the uninterrupted run.

    python experiments/fault_injection.py [--kills 20] [--corruptions 5] [--steps 150]
        [--seed 0] [--out DIR]
    python experiments/fault_injection.py --quick   # smoke run: 30 steps, 2 kills, 1 corruption

The run: ``configs/synthetic.py:smoke`` for 150 steps (``--steps``) with a
checkpoint every step (so kills land inside checkpoint writes too). Each round
starts the command line, waits a random 0-1.5 s after training starts, and
sends SIGKILL (or, on a corruption round, lets the run go on a moment,
overwrites the files of its newest checkpoint, and reruns). At the end the
run is finished and its final train state (parameters, optimiser and method
state), restored with the library's ``Checkpointer``, compared bit for bit
with an uninterrupted run of the same command. Writes
``OUT/fault_injection.json`` (``--out``, default
``experiments/results/fault_injection``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np

from harness import ROOT, log, parser, restore, run_config, write_results


def command(steps: int) -> list[str]:
  return [sys.executable, "-m", "modalimmune_jax.main",
          "--config=experiments/configs/synthetic.py:smoke", f"--config.train.steps={steps}",
          "--config.checkpoint.every=1", "--config.train.log_every=1",
          "--config.eval.removals=none", "--config.eval.missing_rates=()",
          "--config.eval.snrs_db=()"]


def start(args, workdir, cache):
  return subprocess.Popen([*command(args.steps), f"--workdir={workdir}",
                           f"--compile_cache={cache}"], cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def steps_saved(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def final_state(workdir):
  """``(step, state)`` of the run's newest checkpoint, under its own config."""
  _, step, state = restore(run_config(workdir), workdir)
  return step, state


def fault_round(args, kind, work, cache, rng) -> dict:
  """Starts the run, kills it a random moment after it saved a checkpoint, and on
  a corruption round overwrites the newest checkpoint's files with garbage."""
  before = steps_saved(work)
  proc = start(args, work, cache)
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
  ckpts = os.path.join(work, "checkpoints")
  partial = [n for n in os.listdir(ckpts) if "tmp" in n] if os.path.isdir(ckpts) else []
  entry["partial_writes_left"] = len(partial)
  return entry


def main(argv=None) -> int:
  p = parser(__doc__, "fault_injection")
  p.add_argument("--kills", type=int, default=None, help="(20; --quick 2)")
  p.add_argument("--corruptions", type=int, default=None, help="(5; --quick 1)")
  p.add_argument("--steps", type=int, default=None, help="(150; --quick 30)")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  pick = lambda value, full, small: value if value is not None else (small if args.quick else full)
  args.kills, args.corruptions = pick(args.kills, 20, 2), pick(args.corruptions, 5, 1)
  args.steps = pick(args.steps, 150, 30)
  rng = np.random.default_rng(args.seed)
  tmp = tempfile.mkdtemp(prefix="faults-")
  cache = os.path.join(tmp, "xla")
  ref_dir, work = os.path.join(tmp, "reference"), os.path.join(tmp, "faulty")
  log("the uninterrupted run")
  assert start(args, ref_dir, cache).wait() == 0
  rounds = ["kill"] * args.kills + ["corrupt"] * args.corruptions
  rng.shuffle(rounds)
  history = []
  for i, kind in enumerate(rounds, 1):
    history.append(fault_round(args, kind, work, cache, rng))
    log(f"round {i}/{len(rounds)}: {json.dumps(history[-1])}")
  done = start(args, work, cache)
  _, err = done.communicate()
  assert done.returncode == 0, err[-2000:]
  (step_a, a), (step_b, b) = final_state(work), final_state(ref_dir)
  identical = step_a == step_b == args.steps and all(
      np.array_equal(np.asarray(x), np.asarray(y))
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  aside_dir = os.path.join(work, "checkpoints.aside")
  aside = os.listdir(aside_dir) if os.path.isdir(aside_dir) else []
  summary = {"kills": sum(e["kind"] == "kill" and e["returncode"] == -9 for e in history),
             "corruptions": sum(e["kind"] == "corrupt" for e in history),
             "kills_with_partial_write": sum(e["partial_writes_left"] > 0 for e in history),
             "moved_aside": len(aside), "final_step": int(step_a),
             "final_state_bit_identical": bool(identical), "rounds": history,
             "command": " ".join(command(args.steps)[1:])}
  write_results(args.out, "fault_injection", summary, seed=args.seed)
  print({k: v for k, v in summary.items() if k not in ("rounds", "command")})
  shutil.rmtree(tmp, ignore_errors=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
