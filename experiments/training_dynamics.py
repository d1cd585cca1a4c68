"""Training dynamics of ModalImmune runs: controller, information gains, collapse, BHGD.

    python experiments/training_dynamics.py RUN_DIR [RUN_DIR ...] [--out DIR]

Each RUN_DIR is a work directory of ``train.train_and_evaluate`` (it holds
``metrics.jsonl``) or a directory searched recursively for such runs; runs of
other methods are skipped (the method is read from ``results.json``, else
``config.json``). From the train logs of ``metrics.jsonl`` (every
``train.log_every`` steps) and its ``hypergrad`` events, one PNG per run,
``dynamics_<label>.png`` (``<label>`` = the run's path below the runs' common
parent, ``/`` -> ``_``), a 2x2 grid:

* controller intensities ``alpha/<m>``;
* information gains ``ig/<m>`` (as the controller last measured them);
* collapse penalties ``collapse/<m>`` (the soft tail energy ``R(z_m)``);
* meta-parameters ``meta/lambda|kappa|eta|mu`` (log scale), with every
  hyper-step marked: green solid line = applied, red dashed line = rejected.

After a resume (an ``{"event": "resume"}`` line) the records before it with a
larger step are dropped, since the run repeated those steps. Also writes
``training_dynamics.md``: per run the final alpha, the modality with the
largest mean information gain, the meta-parameters start -> end, the
hyper-steps applied / rejected, and the provenance; and
``training_dynamics.json``: the same per run, with the provenance. Into
``--out`` (default ``experiments/results/training_dynamics``).
"""

from __future__ import annotations

import json
import os
import re

from harness import find_runs, log, parser, write_results
from modalimmune_jax.provenance import provenance

META = ("lambda", "kappa", "eta", "mu")


def has_metrics(path: str) -> bool:
  return os.path.isfile(os.path.join(path, "metrics.jsonl"))


def labels_of(runs: list[str]) -> dict[str, str]:
  """A file-name-safe label per run: its path below the common parent."""
  common = os.path.commonpath([os.path.dirname(r) for r in runs])
  out, seen = {}, {}
  for r in runs:
    label = re.sub(r"[^A-Za-z0-9._-]+", "_", os.path.relpath(r, common)).strip("_") or "run"
    n = seen.get(label, 0)
    seen[label] = n + 1
    out[r] = label if n == 0 else f"{label}_{n}"
  return out


def method_of(run_dir: str) -> str | None:
  for name, get in (("results.json", lambda d: d["method"]),
                    ("config.json", lambda d: d["method"]["name"])):
    path = os.path.join(run_dir, name)
    if os.path.isfile(path):
      try:
        with open(path) as f:
          return get(json.load(f))
      except (OSError, ValueError, KeyError, TypeError):
        continue
  return None


def read_metrics(path: str) -> tuple[list[dict], list[dict], int]:
  """``(train logs, hypergrad events, resumes)`` in step order; a resume at step
  ``s`` drops the earlier records with a step above ``s``."""
  train, events, resumes = [], [], 0
  with open(path) as f:
    for n, line in enumerate(f, 1):
      line = line.strip()
      if not line:
        continue
      try:
        rec = json.loads(line)
      except ValueError:
        log(f"warning: {path}:{n}: not JSON, skipped")
        continue
      if rec.get("event") == "resume":
        s = rec["step"]
        train = [r for r in train if r["step"] <= s]
        events = [r for r in events if r["step"] <= s]
        resumes += 1
      elif rec.get("event") == "hypergrad":
        events.append(rec)
      elif rec.get("split") == "train" and "step" in rec:
        train.append(rec)
  train.sort(key=lambda r: r["step"])
  events.sort(key=lambda r: r["step"])
  return train, events, resumes


def modalities(train: list[dict], prefix: str) -> list[str]:
  names = []
  for r in train:
    for k in r:
      if k.startswith(prefix) and k[len(prefix):] not in names:
        names.append(k[len(prefix):])
  return names


