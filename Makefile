# The two commands of the README: `make run` (the main job on embedded defaults) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast lint dev run clean-state

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -U pip wheel setuptools
	# The CPU build of torch first: an unpinned torch would pull several GB of CUDA wheels.
	$(BIN)/pip install -q "torch==2.13.0" || $(BIN)/pip install -q --index-url https://download.pytorch.org/whl/cpu "torch>=2.4,<2.14"
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

test: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .

dev: install
	$(BIN)/imgpipe dev

run: install
	$(BIN)/imgpipe demo

clean-state:
	$(BIN)/imgpipe gpu-server stop || true
	$(BIN)/imgpipe db down || true
