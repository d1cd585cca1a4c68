"""Methods x seeds under one protocol, in one command.

    python -m modalimmune_jax.compare --config=experiments/configs/mfeat.py \\
        --methods=plain,dropout,modalimmune --seeds=0,1,2 --workdir=runs/cmp

For each method the same tuning budget is spent first: every trial of the
method's search space (its spec's ``search``, :mod:`modalimmune_jax.methods`;
3 trials for every built-in method, one trial of the defaults for a method
without a search space) is trained with the first seed and scored on the **valid** split by the
selection score (the headline metric averaged over the ``full`` condition and
every missing-modality condition); the best trial's settings then train every
seed, evaluated on ``config.eval.split`` (test). The test split never enters a
choice. Every run lives in its own work directory (``tune/<method>/<trial>``,
``<method>/seed<k>``) and resumes or is skipped when already done, so an
interrupted comparison is rerun with the same command. The seeds of a method
train one after the other, reusing the step the tuning trials compiled;
``--together`` trains them as one vmapped program instead
(:func:`modalimmune_jax.train.train_seeds`), each still in its own directory:
a new program to compile, which on a 2-core CPU cost more than it saved
(experiments/README.md, "End to end").

Writes ``comparison.md`` (tables: mean and standard deviation over seeds),
``comparison.json`` (every number, the chosen settings, the validation scores
of every trial, the provenance of every run), ``comparison.png`` and, when the
protocol has cell-eta conditions (``eval.cell_etas``), ``cell_eta.png`` (the
robustness curves); a linear
reference (:mod:`modalimmune_jax.reference`) on the same protocol is printed
beside the table. ``--ablation`` compares a method (``--ablation_method``,
ModalImmune by default) with each part switched off in turn (its spec's
``ablations``) instead of methods.
"""

from __future__ import annotations

import json
import os
import sys

from absl import flags
from ml_collections import config_flags

from modalimmune_jax import methods, protocol

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for every run and the comparison.")
flags.DEFINE_list("methods", ["plain", "dropout", "modalimmune"], "Methods to compare.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (each trains and evaluates once).")
flags.DEFINE_bool("tune", True, "Spend the tuning budget (each method's search space) on the "
                  "valid split first.")
flags.DEFINE_bool("ablation", False, "Compare the ablation rows of --ablation_method instead.")
flags.DEFINE_string("ablation_method", "modalimmune", "The method whose ablation rows "
                    "(MethodSpec.ablations) --ablation compares.")
flags.DEFINE_bool("reference", True, "Fit and print the linear reference.")
flags.DEFINE_bool("together", False, "Train the seeds of a method as one vmapped program "
                  "(train.train_seeds) where the method allows it; per-seed work directories "
                  "either way.")
config_flags.DEFINE_config_file("config", None, "A configs/*.py file (path[:variant]).",
                                lock_config=True)
flags.mark_flags_as_required(["config", "workdir"])


MISSING_KINDS = protocol.MISSING_KINDS
selection_score = protocol.selection_score


def finished(config, workdir: str) -> dict | None:
  """``results.json`` of a finished run of ``config`` in ``workdir``, or None.

  The run's config must equal ``config`` except in the other methods' sections
  (:func:`modalimmune_jax.config.differences`) and the keys that only change
  what is logged (:data:`~modalimmune_jax.config.LOGGING_ONLY`): a key added to
  EBR's section does not make the finished plain runs stale, one added to
  plain's would.
  """
  from modalimmune_jax.config import LOGGING_ONLY, differences
  path = os.path.join(workdir, "results.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    record = json.load(f)
  diff = differences(record.get("config") or {}, config, ignore=LOGGING_ONLY)
  if not diff:
    print(f"done already: {workdir}", file=sys.stderr)
    return record
  from modalimmune_jax.train import WorkdirError
  listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, a, b in diff[:4])
  more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
  raise WorkdirError(f"{workdir} holds a finished run of another config ({listed}{more}); "
                     "move it away or choose another --workdir")


