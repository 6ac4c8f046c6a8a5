#!/usr/bin/env bash
# The paper's comparisons on the testbed, as hydra multiruns of experiments.paper.study.
# Each run writes one JSON row to experiments/results/paper/runs/; `python -m experiments.paper.report`
# turns them into experiments/results/paper/README.md and ratio_curves.png.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
CONFIG=${CONFIG:-study}   # study: the 16-expert testbed; study128: the 128-expert one (RATIO=0.8 there, the paper's)
RATIO=${RATIO:-0.75}      # the ratio of the metric, strategy, encoder:decoder and granularity studies
RATIOS=${RATIOS:-0.5,0.625,0.75,0.875}
study() { "$PY" -m experiments.paper.study --config-name "$CONFIG" "$@" hydra.run.dir=outputs/hydra/run hydra.sweep.dir=outputs/hydra/multirun; }

study -m study=ratio baseline=full,floor
# pruning ratio: per-language importance vs one global set vs random experts (same per-layer counts)
study -m study=ratio baseline=none,random "select.ratio=$RATIOS"
study -m study=ratio select.granularity=global "select.ratio=$RATIOS"
# metrics (16 experts at 75%: 3:1 keeps 6+6 encoder and 2+2 decoder experts per layer; 128 at 80%: 36/12)
study -m study=metric "select.ratio=$RATIO" select.metric=top1,top2,mean,rank,conf1,importance,load
# strategies
study -m study=strategy "select.ratio=$RATIO" select.strategy=per-layer,global
# encoder:decoder split
study -m study=encdec "select.ratio=$RATIO" select.enc_dec=1:1,3:1,1:3
# granularity
study -m study=granularity "select.ratio=$RATIO" select.granularity=global,pair,lang
