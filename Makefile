# All set-up happens here: `make test` and `make demo` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch is pinned and installed first: a CPU build of 2.13.0 is on these machines' disks,
# while an unpinned torch would pull a multi-GB CUDA build.
TORCH  := torch==2.13.0

.PHONY: install test test-all lint demo bench clean

$(STAMP): pyproject.toml Makefile setup.py liegroup/linalg/_cexpm.c liegroup/peft/_cfused.c \
          liegroup/peft/_ctucker.c liegroup/peft/_ctucker.h
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,demo]" "$(TORCH)"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 -q

test-all: $(STAMP)
	$(PY) -m pytest -n 2 -q -m "slow or not slow"

lint: $(STAMP)
	$(PY) -m ruff check liegroup tests examples benchmarks
	$(PY) -m mypy

demo: $(STAMP)
	$(PY) -m examples.demo

bench: $(STAMP)
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
