"""Collapse severity of each modality's embedding against robustness to its removal.

    python experiments/collapse_vs_robustness.py RUN_DIR [RUN_DIR ...] [--out DIR]

Each RUN_DIR is a work directory of ``train.train_and_evaluate`` (it holds
``results.json`` and ``checkpoints/``) or a directory searched recursively for
such runs, e.g. ``runs/cmp_synthetic`` for every method, seed and tuning trial
of a comparison. For each run and each modality ``m``:

* **severity**: ``spectral.collapse_severity`` (centred, in float64) of the
  encoders' output for ``m`` over the whole evaluated split
  (``config.eval.split``, every modality present), from the run's newest
  checkpoint; the embeddings are computed in batches and concatenated, and one
  severity is taken over all N rows (0 = isotropic, 1 = rank 1);
* **robustness**: the headline metric (or ``--metric``) from ``results.json``
  under the condition that removes only ``m`` (the protocol names it by what is
  kept: ``audio+vision`` for ``text`` out of text, audio, vision) minus the
  metric under ``full``; for a lower-is-better metric (MAE) the sign is
  flipped, so in every case higher = more robust and 0 = removing ``m`` costs
  nothing.

Writes into ``--out`` (default ``experiments/results/collapse_vs_robustness``):
``collapse_vs_robustness.json`` (every point and the
Spearman correlations), ``collapse_vs_robustness.md`` (the table, the
correlations over all points, per data set and per method, the provenance)
and ``collapse_vs_robustness.png`` (scatter, colour = method, marker = data
set).
"""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from harness import find_runs, log, parser, restore, run_config, write_results
from modalimmune_jax import spectral, train
from modalimmune_jax.compare import removal_name
from modalimmune_jax.metrics import compute_metrics
from modalimmune_jax.provenance import provenance
from modalimmune_jax.step import device_batch, host_copy

LOWER_IS_BETTER = {"MAE"}
PAPER_RHO = 0.81
MIN_GROUP = 4  # a per-data-set / per-method correlation needs this many points


def is_run(path: str) -> bool:
  return (os.path.isfile(os.path.join(path, "results.json"))
          and os.path.isdir(os.path.join(path, "checkpoints")))


def removal_condition(protocol_dict: dict, names, m: str) -> str:
  """The name of the condition that removes only ``m``."""
  want = set(names) - {m}
  for c in protocol_dict["meta"]["conditions"]:
    if c["kind"] == "removal" and set(c["params"].get("kept", ())) == want:
      return c["name"]
  return removal_name([n for n in names if n != m])


def embeddings(config, run_dir: str) -> tuple[dict[str, np.ndarray], int, tuple, dict]:
  """The encoders' output per modality over the evaluated split, from the
  newest checkpoint: ``({modality: (N, k) float64}, checkpoint step, names,
  metrics of the outputs under full)``; the metrics check that the checkpoint
  reproduces ``results.json`` (the outputs as evaluation computes them, with
  the method's ``predict_hook``, e.g. EBR's test-time fill)."""
  run, step, state = restore(config, run_dir)
  if state is None:
    raise RuntimeError("no checkpoint")
  state = host_copy(state)
  method_state = state.method_state if run.method.predict_hook else None
  encode = jax.jit(lambda p, b: run.model.apply(p, b, None, train=False)["embeddings"])
  predict = train.make_predict_fn(run.graphdef, run.method.predict_hook)

  split = run.dataset.splits[config.eval.split]
  zs, outs = [], []
  for idx in split.batch_indices(config.eval.batch_size):
    batch = device_batch(split.batch(idx))
    zs.append(np.asarray(encode(state.params, batch)))
    outs.append(np.asarray(predict(state.params, batch, method_state)))
  z = np.concatenate(zs).astype(np.float64)  # (N, M, k)
  full = compute_metrics(run.dataset.task, np.concatenate(outs), split.labels)
  names = tuple(run.dataset.modality_names)
  return {m: z[:, j, :] for j, m in enumerate(names)}, step, names, full


