# `make run` and `make test` are the whole quickstart: each sets up .venv first if needed.
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
# Stages run as `python -m stages X` from dvc.yaml: the venv's python must come first on PATH.
export PATH := $(BIN):$(PATH)

.PHONY: run test bench clean-venv

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/dvc repro

test: $(STAMP)
	$(BIN)/python -m pytest

clean-venv:
	rm -rf $(VENV)
