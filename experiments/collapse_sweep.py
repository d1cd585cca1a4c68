"""Does the collapse penalty collapse? ModalImmune over a grid of ``lambda`` and ``kappa``.

    python experiments/collapse_sweep.py [--configs mfeat synthetic]
        [--lambdas 0.01 0.1 1 10] [--kappas 0.7 0.9] [--seed 0]
        [--workdir runs/collapse_sweep] [--out DIR] [--quick]

Each point trains ModalImmune with ``collapse_weight = lambda`` and ``kappa``
held fixed (``bhgd`` off, so the sweep measures the penalty at that weight, not
where BHGD moves it), every other setting the config's, one seed, and evaluates
it on the **valid** split (the defaults are chosen here; the test split is not
read). Per point:

* the selection score (``protocol.selection_score``: the headline metric over
  ``full`` and every missing-modality condition), ``full`` and the mean over the
  missing-modality conditions, on valid;
* each modality's collapse penalty ``R(z_m)`` (the tail energy beyond the
  ``kappa`` quantile, logged every ``train.log_every`` steps) at the first and
  the last logged step, and the intensities ``alpha`` at the end: the
  *targeted* modality is the one with the highest mean intensity over training;
* each modality's collapse severity (``spectral.collapse_severity``, centred,
  float64: 0 isotropic, 1 rank one) of the encoders' output over the valid split
  at the end of training.

Writes ``collapse_sweep.{json,md}`` into ``--out`` (default
``experiments/results/collapse_sweep``): one table per data set, and the point
with the best selection score per data set (the regime chosen on valid). The
runs stay in ``--workdir`` (resumed or skipped when done), so
``collapse_vs_robustness.py`` can read them too. ``--quick``: the smoke
configs, two points per data set.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from harness import get_config, log, parser, restore, train_logs, write_results
from modalimmune_jax import protocol, spectral
from modalimmune_jax.compare import run_once
from modalimmune_jax.step import device_batch, host_copy

NAME = "collapse_sweep"


def point_config(data: str, lam: float, kappa: float, seed: int, quick: bool):
  return get_config(data, "smoke" if quick else "", overrides={
      "method.name": "modalimmune", "seed": seed, "eval.split": "valid",
      "method.modalimmune.bhgd": False, "method.modalimmune.collapse_weight": lam,
      "method.modalimmune.kappa": kappa})


def severities(config, run_dir: str) -> dict[str, float]:
  """Collapse severity of each modality's encoder output over the evaluated split."""
  run, _, state = restore(config, run_dir)
  if state is None:
    raise RuntimeError(f"{run_dir}: no checkpoint")
  params = host_copy(state).params
  encode = jax.jit(lambda p, b: run.model.apply(p, b, None, train=False)["embeddings"])
  split = run.dataset.splits[config.eval.split]
  z = np.concatenate([np.asarray(encode(params, device_batch(split.batch(idx))))
                      for idx in split.batch_indices(config.eval.batch_size)])
  with jax.enable_x64(True):
    return {m: float(spectral.collapse_severity(jnp.asarray(z[:, j], jnp.float64)))
            for j, m in enumerate(run.dataset.modality_names)}


def point(data: str, lam: float, kappa: float, seed: int, workdir: str, quick: bool) -> dict:
  config = point_config(data, lam, kappa, seed, quick)
  run_dir = os.path.join(workdir, data, f"lambda{lam:g}_kappa{kappa:g}")
  record = run_once(config, run_dir)
  metric = record["headline_metric"]
  prot = record["protocol"]
  kinds = {c["name"]: c["kind"] for c in prot["meta"]["conditions"]}
  rows = {r["condition"]: r[metric] for r in prot["rows"]}
  missing = [v for c, v in rows.items() if kinds[c] in protocol.MISSING_KINDS and v is not None]
  logs = [r for r in train_logs(run_dir) if any(k.startswith("collapse/") for k in r)]
  sev = severities(config, run_dir)
  names = list(sev)  # the data set's modality order
  alpha = {m: float(np.mean([r[f"alpha/{m}"] for r in logs])) for m in names}
  return {
      "data": data, "lambda": lam, "kappa": kappa, "seed": seed, "run_dir": run_dir,
      "metric": metric, "score": protocol.selection_score(prot, metric),
      "full": rows["full"], "mean_missing": float(np.mean(missing)),
      "penalty_first": {m: logs[0][f"collapse/{m}"] for m in names},
      "penalty_last": {m: logs[-1][f"collapse/{m}"] for m in names},
      "penalty_steps": [logs[0]["step"], logs[-1]["step"]],
      "alpha_mean": alpha, "alpha_last": {m: logs[-1][f"alpha/{m}"] for m in names},
      "targeted": max(alpha, key=alpha.get),
      "severity": sev,
  }


def render(points: list[dict]) -> list[str]:
  lines = []
  for data in dict.fromkeys(p["data"] for p in points):
    rows = [p for p in points if p["data"] == data]
    best = max(rows, key=lambda p: p["score"])
    names = list(rows[0]["severity"])
    lines += [f"## {data} (valid split, {rows[0]['metric']}, seed {rows[0]['seed']})", "",
              "R: the targeted modality's collapse penalty (tail energy beyond kappa) at the "
              "first and last logged step; severity: each modality's collapse severity over "
              "the valid split at the end (0 isotropic, 1 rank one).", "",
              "| lambda | kappa | score | full | mean missing | targeted (mean alpha) | "
              "R first -> last | " + " | ".join(f"severity {m}" for m in names) + " |",
              "|---:|---:|---:|---:|---:|---|---|" + "---:|" * len(names)]
    for p in rows:
      t = p["targeted"]
      mark = " **(best)**" if p is best else ""
      lines.append(
          f"| {p['lambda']:g}{mark} | {p['kappa']:g} | {100 * p['score']:.2f} | "
          f"{100 * p['full']:.2f} | {100 * p['mean_missing']:.2f} | {t} "
          f"({p['alpha_mean'][t]:.2f}) | {p['penalty_first'][t]:.3f} -> "
          f"{p['penalty_last'][t]:.3f} | "
          + " | ".join(f"{p['severity'][m]:.3f}" for m in names) + " |")
    lines.append("")
  return lines


def main(argv=None) -> int:
  p = parser(__doc__.split("\n\n")[0], NAME)
  p.add_argument("--configs", nargs="+", default=["mfeat", "synthetic"])
  p.add_argument("--lambdas", nargs="+", type=float, default=[0.01, 0.1, 1.0, 10.0])
  p.add_argument("--kappas", nargs="+", type=float, default=[0.7, 0.9])
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--workdir", default=os.path.join("runs", NAME))
  args = p.parse_args(argv)
  lambdas, kappas = (args.lambdas[:1] + args.lambdas[-1:], args.kappas[-1:]) if args.quick \
      else (args.lambdas, args.kappas)
  points = []
  for data in args.configs:
    for lam in lambdas:
      for kappa in kappas:
        log(f"{data}: lambda {lam:g}, kappa {kappa:g}")
        points.append(point(data, lam, kappa, args.seed, args.workdir, args.quick))
  best = {d: max((q for q in points if q["data"] == d), key=lambda q: q["score"])
          for d in args.configs}
  write_results(args.out, NAME, {"points": points,
                                 "best": {d: {"lambda": b["lambda"], "kappa": b["kappa"],
                                              "score": b["score"]} for d, b in best.items()}},
                render(points), title="Collapse penalty sweep (ModalImmune, BHGD off)",
                seeds=[args.seed], quick=args.quick)
  return 0


if __name__ == "__main__":
  sys.exit(main())
