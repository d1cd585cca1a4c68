"""EBR's finished seeds re-evaluated without the test-time fill.

    python experiments/ebr_without_fill.py RUNS/mfeat/ebr [--seeds 0,1,2] [--workdir DIR]
        [--out DIR]

For each ``seed<k>`` under the first argument (a ``compare`` method directory),
copies the run to ``WORKDIR/seed<k>`` (``--workdir``, default
``runs/ebr_without_fill``) and evaluates the same checkpoint under the same
protocol with a hook that keeps EBR's round trip ``h_m^-1(h_m(z_m))`` for
present cells and leaves missing cells to the model's own generator (no
``h_m^-1(g_j)`` fill). Prints both tables' accuracy, mean ± std over seeds,
and writes them with provenance to ``OUT/ebr_without_fill.{md,json}``
(``--out``, default ``experiments/results/ebr_without_fill``).
"""

from __future__ import annotations

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np

from harness import ROOT, log, parser, run_config, write_results
from modalimmune_jax import methods, train


def without_fill(config, dataset):
  """A method builder: the configured EBR with the test-time fill switched off."""
  def build(model):
    method = methods.from_config(config, model, dataset)

    def predict_hook(params, state):
      full = method.predict_hook(params, state)

      def hook(z, present):
        f, _ = full(z, present)
        return jnp.where(present[..., None], f, z).astype(z.dtype), present
      return hook
    return method._replace(predict_hook=predict_hook)
  return build


def evaluate_seed(src: str, dst: str) -> list[tuple[str, float, float]]:
  """``(condition, accuracy with the fill, without)`` of one finished run."""
  shutil.rmtree(dst, ignore_errors=True)
  shutil.copytree(src, dst)
  os.remove(os.path.join(dst, "results.json"))
  config = run_config(dst)
  summary = train.train_and_evaluate(config, dst,
                                     method=without_fill(config, train.load_data(config)))
  with open(os.path.join(src, "results.json")) as f:
    before = json.load(f)["protocol"]["rows"]
  return [(a["condition"], a["accuracy"], b["accuracy"])
          for a, b in zip(before, summary["protocol"]["rows"])]


def main(argv=None) -> int:
  p = parser(__doc__, "ebr_without_fill", quick=False)
  p.add_argument("method_dir", metavar="RUN_DIR", help="a compare method directory (seed<k>/)")
  p.add_argument("--seeds", default="0,1,2")
  p.add_argument("--workdir", default=os.path.join(ROOT, "runs", "ebr_without_fill"),
                 help="where the copies are evaluated (runs/ebr_without_fill)")
  args = p.parse_args(argv)
  rows = {}
  for seed in (int(s) for s in args.seeds.split(",")):
    log(f"seed {seed}")
    src, dst = (os.path.join(r, f"seed{seed}") for r in (args.method_dir, args.workdir))
    for condition, with_fill, without in evaluate_seed(src, dst):
      rows.setdefault(condition, []).append((with_fill, without))
  lines = [f"accuracy %, mean ± std (ddof 1) over seeds {args.seeds}, the evaluated split, "
           "the same checkpoints", "", "| condition | with fill | without fill |",
           "|---|---:|---:|"]
  for condition, values in rows.items():
    v = 100 * np.array(values)
    std = (lambda x: x.std(ddof=1)) if len(v) > 1 else (lambda x: float("nan"))
    lines.append(f"| {condition} | {v[:, 0].mean():.2f} ± {std(v[:, 0]):.2f} | "
                 f"{v[:, 1].mean():.2f} ± {std(v[:, 1]):.2f} |")
  write_results(args.out, "ebr_without_fill",
                {"runs": os.path.abspath(args.method_dir), "seeds": args.seeds,
                 "accuracy": {c: {"with_fill": [a for a, _ in v], "without_fill": [b for _, b in v]}
                              for c, v in rows.items()}},
                lines, title="EBR, with and without the test-time fill")
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
