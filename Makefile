# ggans: common tasks. `make install` then `make quick` is the README's first run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export GGANS_DATA_DIR ?= $(abspath ../shared/data/mnist)

.PHONY: install quick run test test-all lint bench classifier clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

install: $(BIN)/python  ## a virtual environment with ggans, its dev tools and the CPU plug-in
	$(BIN)/pip install -e ".[dev,cpu]"

quick: install  ## the quick experiment: minutes on a laptop CPU
	$(BIN)/python -m ggans experiment=quick

run: install  ## the paper's settings (GPU-sized); pass ARGS="protocol=federated nodes=100"
	$(BIN)/python -m ggans $(ARGS)

test: install  ## the test suite (slow tests excluded), as CI runs it
	$(BIN)/python -m pytest -m "not slow" -n 2

test-all: install  ## every test, slow ones included
	$(BIN)/python -m pytest

lint:
	$(BIN)/ruff check src tests benchmarks && $(BIN)/ruff format --check src tests benchmarks

bench:  ## replica-steps per second of the compiled round against a naive loop
	$(BIN)/python benchmarks/bench.py

classifier:  ## retrain the shipped MNIST classifier used by the MS and FID scores
	$(BIN)/python -m ggans.classifier --data-dir $(GGANS_DATA_DIR)

clean:  ## remove caches and run outputs (keeps outputs/.gitkeep)
	rm -rf .pytest_cache .ruff_cache build dist src/*.egg-info multirun
	find outputs -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# --- Reproducing the paper: the experiments of conf/experiment/ as Hydra multiruns, each job
# in a fixed folder outputs/experiments/<scale>/<experiment>/<run>, so a rerun skips finished
# jobs and resumes stopped ones; then the figures and tables of `python -m ggans.report` in
# outputs/experiments/<scale>/<experiment>/figures. LOGGER=wandb (default) also logs to W&B
# (offline without an API key: `wandb sync`); LOGGER=none turns it off. ARGS passes more
# overrides to every job (e.g. seed=1, hydra/launcher=parallel, hydra/launcher=slurm).
LOGGER ?= wandb
ARGS ?=
SCALE ?= paper
SEEDS ?= 5
GGANS := $(BIN)/python -m ggans -m logger=$(LOGGER)
EXPERIMENTS_DIR := outputs/experiments

.PHONY: reproduce-paper reproduce-paper-quick k-sweep k-sweep-quick faults faults-quick figures

reproduce-paper: $(BIN)/python  ## Figures 2-5 at the paper's scale (GPU), then the figures
	$(GGANS) experiment=scalability $(ARGS); s=$$?; \
	$(GGANS) experiment=non_iid $(ARGS) || s=$$?; \
	$(MAKE) --no-print-directory figures SCALE=paper; exit $$s

reproduce-paper-quick: $(BIN)/python  ## the same, CPU-sized (small model, 1-5% of MNIST), 5 seeds
	$(GGANS) experiment=scalability scale=quick seeds=$(SEEDS) $(ARGS); s=$$?; \
	$(GGANS) experiment=non_iid scale=quick seeds=$(SEEDS) $(ARGS) || s=$$?; \
	$(MAKE) --no-print-directory figures SCALE=quick; exit $$s

k-sweep: $(BIN)/python  ## beyond the paper: K in {50, 200, 1000} at N = 10 (GPU)
	$(GGANS) experiment=k_sweep $(ARGS); s=$$?; \
	$(MAKE) --no-print-directory figures SCALE=paper; exit $$s

k-sweep-quick: $(BIN)/python  ## the K sweep, CPU-sized: K in {20, 100, 400}
	$(GGANS) experiment=k_sweep scale=quick $(ARGS); s=$$?; \
	$(MAKE) --no-print-directory figures SCALE=quick; exit $$s

faults: $(BIN)/python  ## beyond the paper: gossip and federated under node drops, message loss
	$(GGANS) experiment=faults $(ARGS); s=$$?; \
	$(MAKE) --no-print-directory figures SCALE=paper; exit $$s

faults-quick: $(BIN)/python  ## the faults experiment, CPU-sized
	$(GGANS) experiment=faults scale=quick $(ARGS); s=$$?; \
	$(MAKE) --no-print-directory figures SCALE=quick; exit $$s

figures: $(BIN)/python  ## figures + results.md of every experiment in $(EXPERIMENTS_DIR)/$(SCALE)
	@found=; for d in $(EXPERIMENTS_DIR)/$(SCALE)/*/; do \
	  [ -d "$$d" ] || continue; found=1; \
	  $(BIN)/python -m ggans.report "$$d" --out "$${d}figures" \
	    --title "$$(basename $$d) ($(SCALE))" || exit 1; \
	done; [ -n "$$found" ] || echo "no experiment folders in $(EXPERIMENTS_DIR)/$(SCALE)"
