# nllb-prune: everyday entry points. Every target runs from a fresh clone; `.venv` is made on demand.
# Settings come from conf/*.yaml; override any key on the command line (e.g. make collect-stats LANG=fra_Latn).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CLI    := $(PY) -m pruning
OUT    ?= outputs

.PHONY: setup test test-fast demo clean help

help:
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/' | column -t -s "$$(printf '\t')"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

setup: $(VENV)/.installed ## create .venv with the pinned CPU-sized dependencies

test: setup ## run the whole test suite (what CI runs)
	$(PY) -m pytest -q

test-fast: setup ## skip tests marked slow
	$(PY) -m pytest -q -m "not slow"

demo: setup ## run the main path end to end on the embedded default (no downloads)
	$(PY) -m experiments.demo --out $(OUT)/demo

clean:
	rm -rf $(OUT) .pytest_cache