def run_seeds(config, seeds, workdirs, together: bool = False) -> list[dict]:
  """``results.json`` of ``config`` at each seed, training (or finishing) those
  not done: as one vmapped program when ``together`` (see
  :func:`modalimmune_jax.train.train_seeds`)."""
  from modalimmune_jax import train
  from modalimmune_jax.config import with_overrides
  records = {s: finished(with_overrides(config, {"seed": s}), w) for s, w in zip(seeds, workdirs)}
  todo = [(s, w) for s, w in zip(seeds, workdirs) if records[s] is None]
  if todo:
    train.train_seeds(config, [s for s, _ in todo], [w for _, w in todo], together=together)
    for s, w in todo:
      with open(os.path.join(w, "results.json")) as f:
        records[s] = json.load(f)
  return [records[s] for s in seeds]


def run_once(config, workdir: str) -> dict:
  """``results.json`` of a run, training it (or finishing it) if needed."""
  return run_seeds(config, [config.seed], [workdir])[0]


def removal_name(kept) -> str:
  """The protocol's name of the condition that keeps ``kept``."""
  kept = list(kept)
  return kept[0] + " only" if len(kept) == 1 else "+".join(kept)


def dominant_modality(dataset, agg: dict, lower_is_better: bool) -> tuple[str | None, str]:
  """The dominant modality and how it was found: the data set's own (the
  synthetic benchmark's), else the one whose removal alone costs the first
  row's model most (measured, on the evaluated split)."""
  names = list(dataset.modality_names)
  if dataset.meta.get("dominant"):
    return dataset.meta["dominant"], "by construction"
  first = agg[next(iter(agg))]
  without = {m: removal_name([n for n in names if n != m]) for m in names}
  drops = {m: first[c]["mean"] for m, c in without.items() if c in first}
  if not drops:
    return None, ""
  pick = (max if lower_is_better else min)(drops, key=drops.get)
  return pick, f"the removal that costs '{next(iter(agg))}' most"


def aggregate(records: dict[str, list[dict]], metric: str) -> dict:
  """Per label and condition: mean, std, values over seeds; plus the missing mean."""
  import numpy as np
  out = {}
  for label, runs in records.items():
    conds = [r["condition"] for r in runs[0]["protocol"]["rows"]]
    kinds = {c["name"]: c["kind"] for c in runs[0]["protocol"]["meta"]["conditions"]}
    table = {}
    for c in conds:
      vals = [next(r for r in run["protocol"]["rows"] if r["condition"] == c)[metric]
              for run in runs]
      vals = [np.nan if v is None else v for v in vals]
      table[c] = {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1))
                  if len(vals) > 1 else 0.0, "values": vals, "kind": kinds[c]}
    missing = [c for c in conds if kinds[c] in MISSING_KINDS]
    per_seed = [float(np.mean([table[c]["values"][i] for c in missing]))
                for i in range(len(runs))]
    table["mean missing"] = {"mean": float(np.mean(per_seed)),
                             "std": float(np.std(per_seed, ddof=1)) if len(runs) > 1 else 0.0,
                             "values": per_seed, "kind": "summary"}
    out[label] = table
  return out


def _label(row: str) -> str:
  """How tables mark a method's row (a reimplementation, say); "" for others."""
  return methods.get(row).label if row in methods.names() else ""


def search_space(name: str) -> tuple[dict, ...]:
  """The tuning trials of method ``name``: its spec's ``search``, or one trial of
  its defaults when it has none."""
  return tuple(methods.get(name).search) or ({},)


def _cell(entry: dict, scale: float) -> str:
  return f"{scale * entry['mean']:.2f} ± {scale * entry['std']:.2f}"


