#!/usr/bin/env bash
# Every method (plain, dropout, consistency, ebr, distill, cmpt, modalimmune) on UCI
# Multiple Features and on the synthetic benchmark, 3 seeds, same tuning budget each,
# under today's protocol plus cell-eta (CPM-Net/GCNet) with robustness curves:
#
#     bash experiments/baselines.sh [OUT]      # default OUT: experiments/results/baselines
#
# Writes OUT/{mfeat,synthetic}/comparison.{md,json,png} and cell_eta.png; every run
# keeps its own work directory below and a rerun resumes or skips what is done.
# Cell-eta must stay <= (M-1)/M: up to 0.7 for mfeat's 6 views, 0.6 for synthetic's 3.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-experiments/results/baselines}
METHODS=plain,dropout,consistency,ebr,distill,cmpt,modalimmune
python -m modalimmune_jax.compare --config=experiments/configs/mfeat.py \
  --methods=$METHODS --seeds=0,1,2 --workdir="$OUT/mfeat" \
  '--config.eval.cell_etas=(0.1,0.2,0.3,0.4,0.5,0.6,0.7)' --config.eval.draws=3
python -m modalimmune_jax.compare --config=experiments/configs/synthetic.py \
  --methods=$METHODS --seeds=0,1,2 --workdir="$OUT/synthetic" \
  '--config.eval.cell_etas=(0.1,0.2,0.3,0.4,0.5,0.6)' --config.eval.draws=3
