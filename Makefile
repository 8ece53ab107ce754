# ggans: common tasks. `make install` then `make quick` is the README's first run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export GGANS_DATA_DIR ?= $(abspath ../shared/data/mnist)

.PHONY: install quick run test test-all lint bench classifier clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

install: $(BIN)/python  ## a virtual environment with ggans and its dev tools
	$(BIN)/pip install -e ".[dev]"

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
