# `make test` and `make demo` each create their own virtual environment.
# The CPU torch pin is installed first: a bare `torch` requirement would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH_PIN ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-all demo lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_PIN)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m ruff check lightning_mtl tests examples benchmarks
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m ruff check lightning_mtl tests examples benchmarks
	$(BIN)/python -m pytest -q -m ""

demo: $(STAMP)
	$(BIN)/lightning-mtl compare --out demo_out --overwrite

lint: $(STAMP)
	$(BIN)/python -m ruff check lightning_mtl tests examples benchmarks
	$(BIN)/python -m ruff format --check lightning_mtl tests examples benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_overhead.py

clean:
	rm -rf $(VENV) demo_out lightning_logs