def severity(z: np.ndarray) -> tuple[float, float]:
  """``(collapse severity, effective rank)`` of ``z`` (N, k) in float64."""
  with jax.enable_x64(True):
    zj = jnp.asarray(z, jnp.float64)
    return float(spectral.collapse_severity(zj)), float(spectral.effective_rank(zj))


BOOTSTRAP = 2000  # resamples of the runs for the interval of rho


def _rho(points: list[dict]) -> float | None:
  from scipy import stats
  x = [p["severity"] for p in points]
  y = [p["robustness"] for p in points]
  if len(points) < 3 or len(set(x)) < 2 or len(set(y)) < 2:
    return None
  rho = float(stats.spearmanr(x, y).statistic)
  return None if math.isnan(rho) else rho


def spearman(points: list[dict], resamples: int = BOOTSTRAP) -> dict:
  """Spearman's rho, its p-value (assuming independent points) and a 95 %
  bootstrap interval that resamples whole *runs* with replacement (the points
  of one run share a model, so they are not independent), percentile method,
  seed 0; None where rho is undefined."""
  from scipy import stats
  out = {"n": len(points), "rho": _rho(points), "p": None, "lo": None, "hi": None,
         "bootstrap": f"{resamples} resamples of the runs, percentile"}
  if out["rho"] is None:
    return out
  p = float(stats.spearmanr([q["severity"] for q in points],
                            [q["robustness"] for q in points]).pvalue)
  out["p"] = None if math.isnan(p) else p
  runs = sorted({q["run"] for q in points})
  by_run = {r: [q for q in points if q["run"] == r] for r in runs}
  rng = np.random.default_rng(0)
  draws = [_rho([q for r in rng.choice(len(runs), len(runs)) for q in by_run[runs[r]]])
           for _ in range(resamples)]
  draws = [d for d in draws if d is not None]
  if len(runs) > 1 and draws:
    out["lo"], out["hi"] = (float(v) for v in np.percentile(draws, [2.5, 97.5]))
  return out


def summarise(points: list[dict]) -> dict:
  summary = {"all": spearman(points), "by_dataset": {}, "by_method": {}}
  for key, field in (("by_dataset", "dataset"), ("by_method", "method")):
    for value in sorted({p[field] for p in points}):
      group = [p for p in points if p[field] == value]
      if len(group) >= MIN_GROUP:
        summary[key][value] = spearman(group)
  return summary


def _fmt(x, digits=3) -> str:
  if x is None:
    return "n/a"
  return f"{x:.{digits}g}" if abs(x) < 1e-3 and x != 0 else f"{x:.{digits}f}"


def _corr_row(label: str, c: dict) -> str:
  interval = (f"[{_fmt(c['lo'])}, {_fmt(c['hi'])}]" if c.get("lo") is not None else "n/a")
  return f"| {label} | {_fmt(c['rho'])} | {interval} | {_fmt(c['p'])} | {c['n']} |"


