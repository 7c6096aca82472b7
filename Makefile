# embcomp: every target that needs the virtual environment builds it first.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
DEVICE ?= cpu
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-$(DEVICE)
# Where a CPU build of torch comes from when the configured pip sources lack it.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup test test-all experiment ui lint clean

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_%-]+:.*## ' $(MAKEFILE_LIST) | sort | \
	  awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-22s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
ifeq ($(DEVICE),cuda)
	$(PY) -m pip uninstall -y -q fbgemm-gpu-cpu || true
	$(PY) -m pip install -q "torch==2.13.0"
else ifeq ($(DEVICE),cpu)
	$(PY) -m pip install -q "torch==2.13.0+cpu" 2>/dev/null || \
	  $(PY) -m pip install -q "torch==2.13.0+cpu" --extra-index-url $(TORCH_CPU_INDEX)
else
	$(error DEVICE must be cpu or cuda, got '$(DEVICE)')
endif
	$(PY) -m pip install -q -e ".[dev,$(DEVICE)]"
	$(PY) -m pip install -q --no-deps "torchrec==1.8.0"
	rm -f $(VENV)/.setup-*
	touch $@

setup: $(STAMP) ## build .venv with the pinned stack (DEVICE=cpu|cuda)

test: $(STAMP) ## run the test suite (what CI runs)
	$(PY) -m pytest -q -m "not slow and not gpu" $(ARGS)

test-all: $(STAMP) ## run every test, slow ones included
	$(PY) -m pytest -q $(ARGS)

experiment: $(STAMP) ## the main job: baselines on MovieLens-100K and the Criteo sample, into MLflow
	$(PY) -m experiments.run --multirun experiment=baseline $(ARGS)

ui: $(STAMP) ## serve the MLflow UI for ./mlflow.db on 127.0.0.1
	@echo "MLflow UI: http://127.0.0.1:$${PORT:-5000}"
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1 --port $${PORT:-5000}

lint: $(STAMP) ## ruff and mypy
	$(VENV)/bin/ruff check recsys compression experiments tests
	$(VENV)/bin/mypy

clean: ## remove caches and outputs (keeps .venv and mlflow.db)
	rm -rf outputs multirun reports data/cache .pytest_cache .ruff_cache .mypy_cache
