# nllb-prune: everyday entry points. Every target runs from a fresh clone; `.venv` is made on demand.
# Settings come from conf/*.yaml; override any key on the command line (e.g. make collect-stats LANG=fra_Latn).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CLI    := $(PY) -m pruning
OUT    ?= outputs

.PHONY: setup test test-fast lint demo demo-record clean help

help:
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/' | column -t -s "$$(printf '\t')"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed ## create .venv with the pinned CPU-sized dependencies

test: setup ## run the whole test suite (what CI runs, after make lint)
	$(PY) -m pytest -q

lint: setup ## ruff (lint + format check) and mypy over pruning/ and metrics/
	$(VENV)/bin/ruff check pruning metrics experiments tests
	$(VENV)/bin/ruff format --check pruning metrics experiments tests
	$(VENV)/bin/mypy

test-fast: setup ## skip tests marked slow
	$(PY) -m pytest -q -m "not slow"

demo: setup ## run the main path end to end on the embedded default (no downloads); results in $(OUT)/demo/demo.json
	$(PY) -m experiments.demo --out $(OUT)/demo

demo-record: setup ## the demo, also recording experiments/results/demo.json (tracked)
	$(PY) -m experiments.demo --out $(OUT)/demo --record

clean:
	rm -rf $(OUT) .pytest_cache

.PHONY: bench bench-gpu
bench: setup ## CPU benchmarks at small widths (MoE layer, generation); results in experiments/results/
	$(PY) -m experiments.bench.moe_layer --tokens 32,512 --repeats 3
	$(PY) -m experiments.bench.generation --batch 4 --beam 2 --new-tokens 16 --src-len 16

bench-gpu: setup ## full-width benchmarks on a CUDA GPU (random weights at 2048/8192/128)
	$(PY) -m experiments.bench.moe_layer --device cuda --d-model 2048 --ffn 8192 --dtype bf16 --repeats 10
	$(PY) -m experiments.bench.generation --device cuda --full-width --batch 16 --beam 4 --new-tokens 48

# ---- pruned model: prune (select + export), translate, evaluate. Keys from conf/*.yaml; override any of
# them with ARGS="key=value ...", e.g.
#   make prune ARGS="model=ckpt/ stats=stats.safetensors langs=fra_Latn,eng_Latn out=outputs/pruned"
#   make translate ARGS="model=outputs/pruned src=fra_Latn tgt=eng_Latn input=in.txt output=out.txt"
#   make evaluate ARGS="model=outputs/pruned data=flores200_dataset langs=fra_Latn,eng_Latn out=outputs/scores.tsv"
.PHONY: prune translate evaluate
ARGS ?=
prune: setup ## select experts and export the pruned model (conf/prune.yaml + ARGS="key=value ...")
	$(CLI) prune --config conf/prune.yaml $(ARGS)

translate: setup ## translate stdin or input= with a (pruned) model (conf/translate.yaml + ARGS)
	$(CLI) translate --config conf/translate.yaml $(ARGS)

evaluate: setup ## chrF++ / spBLEU on FLORES-200 (conf/evaluate.yaml + ARGS)
	$(CLI) evaluate --config conf/evaluate.yaml $(ARGS)

# ---- routing statistics into and out of one language, against the partners of conf/collect_stats.yaml.
#   make collect-stats LANG=fra_Latn MODEL=path/to/nllb-moe FLORES=path/to/flores200_dataset [ARGS="mode=beam ..."]
# Writes $(OUT)/stats/LANG.safetensors; re-running resumes (directions already there are skipped).
# Several GPUs: torchrun --nproc-per-node 4 -m pruning stats --config conf/collect_stats.yaml ... expert_parallel=4
MODEL        ?= checkpoints/nllb-moe-54b
FLORES       ?= flores200_dataset
.PHONY: collect-stats
collect-stats: setup ## routing statistics into/out of LANG (make collect-stats LANG=fra_Latn MODEL=.. FLORES=..)
	@if [ "$(origin LANG)" != "command line" ]; then \
		echo "usage: make collect-stats LANG=fra_Latn [MODEL=checkpoint] [FLORES=flores200_dataset] [ARGS='key=value ...']" >&2; exit 2; fi
	LANG=C.UTF-8 $(CLI) stats --config conf/collect_stats.yaml model=$(MODEL) data=$(FLORES) lang=$(LANG) \
		out=$(OUT)/stats/$(LANG).safetensors $(ARGS)