def series(train: list[dict], key: str) -> tuple[list[int], list[float]]:
  pts = [(r["step"], r[key]) for r in train if r.get(key) is not None]
  return [p[0] for p in pts], [p[1] for p in pts]


def summarise(train: list[dict], events: list[dict]) -> dict:
  last = train[-1]
  alpha = {m: last[f"alpha/{m}"] for m in modalities(train, "alpha/")
           if f"alpha/{m}" in last}
  mean_ig = {}
  for m in modalities(train, "ig/"):
    _, v = series(train, f"ig/{m}")
    if v:
      mean_ig[m] = sum(v) / len(v)
  start, end = {}, {}
  for k in META:
    steps, v = series(train, f"meta/{k}")
    if not v:
      continue
    start[k], end[k] = v[0], v[-1]
    # a hyper-step at or before the first log moved the value that log shows
    if events and events[0]["step"] <= steps[0] and k in events[0].get("before", {}):
      start[k] = events[0]["before"][k]
    if events and events[-1]["step"] > steps[-1] and k in events[-1].get("after", {}):
      end[k] = events[-1]["after"][k]
  applied = [e for e in events if e.get("applied")]
  rejected = [e for e in events if not e.get("applied")]
  return {
      "first_step": train[0]["step"], "last_step": last["step"],
      "final_alpha": alpha,
      "mean_ig": mean_ig,
      "top_ig": max(mean_ig, key=mean_ig.get) if mean_ig else None,
      "meta_start": start, "meta_end": end,
      "hyper_applied": len(applied), "hyper_rejected": len(rejected),
      "rejected_uncertified": sum(1 for e in rejected if not e.get("certified", True)),
      "rejected_diverging": sum(1 for e in rejected if e.get("diverging")),
  }


def plot(label: str, train: list[dict], events: list[dict], path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from matplotlib.lines import Line2D
  fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex=True)
  panels = [("alpha/", "controller intensity alpha", axes[0, 0]),
            ("ig/", "information gain IG (controller's last measure)", axes[0, 1]),
            ("collapse/", "collapse penalty R(z_m)", axes[1, 0])]
  for prefix, title, ax in panels:
    names = modalities(train, prefix)
    for m in names:
      ax.plot(*series(train, prefix + m), marker=".", ms=3, label=m)
    if names:
      ax.legend(fontsize=8)
    else:
      ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
  if modalities(train, "ig/"):
    axes[0, 1].axhline(0.0, color="grey", lw=0.8, ls=":")

  ax = axes[1, 1]
  colours = dict(zip(META, ("C0", "C1", "C4", "C5")))  # not the events' green / red
  handles, positive = [], True
  for k in META:
    steps, v = series(train, f"meta/{k}")
    if v:
      positive &= min(v) > 0
      ax.plot(steps, v, color=colours[k], marker=".", ms=3)
      handles.append(Line2D([], [], color=colours[k], label=k))
      ok = [e for e in events if e.get("applied") and k in e.get("after", {})]
      ax.scatter([e["step"] for e in ok], [e["after"][k] for e in ok], color=colours[k],
                 marker="o", s=18, zorder=3, edgecolors="k", linewidths=0.4)
  n_app = sum(1 for e in events if e.get("applied"))
  for e in events:
    if e.get("applied"):
      ax.axvline(e["step"], color="green", lw=0.9, alpha=0.6)
    else:
      ax.axvline(e["step"], color="red", lw=0.9, ls="--", alpha=0.5)
  if events:
    handles += [Line2D([], [], color="green", lw=0.9, label=f"hyper-step applied ({n_app})"),
                Line2D([], [], color="red", lw=0.9, ls="--",
                       label=f"hyper-step rejected ({len(events) - n_app})")]
  if handles:
    ax.legend(handles=handles, fontsize=8)
    if positive:
      ax.set_yscale("log")
  else:
    ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
  ax.set_title("meta-parameters (BHGD)", fontsize=10)
  ax.grid(alpha=0.3, which="both")
  for ax in axes[1]:
    ax.set_xlabel("training step")
  fig.suptitle(f"ModalImmune training dynamics: {label}", fontsize=11)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _num(x) -> str:
  return "n/a" if x is None else f"{x:.4g}"