def render(record: dict) -> list[str]:
  """The markdown below the title and the provenance lines."""
  s, metrics = record["summary"], record["metrics"]
  metric_text = ", ".join(sorted(set(metrics)))
  lines = [
      f"- runs: {record['num_runs']} ({len(record['skipped'])} skipped), "
      f"points: {len(record['points'])}; metric: {metric_text}; evaluated split(s): "
      f"{', '.join(sorted({p['split'] for p in record['points']}))}",
      "",
      "**Definitions.** *severity* of modality m = `spectral.collapse_severity` (centred, "
      "float64) of the encoders' output for m over the whole evaluated split "
      "(`config.eval.split`, every modality present), from the run's newest checkpoint: "
      "0 = isotropic, 1 = rank 1. *robustness* to m's removal = metric(condition that "
      "removes only m) - metric(`full`), from the run's `results.json`; for a "
      "lower-is-better metric (MAE) the sign is flipped, so **higher = more robust** and "
      "0 = removing m costs nothing (negative = removing m hurts). Accuracies are in "
      "[0, 1], not percent.",
      "",
      f"**Paper vs here.** The paper (arXiv 2602.16197) claims a Spearman correlation of "
      f"rho = {PAPER_RHO} between collapse severity and robustness; the numbers below are "
      "what was measured here, on these runs, with the definitions above (the paper's "
      "exact definitions of both axes may differ). The points of one run share a model "
      "and the runs share data, so they are not independent: the p-values assume "
      "independence and are optimistic.",
      "",
      "## Spearman correlation (severity vs robustness)",
      "",
      "rho's 95 % interval: a bootstrap over runs (2000 resamples of whole runs, "
      "percentile), which respects that a run's points share a model; p assumes "
      "independent points.",
      "",
      "| points | rho | 95 % interval | p | n |",
      "|---|---:|---:|---:|---:|",
      _corr_row("all", s["all"]),
  ]
  for key, what in (("by_dataset", "data set"), ("by_method", "method")):
    for value, c in s[key].items():
      lines.append(_corr_row(f"{what} = {value}", c))
  lines += ["", f"(per data set / per method only with >= {MIN_GROUP} points; rho is n/a "
            "when fewer than 3 points or one axis is constant)", "", "## Points", "",
            "| run | method | data set | split | seed | modality | severity | eff. rank | "
            "condition | metric full | metric without m | robustness |",
            "|---|---|---|---|---:|---|---:|---:|---|---:|---:|---:|"]
  for p in record["points"]:
    lines.append(
        f"| {p['label']} | {p['method']} | {p['dataset']} | {p['split']} | {p['seed']} | "
        f"{p['modality']} | "
        f"{p['severity']:.4f} | {p['effective_rank']:.2f} | {p['condition']} | "
        f"{p['metric_full']:.4f} | {p['metric_removed']:.4f} | {p['robustness']:+.4f} |")
  bad = sorted({p["label"] for p in record["points"] if not p["reproduced"]})
  lines += ["", "Check: the `full` metric recomputed from each restored checkpoint "
            + ("matches `results.json` for every run." if not bad else
               f"does NOT match `results.json` for: {', '.join(bad)} (see the JSON).")]
  if record["skipped"]:
    lines += ["", "## Skipped", ""]
    lines += [f"- {k['run']}: {k['reason']}" for k in record["skipped"]]
  return lines


def plot(record: dict, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  points = record["points"]
  methods = sorted({p["method"] for p in points})
  datasets = sorted({p["dataset"] for p in points})
  colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
  markers = {d: "osD^v<>Pp*hX"[i % 12] for i, d in enumerate(datasets)}
  fig, ax = plt.subplots(figsize=(7, 5))
  for m in methods:
    for d in datasets:
      group = [p for p in points if p["method"] == m and p["dataset"] == d]
      if group:
        ax.scatter([p["severity"] for p in group], [p["robustness"] for p in group],
                   color=colours[m], marker=markers[d], alpha=0.8, edgecolors="k",
                   linewidths=0.5, label=f"{m} / {d}" if len(datasets) > 1 else m)
  ax.axhline(0.0, color="grey", lw=0.8, ls=":")
  ax.set_xlabel("collapse severity of m's embedding (0 isotropic, 1 rank 1)")
  metric = "/".join(sorted(set(record["metrics"])))
  ax.set_ylabel(f"robustness to removing m: {metric}(without m) - {metric}(full)"
                + (" [sign flipped for MAE]" if set(record["metrics"]) & LOWER_IS_BETTER
                   else ""), fontsize=8)
  c = record["summary"]["all"]
  interval = f" [{_fmt(c['lo'])}, {_fmt(c['hi'])}]" if c.get("lo") is not None else ""
  ax.set_title(f"Spearman rho = {_fmt(c['rho'])}{interval} (n = {c['n']}); "
               f"paper: {PAPER_RHO}", fontsize=10)
  if points:
    ax.legend(fontsize=7, loc="best")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, dpi=130)
  plt.close(fig)


