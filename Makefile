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
# V=1: the libraries' INFO lines and Hydra's launch lines too (a sweep prints a line per job)
V ?=
RUN_ARGS = $(if $(V),verbose=true hydra/hydra_logging=default) $(ARGS)
# pytest-xdist workers of make test (each runs torch on one thread)
TEST_WORKERS ?= auto
EXP ?= comparison
# sweep parent run id(s) for make report (default: the experiment's latest sweep)
PARENT ?=
# processes of a sharded run (make experiment-distributed), and torchrun's rendezvous flags
NPROC ?= 2
TORCHRUN_ARGS ?= --standalone
PORT ?= 5000
# the FuxiCTR peer (make peer-compare): its script, its own venv (FuxiCTR needs polars < 2)
PEER ?=
PEER_VENV ?= .peer-venv
DATASET ?= movielens_100k
MODEL ?= deepfm
SEEDS ?= 3
TRACKING_URI ?= sqlite:///mlflow.db
EXPERIMENTS := $(basename $(notdir $(wildcard experiments/conf/experiment/*.yaml)))

.DEFAULT_GOAL := help
.PHONY: help setup test test-all advise experiment experiment-distributed sweep report readme-table ui lint clean peer-setup peer-compare bench-step bench-lookup bench-throughput

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_%-]+:.*## ' $(MAKEFILE_LIST) | \
	  awk 'BEGIN {FS = ":.*## "}; {printf "  %-28s %s\n", $$1, $$2}'
	@echo "  named experiments (make experiment-<name>):"
	@for f in experiments/conf/experiment/*.yaml; do \
	  n=$$(basename $$f .yaml); d=$$(grep -m1 -E '^# [^@]' $$f | sed 's/^# //'); \
	  printf "    %-26s %s\n" "experiment-$$n" "$$d"; done

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
	$(PY) -m pip install -q --no-deps "torchrec==1.8.0" "hydra-optuna-sweeper==1.3.0"
	@# the C++ kernels (the MLP's, pooled lookups', managed collisions' (MCH and MPZCH), universal hashes', Criteo TSV's), built now rather than on first use (about 20 s each)
	$(PY) -c "from recsys.models.fused import kernel; print('C++ kernel:', 'built' if kernel() else 'not built: torch ops')"
	$(PY) -c "from compression.bags import kernel; print('one-hot lookup kernel:', 'built' if kernel() else 'not built: torch ops')"
	$(PY) -c "from compression.methods.managed_collision import kernel; print('MC kernel:', 'built' if kernel() else 'not built: TorchRec ops')"
	$(PY) -c "from compression.hashing import kernel; print('hash kernel:', 'built' if kernel() else 'not built: torch ops')"
	$(PY) -c "from recsys.data.criteo import tsv_parser; print('TSV parser:', 'built' if tsv_parser() else 'not built: polars alone')"
	rm -f $(VENV)/.setup-*
	touch $@

setup: $(STAMP) ## build .venv with the pinned stack (DEVICE=cpu|cuda)

test: $(STAMP) ## run the test suite (what CI runs)
	$(PY) -m pytest -q -m "not slow and not gpu" -n $(TEST_WORKERS) $(ARGS)

test-all: $(STAMP) ## run every test, slow ones included
	$(PY) -m pytest -q $(ARGS)

advise: $(STAMP) ## which method loses least at a budget, within a compute budget: make advise ARGS="dataset=movielens_100k budget=10x advise.minutes=30"
	$(PY) -m experiments.advise $(ARGS)

experiment: $(STAMP) ## the main job: nine methods at 10x/100x/1000x + baseline (MovieLens-100K), report
	$(PY) -m experiments.run --multirun experiment=comparison $(RUN_ARGS)

experiment-distributed: $(STAMP) ## sharded training: torchrun, NPROC processes (gloo on CPUs, NCCL on GPUs)
	$(VENV)/bin/torchrun $(TORCHRUN_ARGS) --nproc-per-node=$(NPROC) -m experiments.run --multirun experiment=distributed $(RUN_ARGS)

experiment-%: $(STAMP) ## run experiments/conf/experiment/<name>.yaml as one sweep (see below)
	@test -f experiments/conf/experiment/$*.yaml || { echo "error: no experiment '$*'; have: $(EXPERIMENTS)"; exit 1; }
	$(PY) -m experiments.run --multirun experiment=$* $(RUN_ARGS)

sweep: $(STAMP) ## any Hydra multirun: make sweep ARGS="compression=hashing,qr budget=10x,100x"
	$(PY) -m experiments.run --multirun $(RUN_ARGS)

report: $(STAMP) ## Pareto report of an experiment's latest sweep: make report EXP=comparison [PARENT="id1 id2"]
	$(PY) -m experiments.report --experiment $(EXP) $(if $(PARENT),--parent $(PARENT))

readme-table: $(STAMP) ## regenerate the comparison table of docs/results.md from the latest 'comparison' sweep in MLflow
	$(PY) -m experiments.readme_table --experiment comparison

$(PEER_VENV)/.setup:
	$(PYTHON) -m venv $(PEER_VENV)
	$(PEER_VENV)/bin/python -m pip install -q "torch==2.13.0+cpu" "fuxictr==2.3.10" "polars<2" 2>/dev/null || \
	  $(PEER_VENV)/bin/python -m pip install -q "torch==2.13.0+cpu" "fuxictr==2.3.10" "polars<2" --extra-index-url $(TORCH_CPU_INDEX)
	touch $@

peer-setup: $(PEER_VENV)/.setup ## the FuxiCTR peer's own venv ($(PEER_VENV)), never the project's

peer-compare: $(STAMP) $(PEER_VENV)/.setup ## embcomp vs FuxiCTR, same split: make peer-compare PEER=fuxictr_peer.py [DATASET= MODEL= SEEDS=]
	@test -n "$(PEER)" || { echo "error: set PEER=<path to fuxictr_peer.py> (the FuxiCTR peer script)"; exit 1; }
	$(PY) -m experiments.peer --peer-python $(PEER_VENV)/bin/python --peer-script $(PEER) \
	  --dataset $(DATASET) --model $(MODEL) --seeds $(SEEDS) $(ARGS)

bench-step: $(STAMP) ## training step time of every method against none, same batches (ARGS="--ratio 10")
	$(PY) -m experiments.benches.step $(ARGS)

bench-throughput: $(STAMP) ## training samples/s against the GEMM peak and memory bandwidth, step phases (ARGS="--vocab sample")
	$(PY) -m experiments.benches.throughput $(ARGS)

bench-lookup: $(STAMP) ## inference lookup time of quantized tables against fp32
	$(PY) -m experiments.benches.lookup $(ARGS)

ui: $(STAMP) ## serve the MLflow UI for ./mlflow.db on 127.0.0.1 (PORT=5000)
	@echo "MLflow UI: http://127.0.0.1:$(PORT)"
	@$(PY) -m experiments.dashboard --tracking-uri $(TRACKING_URI) --ui http://127.0.0.1:$(PORT)/
	$(VENV)/bin/mlflow ui --backend-store-uri $(TRACKING_URI) --host 127.0.0.1 --port $(PORT)

lint: $(STAMP) ## ruff and mypy
	$(VENV)/bin/ruff check recsys compression experiments tests
	$(VENV)/bin/mypy

clean: ## remove caches and outputs (keeps .venv and mlflow.db)
	rm -rf outputs multirun reports data/cache .pytest_cache .ruff_cache .mypy_cache
