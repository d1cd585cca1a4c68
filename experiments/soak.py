"""Soak run: a MOSEI-sized synthetic data set trained for thousands of steps with
checkpoints; records peak memory, memory over time and steps per second, and
checks that nothing grows without bound.

    python experiments/soak.py [--steps 3000] [--method plain] [--out results/soak]

Data: 16k training samples (500 valid, 500 test), three sequence modalities of
50 frames with widths 768 / 74 / 35 (text / audio / vision, MOSEI's), variable
lengths, regression; the model and optimiser of ``configs/synthetic.py``,
batch 32, a checkpoint every 500 steps (2 kept), validation every 1000 steps.
The training split (2.8 GB of float32) lives on the device, as in any run.
Memory is the process's resident set size (``/proc/self/status`` VmRSS),
sampled every 0.5 s by a thread; speed comes from the loop's own
``metrics.jsonl`` (a record every 50 steps with its wall time). Growth is
judged on the second half of the run (after compilation and the first
checkpoints): the fitted RSS slope in MB per 1000 steps.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs"))

import numpy as np  # noqa: E402

from modalimmune_jax import train  # noqa: E402
from modalimmune_jax.provenance import markdown_lines, provenance  # noqa: E402


def status_mb(field: str) -> float:
  """A memory field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``) in MB."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024.0
  return float("nan")


def soak_config(steps: int, method: str):
  import synthetic
  config = synthetic.get_config("mosi_shaped")
  s = config.data.synthetic
  s.shapes = {"text": (50, 768), "audio": (50, 74), "vision": (50, 35)}
  s.num_samples = (16000, 500, 500)
  config.method.name = method
  config.train.steps = steps
  config.train.log_every = 50
  config.train.eval_every = 1000
  config.checkpoint.every = 500
  config.checkpoint.max_to_keep = 2
  config.eval.missing_rates = (0.5,)
  config.eval.snrs_db = ()
  config.eval.removals = "drop_one"
  return config


def dir_mb(path: str) -> float:
  total = 0
  for root, _, files in os.walk(path):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total / 2 ** 20


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=3000)
  parser.add_argument("--method", default="plain")
  parser.add_argument("--out", default="results/soak")
  parser.add_argument("--workdir", default="/tmp/modalimmune_soak")
  args = parser.parse_args()
  config = soak_config(args.steps, args.method)
  shutil.rmtree(args.workdir, ignore_errors=True)

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

  records = [json.loads(ln) for ln in open(log_path)]
  train_logs = [r for r in records if r.get("split") == "train"]
  steps = np.array([r["step"] for r in train_logs], float)
  secs = np.array([r["seconds"] for r in train_logs], float)
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
      "train_samples": 16000, "widths": [768, 74, 35], "frames": 50,
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
      "first_step_seconds": summary["first_step_seconds"], "train_seconds": summary["train_seconds"],
      "wall_seconds": wall, "nonfinite_skipped": summary["nonfinite_skipped"],
      "valid": summary.get("valid"),
      "provenance": provenance(seed=config.seed),
      "config": json.loads(config.to_json_best_effort()),
  }
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "soak.json"), "w") as f:
    json.dump({"result": result, "samples": samples,
               "train_logs": [{"step": int(a), "seconds": float(b)}
                              for a, b in zip(steps, secs)]}, f, indent=1, default=float)
  prov = result["provenance"]
  md = [f"# Soak run: MOSEI-sized synthetic, {args.steps} steps of {args.method}", "",
        *markdown_lines(prov), "",
        "| quantity | value |", "|---|---:|"]
  for key in ("peak_rss_mb", "rss_mb_first_half_max", "rss_mb_second_half_max",
              "rss_slope_mb_per_1000_steps_second_half", "checkpoint_dir_mb_max",
              "checkpoint_dir_mb_end", "steps_per_s_median", "steps_per_s_first_quarter",
              "steps_per_s_last_quarter", "steps_per_s_min", "steps_per_s_max",
              "first_step_seconds", "train_seconds", "wall_seconds", "nonfinite_skipped"):
    v = result[key]
    md.append(f"| {key} | {v:.2f} |" if isinstance(v, float) else f"| {key} | {v} |")
  with open(os.path.join(args.out, "soak.md"), "w") as f:
    f.write("\n".join(md) + "\n")
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(t_samples, rss, label="RSS (MB)")
    a.plot(t_samples, ckpt_mb, label="checkpoints (MB)")
    a.set_xlabel("seconds"); a.legend(); a.set_title("memory")
    b.plot(steps[1:], rates); b.set_xlabel("step"); b.set_ylabel("steps/s")
    b.set_title("speed (per 50 steps)")
    fig.tight_layout(); fig.savefig(os.path.join(args.out, "soak.png"), dpi=110)
  except ImportError:
    pass
  print("\n".join(md))


if __name__ == "__main__":
  main()
