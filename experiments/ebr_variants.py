"""EBR's design choices on mfeat's valid split (what chose the defaults).

    python experiments/ebr_variants.py [--seed 0] [--workdir RUNS] [--out DIR]
    python experiments/ebr_variants.py --quick     # smoke run: the smoke config (12 steps)

Trains EBR (``experiments/configs/mfeat.py``, ``method.name = "ebr"``) once per
variant below, evaluates on the **valid** split under the comparison's tuning
protocol (today's conditions plus cell-eta 0.1-0.7, 3 mask draws) and writes
``OUT/ebr_variants.{md,json}`` (``--out``, default
``experiments/results/ebr_variants``): the selection score (what ``compare``
tunes on), full, mean cell-eta accuracy, the classifier's last training
cross-entropy (``log 6 = 1.79`` when confused) and the train time. Every run
keeps its work directory under ``RUNS/<variant>`` (``--workdir``, default
``runs/ebr_variants``, or ``runs/quick/ebr_variants`` with ``--quick``); a
rerun skips the finished ones. The test split is never read.
"""

from __future__ import annotations

import math
import os

from harness import ROOT, get_config, log, parser, train_logs, write_results
from modalimmune_jax import compare, train
from modalimmune_jax.config import with_overrides
from modalimmune_jax.protocol import selection_score

VARIANTS = {  # label -> overrides of the mfeat EBR config
    "as read (reversal, no cross term)": {"method.ebr.cross_weight": 0.0},
    "confusion, no cross term": {"method.ebr.cross_weight": 0.0,
                                 "method.ebr.adversarial": "confusion"},
    "reversal + cross term (default)": {},
    "confusion + cross term": {"method.ebr.adversarial": "confusion"},
    "confusion + cross term + dropout 0.3": {"method.ebr.adversarial": "confusion",
                                             "method.ebr.dropout_rate": 0.3},
}


def variant_row(config, label, overrides, workdir) -> dict:
  """Trains (or finds finished) one variant and reads its scores."""
  record = compare.finished(config, workdir) or train.train_and_evaluate(config, workdir)
  last = train_logs(workdir)[-1]
  protocol = record["protocol"]
  acc = {r["condition"]: r["accuracy"] for r in protocol["rows"]}
  cell = [v for k, v in acc.items() if k.startswith("cell")]
  return {"variant": label, "overrides": overrides, "workdir": workdir,
          "selection_score": selection_score(protocol, "accuracy"),
          "full": acc["full"], "cell_eta_mean": sum(cell) / len(cell),
          "classifier_ce": last["ebr_adversarial"], "cross": last.get("ebr_cross"),
          "train_seconds": record["train_seconds"]}


def main(argv=None) -> int:
  p = parser(__doc__, "ebr_variants")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--workdir", default=None, help="where the runs go (runs/ebr_variants)")
  args = p.parse_args(argv)
  workdir = args.workdir or os.path.join(
      ROOT, "runs", "quick" if args.quick else "", "ebr_variants")

  base = get_config("mfeat", "smoke" if args.quick else "", overrides={
      "method.name": "ebr", "seed": args.seed, "eval.split": "valid", "eval.draws": 3,
      "eval.cell_etas": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)})
  rows = []
  for i, (label, overrides) in enumerate(VARIANTS.items()):
    log(f"[{i + 1}/{len(VARIANTS)}] {label}")
    rows.append(variant_row(with_overrides(base, overrides), label, overrides,
                            os.path.join(workdir, str(i))))

  lines = ["| variant | selection score | full | cell-eta mean (0.1-0.7) "
           "| classifier CE at the end | train s |", "|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['variant']} | {100 * r['selection_score']:.2f} | {100 * r['full']:.2f} "
                 f"| {100 * r['cell_eta_mean']:.2f} | {r['classifier_ce']:.3g} "
                 f"| {r['train_seconds']:.0f} |")
  lines += ["", "Accuracy %. Selection score: the mean over full and every missing-modality "
            "condition (what `compare` tunes on). Classifier CE: the modality classifier's "
            f"cross-entropy at the last logged training step (log 6 = {math.log(6):.2f} when "
            "it is confused). One seed: a design check on the valid split, not a result."]
  write_results(args.out, "ebr_variants", {"rows": rows}, lines,
                title=f"EBR variants, mfeat, valid split, seed {args.seed}", seed=args.seed)
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
