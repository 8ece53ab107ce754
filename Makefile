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
	$(BIN)/python -m pytest -m "not slow"

test-all: install  ## every test, slow ones included
	$(BIN)/python -m pytest

lint:
	$(BIN)/ruff check src tests && $(BIN)/ruff format --check src tests

bench:  ## replica-steps per second of the compiled round against a naive loop
	$(BIN)/python -m ggans.bench

classifier:  ## retrain the shipped MNIST classifier used by the MS and FID scores
	$(BIN)/python -m ggans.classifier --data-dir $(GGANS_DATA_DIR)

clean:  ## remove caches and run outputs (keeps outputs/.gitkeep)
	rm -rf .pytest_cache .ruff_cache build dist src/*.egg-info multirun
	find outputs -mindepth 1 ! -name .gitkeep -exec rm -rf {} +
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# --- Reproducing the paper: sweeps/*.yaml run by `python -m ggans.sweep` (finished jobs are
# skipped, so a rerun resumes), figures and tables by `python -m ggans.report`. Job folders:
# $(SWEEPS_DIR)/{paper,quick}/<sweep>/<run>; figures: $(SWEEPS_DIR)/<variant>/<sweep>/figures.
# LOGGER=wandb (default) also logs to W&B (offline without an API key: `wandb sync`);
# LOGGER=none turns it off. SWEEP_ARGS passes more overrides to every job (e.g. seed=1).
SWEEPS_DIR ?= outputs/sweeps
LOGGER ?= wandb
SWEEP_ARGS ?=
VARIANT ?= paper
PAPER_SWEEPS := sweeps/scalability.yaml sweeps/non_iid.yaml
SWEEP := $(BIN)/python -m ggans.sweep --out $(SWEEPS_DIR)

.PHONY: reproduce-paper reproduce-paper-quick k-sweep k-sweep-quick faults faults-quick figures

reproduce-paper: $(BIN)/python  ## Figures 2-5 at the paper's scale (GPU), then the figures
	$(SWEEP) $(PAPER_SWEEPS) logger=$(LOGGER) $(SWEEP_ARGS); s=$$?; \
	$(MAKE) --no-print-directory figures VARIANT=paper; exit $$s

reproduce-paper-quick: $(BIN)/python  ## the same, CPU-sized (tiny model, 1-5% of MNIST)
	$(SWEEP) $(PAPER_SWEEPS) --quick logger=$(LOGGER) $(SWEEP_ARGS); s=$$?; \
	$(MAKE) --no-print-directory figures VARIANT=quick; exit $$s

k-sweep: $(BIN)/python  ## beyond the paper: K in {50, 200, 1000} at N = 10 (GPU)
	$(SWEEP) sweeps/k_sweep.yaml logger=$(LOGGER) $(SWEEP_ARGS); s=$$?; \
	$(MAKE) --no-print-directory figures VARIANT=paper; exit $$s

k-sweep-quick: $(BIN)/python  ## the K sweep, CPU-sized
	$(SWEEP) sweeps/k_sweep.yaml --quick logger=$(LOGGER) $(SWEEP_ARGS); s=$$?; \
	$(MAKE) --no-print-directory figures VARIANT=quick; exit $$s

faults: $(BIN)/python  ## beyond the paper: gossip and federated under node drops, message loss
	$(SWEEP) sweeps/faults.yaml logger=$(LOGGER) $(SWEEP_ARGS); s=$$?; \
	$(MAKE) --no-print-directory figures VARIANT=paper; exit $$s

faults-quick: $(BIN)/python  ## the faults sweep, CPU-sized
	$(SWEEP) sweeps/faults.yaml --quick logger=$(LOGGER) $(SWEEP_ARGS); s=$$?; \
	$(MAKE) --no-print-directory figures VARIANT=quick; exit $$s

figures: $(BIN)/python  ## figures + results.md of every sweep in $(SWEEPS_DIR)/$(VARIANT)
	@found=; for d in $(SWEEPS_DIR)/$(VARIANT)/*/; do \
	  [ -d "$$d" ] || continue; found=1; \
	  $(BIN)/python -m ggans.report "$$d" --out "$${d}figures" \
	    --title "$$(basename $$d) ($(VARIANT))" || exit 1; \
	done; [ -n "$$found" ] || echo "no sweep folders in $(SWEEPS_DIR)/$(VARIANT)"
