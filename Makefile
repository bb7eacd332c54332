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

# `make exp-show`: the experiments in 120 columns: what changed, and the test and val accuracy even when
# equal; no hash columns, and not the on-demand metrics (release's int8, audit's mislabelled, their md5):
# an experiment that did not run them would show the baseline's.
EXP_SHOW_DROP := Created|State|Executor|data/.*|models/.*|int8|mislabelled|(metrics/(export|suspects)\.json:)?md5
EXP_SHOW_KEEP := ^accuracy$$|^val_accuracy$$
exp-show: $(STAMP)
	$(BIN)/dvc exp show --only-changed --drop '$(EXP_SHOW_DROP)' --keep '$(EXP_SHOW_KEEP)' $(ARGS)

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