def render(rows: list[dict], skipped: list[dict]) -> list[str]:
  """The markdown below the title and the provenance lines."""
  lines = [
      "From each run's `metrics.jsonl` (train logs every `train.log_every` steps, "
      "`hypergrad` events). Final alpha: the last train log; top IG: the modality with the "
      "largest mean of `ig/<m>` over the train logs; meta-parameters: value before the "
      "first hyper-step -> value at the end; hyper-steps: `applied` flag of the events "
      "(rejected = not certified, diverging, non-finite or error bound too large).",
      "",
      "| run | steps | final alpha | top mean IG | lambda | kappa | eta | mu | "
      "hyper-steps applied / rejected | plot |",
      "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    s = r["summary"]
    alpha = ", ".join(f"{m} {v:.3f}" for m, v in s["final_alpha"].items()) or "n/a"
    ig = (f"{s['top_ig']} ({s['mean_ig'][s['top_ig']]:.3g})" if s["top_ig"] else "n/a")
    meta = [f"{_num(s['meta_start'].get(k))} -> {_num(s['meta_end'].get(k))}"
            if k in s["meta_start"] else "n/a" for k in META]
    rej = s["hyper_rejected"]
    why = []
    if s["rejected_uncertified"]:
      why.append(f"{s['rejected_uncertified']} not certified")
    if s["rejected_diverging"]:
      why.append(f"{s['rejected_diverging']} diverging")
    hyper = f"{s['hyper_applied']} / {rej}" + (f" ({', '.join(why)})" if why else "")
    lines.append(f"| {r['label']} | {s['first_step']}-{s['last_step']} | {alpha} | {ig} | "
                 + " | ".join(meta) + f" | {hyper} | `{os.path.basename(r['png'])}` |")
  if skipped:
    lines += ["", "Skipped:", ""] + [f"- {k['run']}: {k['reason']}" for k in skipped]
  return lines


def main(argv=None) -> int:
  args = parser(__doc__, "training_dynamics", quick=False, runs=True).parse_args(argv)

  runs = find_runs(args.runs, has_metrics)
  if not runs:
    raise SystemExit("error: no run directories (with metrics.jsonl) found")
  labels = labels_of(runs)
  os.makedirs(args.out, exist_ok=True)
  rows, skipped = [], []
  for i, run_dir in enumerate(runs, 1):
    label = labels[run_dir]
    method = method_of(run_dir)
    if method != "modalimmune":
      log(f"[{i}/{len(runs)}] {label}: method {method}, skipped")
      skipped.append({"run": run_dir, "reason": f"method {method}"})
      continue
    train, events, resumes = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    if not train:
      log(f"[{i}/{len(runs)}] {label}: no train logs, skipped")
      skipped.append({"run": run_dir, "reason": "no train logs"})
      continue
    png = os.path.join(args.out, f"dynamics_{label}.png")
    plot(label, train, events, png)
    s = summarise(train, events)
    rows.append({"run": run_dir, "label": label, "png": png, "summary": s,
                 "resumes": resumes})
    log(f"[{i}/{len(runs)}] {label}: {len(train)} train logs, {len(events)} hyper-steps "
        f"({s['hyper_applied']} applied), {resumes} resume(s) -> {png}")
  prov = provenance()
  write_results(args.out, "training_dynamics", {"runs": rows, "skipped": skipped},
                render(rows, skipped), title="ModalImmune training dynamics",
                details=(prov["time_utc"],), prov=prov)
  log(f"{len(rows)} ModalImmune run(s), {len(skipped)} skipped")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
