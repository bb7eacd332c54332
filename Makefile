# `make run` and `make test` are the whole quickstart: each sets up .venv first if needed.
# Every target runs the venv's tools with the venv first on PATH, so nothing needs activating.
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
# Stages run as `python -m stages X` from dvc.yaml: the venv's python must come first on PATH.
export PATH := $(BIN):$(PATH)
ARGS ?=

.PHONY: run repro release audit exp exp-show metrics plots test test-fast lint deps clean-venv

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)               # everything: the experiment loop (dvc.yaml), shipping and audits
	$(BIN)/dvc repro --all-pipelines

repro: $(STAMP)             # the experiment loop alone; make repro ARGS="-f train"
	$(BIN)/dvc repro $(ARGS)

release: $(STAMP)           # the loop, then ONNX, INT8 and latency (release/dvc.yaml)
	$(BIN)/dvc repro release/dvc.yaml

audit: $(STAMP)             # the loop, then label suspects and heat maps (audit/dvc.yaml)
	$(BIN)/dvc repro audit/dvc.yaml

exp: $(STAMP)               # make exp ARGS="-S train.lr=0.003"
	$(BIN)/dvc exp run $(ARGS)

exp-show: $(STAMP)          # the experiments in 120 columns: what changed, no hash columns, and not the
	@# on-demand metrics (export, suspects): an experiment that did not run them would show the baseline's
	$(BIN)/dvc exp show --only-changed --drop 'Created|State|Executor|data/.*|models/.*|metrics/export.json:.*|metrics/suspects.json:.*' $(ARGS)

metrics: $(STAMP)
	$(BIN)/dvc metrics show $(ARGS)

plots: $(STAMP)
	$(BIN)/dvc plots show $(ARGS)

test: $(STAMP) lint
	$(BIN)/python -m pytest $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

deps: $(STAMP)              # each stage's code deps in dvc.yaml: the files it imports (tools/code_deps.py)
	$(BIN)/python -m tools.code_deps --write

test-fast: $(STAMP)         # the suite without the tests marked slow
	$(BIN)/python -m pytest -m "not slow" $(ARGS)

clean-venv:
	rm -rf $(VENV)
