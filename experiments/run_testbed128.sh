#!/usr/bin/env bash
# Everything the 128-expert testbed's results need, resumable (each study skips the runs it has):
#   bash experiments/run_testbed128.sh      (~1-2 h on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
MODEL=experiments/testbed/model128
LANGS=qbe_Latn,qbo_Latn,qbr_Cyrl,qen_Latn,qka_Cyrl,qkl_Latn,qko_Cyrl,qmi_Latn,qta_Grek,qti_Grek
$PY -m pruning stats --model $MODEL --data experiments/testbed/data/flores --split dev --langs $LANGS \
    --out outputs/testbed128-stats.safetensors --resume --no-progress
CONFIG=study128 RATIO=0.8 RATIOS=0.5,0.8,0.906 bash experiments/paper/run_studies.sh
$PY -m experiments.paper.report --results experiments/results/paper128
$PY -m pruning stats --model $MODEL --data experiments/testbed/data/flores --split dev --langs $LANGS --expert-outputs \
    --out outputs/testbed128-stats-outputs.safetensors --resume --no-progress
$PY -m experiments.beyond.study --config-name study128 hydra.run.dir=outputs/hydra/beyond128
$PY -m experiments.beyond.report --results experiments/results/beyond128
$PY -m experiments.beyond.study --config-name study128 granularity=global results=experiments/results/beyond128/global \
    hypotheses=outputs/beyond128/global-hypotheses 'criteria=[importance]' 'policies=[drop,skip]' hydra.run.dir=outputs/hydra/beyond128-global
$PY -m experiments.beyond.report --results experiments/results/beyond128/global
