# hierfed developer commands. `make help` lists them.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=

.DEFAULT_GOAL := help
.PHONY: help install example-plugin run test lint typecheck bench-smoke bench-gpu bench-overhead clean

help: ## list the commands
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*?## "}{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): setup.cfg pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (set PYTHON=...)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the CPU build, so nothing below pulls a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install hierfed with its dev extras

example-plugin: $(STAMP) ## install the out-of-tree example plug-in (examples/hierfed-plugin-example)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e examples/hierfed-plugin-example

run: $(STAMP) ## run the default hierarchical job (ARGS='key=value ...' to override)
	$(PY) -m hierfed run --topology hierarchical $(ARGS)

test: $(STAMP) ## run the whole test suite
	$(PY) -m pytest tests $(ARGS)

lint: $(STAMP) ## ruff lint + format check, mypy
	$(PY) -m ruff check hierfed topologies benchmarks tests
	$(PY) -m ruff format --check hierfed topologies benchmarks tests
	$(PY) -m mypy

typecheck: $(STAMP) ## mypy over hierfed/ and topologies/
	$(PY) -m mypy

bench-smoke: $(STAMP) ## tiny benchmark suite + overhead benchmark at N=100; checks the outputs (not timings)
	$(PY) -m benchmarks.smoke --out benchmarks/out/smoke

bench-gpu: $(STAMP) ## GPU throughput: plain loop vs hierfed one at a time vs batched, 1/16/64 clients (ARGS='--device cpu --quick' to smoke on a CPU)
	$(PY) -m benchmarks.gpu --out benchmarks/out/gpu $(ARGS)

bench-overhead: $(STAMP) ## overhead benchmark, N=1000 full participation only: floor, hierfed, Flower side by side (~2-3 min)
	$(PY) -m benchmarks.overhead run --clients 1000 --participation 1.0 --out benchmarks/out/overhead $(ARGS)

clean: ## remove the virtualenv, caches and run outputs
	rm -rf $(VENV) runs build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