def render(agg: dict, metric: str, *, title: str, dominant: str | None,
           reference: dict | None, runs_info: dict, chosen: dict,
           costs: dict | None = None) -> str:
  labels = list(agg)
  first = agg[labels[0]]
  conds = [c for c in first if c != "mean missing"]
  scale = 1.0 if metric == "MAE" else 100.0
  unit = "" if metric == "MAE" else " (%)"
  drop_dom = None
  if dominant is not None:
    name = removal_name([m for m in runs_info["modalities"] if m != dominant])
    drop_dom = name if name in first else None
  head = ["full", "mean missing"] + ([drop_dom] if drop_dom else [])
  lines = [f"# {title}", "", f"{metric}{unit}, mean ± standard deviation over seeds "
           f"{runs_info['seeds']}, {runs_info['split']} split. 'mean missing': the mean over "
           "every missing-modality condition (removals, random missing rates, cell- and "
           "sample-eta rates, frame rates; not noise)."
           + (f" Dominant modality: {dominant}, {runs_info['dominant_how']} "
              f"(removed in '{drop_dom}')." if drop_dom else ""), "",
           "| method | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
  for label in labels:
    shown = f"{label} ({_label(label)})" if _label(label) else label
    lines.append(f"| {shown} | " + " | ".join(_cell(agg[label][c], scale) for c in head) + " |")
  if reference is not None:
    ref = reference["rows"]
    ref_missing = reference["mean_missing"]
    cells = [f"{scale * ref['full']:.2f}", f"{scale * ref_missing:.2f}"]
    if drop_dom:
      cells.append(f"{scale * ref[drop_dom]:.2f}")
    lines.append(f"| linear reference (seed-{reference['seed']} data, C={reference['C']:g}) | "
                 + " | ".join(cells) + " |")
  lines += ["", "Every condition:", "", "| condition | " + " | ".join(labels) + " |",
            "|---|" + "---:|" * len(labels)]
  for c in conds + ["mean missing"]:
    lines.append(f"| {c} | " + " | ".join(_cell(agg[lab][c], scale) for lab in labels) + " |")
  if chosen:
    lines += ["", "Tuning (same budget per method, first seed, valid split, selection score ="
              " mean headline metric over full + missing conditions):", ""]
    for label, info in chosen.items():
      trials = "; ".join(f"{json.dumps(t['overrides'])} -> {scale * t['score']:.2f}"
                         for t in info["trials"])
      lines.append(f"- {label}: chose {json.dumps(info['overrides'])} ({trials})")
  if costs:
    lines += ["", "Training cost per step (median over the method's tuning trials: single-seed "
              "runs in this process, wall time after the first step, logging and validation "
              "included):", "", "| method | ms per step | relative to plain |", "|---|---:|---:|"]
    for label, c in costs.items():
      rel = "" if c["relative_to_plain"] is None else f"{c['relative_to_plain']:.2f}x"
      lines.append(f"| {label} | {1e3 * c['seconds_per_step']:.2f} | {rel} |")
  lines += ["", f"- command: `{runs_info['command']}`",
            f"- commit: {runs_info['commit']}{' (dirty)' if runs_info['dirty'] else ''}",
            f"- machine: {runs_info['machine']}", ""]
  return "\n".join(lines)


def plot(agg: dict, metric: str, path: str, title: str) -> str:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  labels = list(agg)
  conds = list(agg[labels[0]])
  scale = 1.0 if metric == "MAE" else 100.0
  width = 0.8 / len(labels)
  fig, ax = plt.subplots(figsize=(9.5, 0.9 + 0.3 * len(conds) * max(1, 0.6 * len(labels))))
  y = np.arange(len(conds))
  for i, label in enumerate(labels):
    means = [scale * agg[label][c]["mean"] for c in conds]
    stds = [scale * agg[label][c]["std"] for c in conds]
    ax.barh(y + (i - (len(labels) - 1) / 2) * width, means, height=width, xerr=stds,
            label=label, capsize=2)
  ax.set_yticks(y, conds, fontsize=8)
  ax.set_ylim(len(conds) - 0.5, -0.5)
  ax.set_xlabel(f"{metric} (mean ± std over seeds)")
  ax.set_title(title, fontsize=10)
  ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return path


def seconds_per_step(record: dict) -> float | None:
  """A run's training seconds per step after its first (compilation excluded)."""
  steps = record["steps"] - record["start_step"] - 1
  if steps < 1 or record.get("first_step_seconds") is None or record.get("seeds_together"):
    return None
  return (record["train_seconds"] - record["first_step_seconds"]) / steps


def step_costs(chosen: dict) -> dict:
  """Per method: the median seconds per step over its tuning trials (single-seed
  runs, one after another in one process) and the ratio to plain's."""
  import numpy as np
  med = {label: float(np.median(v)) for label, info in chosen.items()
         if (v := [t["seconds_per_step"] for t in info["trials"]
                   if t.get("seconds_per_step") is not None])}
  base = med.get("plain")
  return {label: {"seconds_per_step": m, "relative_to_plain": m / base if base else None}
          for label, m in med.items()}


def cell_eta_curves(agg: dict, records: dict[str, list[dict]]) -> dict:
  """Per label, the headline metric against cell-eta (CPM-Net/GCNet), ``full`` at
  eta 0: ``{label: {"x", "mean", "std"}}`` (empty without cell-eta conditions)."""
  conds = next(iter(records.values()))[0]["protocol"]["meta"]["conditions"]
  etas = sorted((c["params"]["eta"], c["name"]) for c in conds if c["kind"] == "cell_missing")
  if not etas:
    return {}
  points = [(0.0, "full")] + etas
  return {label: {"x": [x for x, _ in points],
                  "mean": [table[name]["mean"] for _, name in points],
                  "std": [table[name]["std"] for _, name in points]}
          for label, table in agg.items()}


def main(argv) -> int:
  del argv
  import time
  started = time.perf_counter()
  from modalimmune_jax import cli
  cli.quiet_logging()
  from modalimmune_jax.config import validate_config, with_overrides
  base = FLAGS.config
  try:
    seeds = [int(s) for s in FLAGS.seeds]
  except ValueError:
    raise cli.FlagError(f"--seeds must be integers, got {FLAGS.seeds}")
  known = methods.names()
  if FLAGS.ablation:
    if FLAGS.ablation_method not in known or not methods.get(FLAGS.ablation_method).ablations:
      raise cli.FlagError(f"--ablation_method: {FLAGS.ablation_method!r} has no ablation rows; "
                          f"methods with them: "
                          f"{[n for n in known if methods.get(n).ablations]}")
    name = FLAGS.ablation_method
    rows = {label: with_overrides(base, dict(o, **{"method.name": name}))
            for label, o in methods.get(name).ablations.items()}
  else:
    unknown = [m for m in FLAGS.methods if m not in known]
    if unknown:
      raise cli.FlagError(f"--methods: unknown {unknown}; known {list(known)} (a method of "
                          "your own: register its spec in your config file)")
    rows = {m: with_overrides(base, {"method.name": m}) for m in FLAGS.methods}
  rows = {label: with_overrides(cfg, {"train.seeds": ()}) for label, cfg in rows.items()}
  for label, cfg in rows.items():
    validate_config(cfg)

  from modalimmune_jax import train
  from modalimmune_jax.metrics import HEADLINE
  from modalimmune_jax.provenance import provenance
  dataset = train.load_data(base)  # data checked before anything is created
  os.makedirs(FLAGS.workdir, exist_ok=True)
  cli.enable_compile_cache()
  metric = HEADLINE[dataset.task]

  chosen: dict[str, dict] = {}
  if FLAGS.tune and not FLAGS.ablation:
    for label, cfg in rows.items():
      trials = []
      for i, overrides in enumerate(search_space(label)):
        trial_cfg = with_overrides(cfg, dict(overrides, **{"seed": seeds[0],
                                                           "eval.split": "valid"}))
        rec = run_once(trial_cfg, os.path.join(FLAGS.workdir, "tune", label, str(i)))
        trials.append({"overrides": overrides,
                       "score": selection_score(rec["protocol"], metric),
                       "seconds_per_step": seconds_per_step(rec)})
      lower = metric == "MAE"
      best = (min if lower else max)(trials, key=lambda t: t["score"])
      chosen[label] = {"overrides": best["overrides"], "trials": trials}
      rows[label] = with_overrides(cfg, best["overrides"])

  def seed_dir(label, seed):  # "no BHGD (fixed meta-parameters)" -> no_BHGD/seed0
    return os.path.join(FLAGS.workdir, label.split(" (")[0].replace(" ", "_"), f"seed{seed}")

  records: dict[str, list[dict]] = {}
  for label, cfg in rows.items():
    records[label] = run_seeds(cfg, seeds, [seed_dir(label, s) for s in seeds], FLAGS.together)

  agg = aggregate(records, metric)
  reference = None
  if FLAGS.reference:
    from modalimmune_jax.reference import fit_linear_reference
    ref = fit_linear_reference(dataset)
    split = dataset.splits[base.eval.split]
    conds = train.eval_conditions(base, dataset.modality_names)
    result = ref.evaluate(split, conds, seed=base.eval.seed)
    rows_ref = {n: v[metric] for n, v in result.rows}
    kinds = {c.name: c.kind for c in conds}
    missing = [rows_ref[n] for n in rows_ref if kinds[n] in MISSING_KINDS]
    reference = {"C": ref.C, "seed": base.seed, "valid_score": ref.valid_score, "rows": rows_ref,
                 "mean_missing": float(sum(missing) / max(len(missing), 1))}
  prov = provenance(seeds=seeds)
  info = {"seeds": seeds, "split": base.eval.split, "command": prov["command"],
          "commit": prov["commit"], "dirty": prov["dirty"],
          "machine": f"{prov['machine']['processor']}, {prov['machine']['cpu_count']} cores, "
                     f"{prov['machine']['jax_backend']}",
          "modalities": list(dataset.modality_names)}
  kind = f"{FLAGS.ablation_method} ablation" if FLAGS.ablation else "Comparison"
  title = f"{kind} on {dataset.name}"
  dominant, info["dominant_how"] = dominant_modality(dataset, agg, metric == "MAE")
  costs = step_costs(chosen)
  md = render(agg, metric, title=title, dominant=dominant, reference=reference,
              runs_info=info, chosen=chosen, costs=costs)
  out = {"metric": metric, "title": title, "aggregate": agg, "chosen": chosen,
         "step_costs": costs, "together": FLAGS.together,
         "wall_seconds": time.perf_counter() - started,
         "dominant": dominant, "dominant_how": info["dominant_how"],
         "reference": reference, "provenance": prov,
         "runs": {label: [{"workdir": seed_dir(label, s), "seed": s, "provenance": r["provenance"], "config": r["config"],
                           "train_seconds": r["train_seconds"]}
                          for s, r in zip(seeds, recs)] for label, recs in records.items()}}
  with open(os.path.join(FLAGS.workdir, "comparison.md"), "w") as f:
    f.write(md)
  with open(os.path.join(FLAGS.workdir, "comparison.json"), "w") as f:
    json.dump(out, f, indent=2, default=float)
  plot(agg, metric, os.path.join(FLAGS.workdir, "comparison.png"), title)
  curves = cell_eta_curves(agg, records)
  if curves:
    from modalimmune_jax.plots import robustness_curves
    robustness_curves(curves, metric, os.path.join(FLAGS.workdir, "cell_eta.png"),
                      f"{title}: cell-eta (CPM-Net/GCNet), mean ± std over seeds {seeds}")
  print(md)
  return 0


def run() -> None:
  from modalimmune_jax import cli
  cli.run(main)


if __name__ == "__main__":
  run()
