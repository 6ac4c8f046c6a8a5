#!/usr/bin/env bash
# The paper's comparisons on the testbed, as hydra multiruns of experiments.paper.study.
# Each run writes one JSON row to experiments/results/paper/runs/; `python -m experiments.paper.report`
# turns them into experiments/results/paper/README.md and ratio_curves.png.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
study() { "$PY" -m experiments.paper.study "$@" hydra.run.dir=outputs/hydra/run hydra.sweep.dir=outputs/hydra/multirun; }

study study=ratio baseline=full
# pruning ratio: per-language importance vs one global set vs random experts (same per-layer counts)
study -m study=ratio baseline=none,random select.ratio=0.5,0.625,0.75,0.875
study -m study=ratio select.granularity=global select.ratio=0.5,0.625,0.75,0.875
# metrics at 75% (3:1 keeps 6+6 encoder and 2+2 decoder experts of 16 per layer)
study -m study=metric select.ratio=0.75 select.metric=top1,top2,mean,rank,conf1,importance,load
# strategies
study -m study=strategy select.ratio=0.75 select.strategy=per-layer,global
# encoder:decoder split
study -m study=encdec select.ratio=0.75 select.enc_dec=1:1,3:1,1:3
# granularity
study -m study=granularity select.ratio=0.75 select.granularity=global,pair,lang
