"""Soak run: a MOSEI-sized synthetic data set trained for thousands of steps with
checkpoints; records peak memory, memory over time and steps per second, and
checks that nothing grows without bound.

    python experiments/soak.py [--steps 3000] [--method plain] [--workdir DIR] [--out DIR]
    python experiments/soak.py --quick     # smoke run: 1000 samples, 60 steps

Data: 16k training samples (500 valid, 500 test), three sequence modalities of
50 frames with widths 768 / 74 / 35 (text / audio / vision, MOSEI's), variable
lengths, regression; the model and optimiser of ``configs/synthetic.py``,
batch 32, a checkpoint every 500 steps (2 kept), validation every 1000 steps.
The training split (2.8 GB of float32) lives on the device, as in any run.
Memory is the process's resident set size (``/proc/self/status`` VmRSS),
sampled every 0.5 s by a thread; speed comes from the loop's own
``metrics.jsonl`` (a record every 50 steps with its wall time). Growth is
judged on the second half of the run (after compilation and the first
checkpoints): the fitted RSS slope in MB per 1000 steps. Writes
``OUT/soak.{json,md,png}`` (``--out``, default ``experiments/results/soak``);
the run itself goes to ``--workdir`` (``/tmp/modalimmune_soak``, emptied
first). ``--quick``: 1000 training samples, 60 steps with a record every 10,
a checkpoint every 20 and validation every 30.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time

import numpy as np

from harness import get_config, log, parser, train_logs, write_results
from modalimmune_jax import train


def status_mb(field: str) -> float:
  """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MB."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024.0
  return float("nan")


def soak_config(steps: int, method: str, quick: bool = False):
  """MOSEI-sized synthetic data; with ``quick`` 1000 training samples and the
  periods scaled to a 60-step run."""
  every = (10, 30, 20) if quick else (50, 1000, 500)  # log, validation, checkpoint
  config = get_config("synthetic", "mosi_shaped", overrides={
      "data.synthetic.num_samples": (1000, 100, 100) if quick else (16000, 500, 500),
      "method.name": method, "train.steps": steps, "train.log_every": every[0],
      "train.eval_every": every[1], "checkpoint.every": every[2],
      "checkpoint.max_to_keep": 2, "eval.missing_rates": (0.5,), "eval.snrs_db": (),
      "eval.removals": "drop_one"})
  config.data.synthetic.shapes = {"text": (50, 768), "audio": (50, 74), "vision": (50, 35)}
  return config


def dir_mb(path: str) -> float:
  total = 0
  for root, _, files in os.walk(path):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total / 2 ** 20


