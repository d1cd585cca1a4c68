#!/usr/bin/env bash
# Every method (plain, dropout, consistency, ebr, distill, cmpt, modalimmune) on UCI
# Multiple Features and on the synthetic benchmark, 3 seeds, same tuning budget each,
# under today's protocol plus cell-eta (CPM-Net/GCNet) with robustness curves:
#
#     bash experiments/baselines.sh [--out DIR] [--workdir DIR]
#
# The runs go to WORKDIR/{mfeat,synthetic} (default runs/baselines, git-ignored; every
# run keeps its own work directory there and a rerun resumes or skips what is done);
# their comparison.{md,json,png} and cell_eta.png are then copied to OUT/{mfeat,synthetic}
# (default experiments/results/baselines, the committed results).
# Cell-eta must stay <= (M-1)/M: up to 0.7 for mfeat's 6 views, 0.6 for synthetic's 3.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=experiments/results/baselines
WORKDIR=runs/baselines
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT=$2; shift 2 ;;
    --workdir) WORKDIR=$2; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0" | cut -c3-; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done
METHODS=plain,dropout,consistency,ebr,distill,cmpt,modalimmune
python -m modalimmune_jax.compare --config=experiments/configs/mfeat.py \
  --methods=$METHODS --seeds=0,1,2 --workdir="$WORKDIR/mfeat" \
  '--config.eval.cell_etas=(0.1,0.2,0.3,0.4,0.5,0.6,0.7)' --config.eval.draws=3
python -m modalimmune_jax.compare --config=experiments/configs/synthetic.py \
  --methods=$METHODS --seeds=0,1,2 --workdir="$WORKDIR/synthetic" \
  '--config.eval.cell_etas=(0.1,0.2,0.3,0.4,0.5,0.6)' --config.eval.draws=3
for data in mfeat synthetic; do
  mkdir -p "$OUT/$data"
  cp "$WORKDIR/$data"/comparison.{md,json,png} "$WORKDIR/$data/cell_eta.png" "$OUT/$data/"
done