def main(argv=None) -> int:
  p = parser(__doc__, "collapse_vs_robustness", quick=False, runs=True)
  p.add_argument("--metric", default=None,
                 help="metric to use (default: each run's headline_metric)")
  args = p.parse_args(argv)

  runs = find_runs(args.runs, is_run)
  if not runs:
    raise SystemExit("error: no run directories (with results.json and checkpoints/) found")
  log(f"{len(runs)} run(s)")
  common = os.path.commonpath([os.path.dirname(r) for r in runs])
  points, skipped, metrics = [], [], []
  for i, run_dir in enumerate(runs, 1):
    label = os.path.relpath(run_dir, common)
    t0 = time.perf_counter()
    try:
      with open(os.path.join(run_dir, "results.json")) as f:
        results = json.load(f)
      config = run_config(run_dir)
      metric = args.metric or results["headline_metric"]
      rows = {r["condition"]: r for r in results["protocol"]["rows"]}
      if "full" not in rows or rows["full"].get(metric) is None:
        raise ValueError(f"no {metric} under 'full' in results.json")
      z, step, names, recomputed = embeddings(config, run_dir)
    except Exception as e:  # noqa: BLE001 - one bad run should not end the report
      log(f"[{i}/{len(runs)}] {label}: skipped ({type(e).__name__}: {e})")
      skipped.append({"run": run_dir, "reason": f"{type(e).__name__}: {e}"})
      continue
    if step != results.get("steps"):
      log(f"warning: {label}: newest good checkpoint is step {step}, results.json is "
          f"of step {results.get('steps')}")
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    full = float(rows["full"][metric])
    again = recomputed.get(metric)
    reproduced = again is not None and abs(again - full) <= 1e-4 + 1e-3 * abs(full)
    if not reproduced:
      log(f"warning: {label}: the checkpoint gives {metric} {again} under full, "
          f"results.json {full}")
    n_points = 0
    for m in names:
      cond = removal_condition(results["protocol"], names, m) if len(names) > 1 else None
      if cond is None or cond not in rows or rows[cond].get(metric) is None:
        log(f"  {label}: no condition removing only {m}; skipped")
        continue
      removed = float(rows[cond][metric])
      sev, erank = severity(z[m])
      points.append({
          "run": run_dir, "label": label, "method": results["method"],
          "dataset": results["dataset"], "task": results.get("task"),
          "seed": config.get("seed"), "split": config.eval.split,
          "checkpoint_step": int(step), "modality": m,
          "num_rows": int(z[m].shape[0]), "dim": int(z[m].shape[1]),
          "severity": sev, "effective_rank": erank, "metric": metric,
          "condition": cond, "metric_full": full, "metric_removed": removed,
          "metric_full_from_checkpoint": again, "reproduced": bool(reproduced),
          "robustness": sign * (removed - full)})
      n_points += 1
    metrics.append(metric)
    log(f"[{i}/{len(runs)}] {label}: {results['method']} on {results['dataset']}, "
        f"{n_points} point(s), step {step}, {time.perf_counter() - t0:.1f} s")

  record = {
      "description": "severity = spectral.collapse_severity (centred, float64) of the "
                     "encoders' output for m over config.eval.split (all modalities "
                     "present), newest checkpoint; robustness = metric(removing only m) - "
                     "metric(full), sign flipped for lower-is-better metrics (MAE): "
                     "higher = more robust",
      "paper_rho": PAPER_RHO,
      "metrics": sorted(set(metrics)),
      "num_runs": len(runs),
      "points": points,
      "summary": summarise(points),
      "skipped": skipped,
  }
  prov = provenance()
  write_results(args.out, "collapse_vs_robustness", record, render(record),
                title="Collapse severity vs robustness to removal",
                details=(prov["time_utc"],), prov=prov)
  base = os.path.join(args.out, "collapse_vs_robustness")
  plot(record, base + ".png")
  c = record["summary"]["all"]
  log(f"{len(points)} point(s): Spearman rho = {_fmt(c['rho'])}, p = {_fmt(c['p'])}; "
      f"wrote {base}.png")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