def main(argv=None) -> int:
  p = parser(__doc__, "soak")
  p.add_argument("--steps", type=int, default=None, help="(3000; --quick 60)")
  p.add_argument("--method", default="plain")
  p.add_argument("--workdir", default="/tmp/modalimmune_soak",
                 help="the run's work directory (emptied first)")
  args = p.parse_args(argv)
  args.steps = args.steps or (60 if args.quick else 3000)
  config = soak_config(args.steps, args.method, args.quick)
  shutil.rmtree(args.workdir, ignore_errors=True)
  log(f"{args.steps} steps of {args.method} in {args.workdir}")

  samples, stop = [], threading.Event()
  t0 = time.perf_counter()
  log_path = os.path.join(args.workdir, "metrics.jsonl")

  def last_step() -> float:
    """The newest train step logged (the loop logs every 50 steps)."""
    try:
      with open(log_path, "rb") as f:
        f.seek(max(os.path.getsize(log_path) - 4096, 0))
        lines = [ln for ln in f.read().decode().splitlines() if '"split": "train"' in ln]
      return float(json.loads(lines[-1])["step"]) if lines else float("nan")
    except (OSError, ValueError, IndexError):
      return float("nan")

  def sample():
    while not stop.is_set():
      ckpt = os.path.join(args.workdir, "checkpoints")
      samples.append((time.perf_counter() - t0, status_mb("VmRSS"),
                      dir_mb(ckpt) if os.path.isdir(ckpt) else 0.0, last_step()))
      stop.wait(0.5)
  thread = threading.Thread(target=sample, daemon=True)
  thread.start()
  try:
    summary = train.train_and_evaluate(config, args.workdir)
  finally:
    stop.set()
    thread.join()
  wall = time.perf_counter() - t0

  logs = train_logs(args.workdir)
  steps = np.array([r["step"] for r in logs], float)
  secs = np.array([r["seconds"] for r in logs], float)
  rates = np.diff(steps) / np.diff(secs)
  t_samples = np.array([s[0] for s in samples])
  rss = np.array([s[1] for s in samples])
  ckpt_mb = np.array([s[2] for s in samples])
  step_at = np.array([s[3] for s in samples])
  half = steps[-1] / 2
  sel = np.isfinite(step_at) & (step_at >= half)
  slope = (np.polyfit(step_at[sel], rss[sel], 1)[0] * 1000.0 if sel.sum() > 3 else float("nan"))
  result = {
      "steps": args.steps, "method": args.method, "batch_size": config.train.batch_size,
      "train_samples": config.data.synthetic.num_samples[0], "widths": [768, 74, 35],
      "frames": 50,
      "peak_rss_mb": status_mb("VmHWM"), "rss_mb_first_half_max": float(np.nanmax(
          rss[np.isfinite(step_at) & (step_at < half)])) if np.any(
              np.isfinite(step_at) & (step_at < half)) else None,
      "rss_mb_second_half_max": float(np.nanmax(rss[sel])) if sel.any() else None,
      "rss_slope_mb_per_1000_steps_second_half": float(slope),
      "checkpoint_dir_mb_max": float(ckpt_mb.max()), "checkpoint_dir_mb_end": float(ckpt_mb[-1]),
      "steps_per_s_median": float(np.median(rates)), "steps_per_s_min": float(rates.min()),
      "steps_per_s_max": float(rates.max()),
      "steps_per_s_first_quarter": float(np.median(rates[: max(len(rates) // 4, 1)])),
      "steps_per_s_last_quarter": float(np.median(rates[-max(len(rates) // 4, 1):])),
      "first_step_seconds": summary["first_step_seconds"],
      "train_seconds": summary["train_seconds"],
      "wall_seconds": wall, "nonfinite_skipped": summary["nonfinite_skipped"],
      "valid": summary.get("valid"),
      "config": json.loads(config.to_json_best_effort()),
  }
  md = ["| quantity | value |", "|---|---:|"]
  for key in ("peak_rss_mb", "rss_mb_first_half_max", "rss_mb_second_half_max",
              "rss_slope_mb_per_1000_steps_second_half", "checkpoint_dir_mb_max",
              "checkpoint_dir_mb_end", "steps_per_s_median", "steps_per_s_first_quarter",
              "steps_per_s_last_quarter", "steps_per_s_min", "steps_per_s_max",
              "first_step_seconds", "train_seconds", "wall_seconds", "nonfinite_skipped"):
    v = result[key]
    md.append(f"| {key} | {v:.2f} |" if isinstance(v, float) else f"| {key} | {v} |")
  write_results(args.out, "soak", {
      "result": result, "samples": samples,
      "train_logs": [{"step": int(a), "seconds": float(b)} for a, b in zip(steps, secs)]},
      md, title=f"Soak run: MOSEI-sized synthetic, {args.steps} steps of {args.method}",
      seed=config.seed)
  plot(args.out, t_samples, rss, ckpt_mb, steps, rates, config.train.log_every)
  print("\n".join(md))
  return 0


def plot(out, t_samples, rss, ckpt_mb, steps, rates, every):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
  a.plot(t_samples, rss, label="RSS (MB)")
  a.plot(t_samples, ckpt_mb, label="checkpoints (MB)")
  a.set_xlabel("seconds")
  a.legend()
  a.set_title("memory")
  b.plot(steps[1:], rates)
  b.set_xlabel("step")
  b.set_ylabel("steps/s")
  b.set_title(f"speed (per {every} steps)")
  fig.tight_layout()
  fig.savefig(os.path.join(out, "soak.png"), dpi=110)
  plt.close(fig)


if __name__ == "__main__":
  raise SystemExit(main())