.PHONY: testbed testbed-data testbed-stats paper-studies paper-report
TESTBED_LANGS = qbe_Latn,qbo_Latn,qbr_Cyrl,qen_Latn,qka_Cyrl,qkl_Latn,qko_Cyrl,qmi_Latn,qta_Grek,qti_Grek

testbed-data: setup ## regenerate the synthetic corpus and its tokenizer (deterministic, ~15 s)
	$(PY) -m experiments.testbed.corpus --out experiments/testbed/data --seed 0
	$(PY) -m experiments.testbed.tokenizer --data experiments/testbed/data --out experiments/testbed/data/tokenizer

testbed: setup ## retrain the 128-expert testbed (resumable; MINUTES=85 by default, DEVICE=cpu|cuda; ~2 h on 2 cores for ~90 chrF++)
	$(PY) -m experiments.testbed.train --max-minutes $(or $(MINUTES),85) --device $(or $(DEVICE),cpu) --eval-every 300 --eval-sentences 30

testbed-stats: setup ## routing statistics of the testbed on dev (teacher forcing, all 90 directions)
	$(CLI) stats --model experiments/testbed/model --data experiments/testbed/data/flores --split dev \
		--langs $(TESTBED_LANGS) --out $(OUT)/testbed-stats.safetensors --resume

paper-studies: testbed-stats ## the paper's comparisons on the testbed (hydra multiruns), then the report
	bash experiments/paper/run_studies.sh
	$(PY) -m experiments.paper.report

paper-report: setup
	$(PY) -m experiments.paper.report

.PHONY: testbed-stats-outputs beyond-study beyond-report
testbed-stats-outputs: setup ## testbed statistics with --expert-outputs (dev, all 90 directions; ~45 s)
	$(CLI) stats --model experiments/testbed/model --data experiments/testbed/data/flores --split dev \
		--langs $(TESTBED_LANGS) --expert-outputs --out $(OUT)/testbed-stats-outputs.safetensors --resume

beyond-study: testbed-stats-outputs ## criterion x policy on the testbed (resumable grid, ~20 min on 2 cores), then the report
	$(PY) -m experiments.beyond.study hydra.run.dir=$(OUT)/hydra/beyond
	$(PY) -m experiments.beyond.report

beyond-report: setup
	$(PY) -m experiments.beyond.report

.PHONY: testbed-lid
testbed-lid: setup ## the testbed's language identifier for `evaluate --lid` (naive Bayes on train/, accuracy on devtest)
	$(CLI) train-lid --data experiments/testbed/data --split train --langs $(TESTBED_LANGS) --ngram-max 4 --alpha 0.1 \
		--max-features 20000 --out experiments/testbed/lid.json --eval-data experiments/testbed/data/flores --eval-split devtest

.PHONY: rehearsal rehearsal-small plan-nllb
REHEARSAL ?= $(OUT)/rehearsal
rehearsal: setup ## NLLB-200's real shapes end to end on this machine (~70 min on 2 cores, ~60 GB disk at peak, emptied at the end)
	$(PY) -m experiments.fullwidth.run --work $(REHEARSAL) --threads 1 --sentences 32
	$(PY) -m experiments.fullwidth.report

rehearsal-small: setup ## the same steps at d_model 256 (~5 min, <2 GB disk): a check of the harness
	$(PY) -m experiments.fullwidth.run --work $(OUT)/rehearsal-small --small --sentences 8 --results $(OUT)/rehearsal-small.json

plan-nllb: setup ## the memory plans the docs quote for the real NLLB-200
	$(CLI) plan --model nllb-moe-54b --gpus 4 --gpu-mem 32GB --dtype fp16 --batch-tokens 4096
	$(CLI) plan --model nllb-moe-54b --gpu-mem 32GB --dtype bf16 --batch 16 --beam 4

quant-study: setup ## quantized exports on the testbed: chrF++ / off-target at bf16, int8, int4 (paired, ~25 min on 2 cores) and weight/activation ranges
	$(PY) -m experiments.quant.study
	$(PY) -m experiments.quant.ranges
