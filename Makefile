# The two commands a newcomer runs: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?=
ARGS ?=
SOURCE := $(if $(CONFIG),--config $(CONFIG),)

.PHONY: install run test lint bench system-deps clean

# Re-install when the project's metadata changes; pip reuses its wheel cache, so the
# llama.cpp build (~13 min on 2 cores) happens once per machine.
$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev,demo]'
	@touch $@

install: $(VENV)/.installed

## run: install, prepare and serve (the CPU demo catalog unless CONFIG=FILE; ARGS go to serve)
run: install
	$(BIN)/sparkstack setup $(SOURCE)
	$(BIN)/sparkstack serve $(SOURCE) $(ARGS)

## test: system packages (as root), lint, then the whole suite
test: system-deps install
	$(BIN)/ruff check src tests
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check src tests

## bench: the performance harness (never part of `make test`)
bench: system-deps install
	$(BIN)/pip install -q -e '.[dev,demo,bench]'
	$(BIN)/python -m bench.run

system-deps:
	@bash scripts/system-deps.sh

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
