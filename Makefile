# All set-up happens here: `make test` and `make demo` work on a fresh clone.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch is pinned and installed first: a CPU build of 2.13.0 is on these machines' disks,
# while an unpinned torch would pull a multi-GB CUDA build.
TORCH  := torch==2.13.0

.PHONY: install test test-all lint demo bench docs timm clean

$(STAMP): pyproject.toml Makefile setup.py liegroup/linalg/_cexpm.c \
          liegroup/peft/_engine/_cfused.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev,demo,hf]" "$(TORCH)"
	@# pip hides the build log: say here, loudly, when a compiled kernel did not build
	$(PY) -c "import warnings, liegroup._kernels as k; \
	  warnings.simplefilter('error', k.KernelUnavailableWarning); import liegroup.peft" \
	  || echo "WARNING: a liegroup compiled kernel is missing; the torch implementation runs instead (see above)" >&2
	touch $(STAMP)

install: $(STAMP)

# the suite runs twice: with the compiled kernels, and with every operator on its torch
# implementation (what CUDA and installs without a compiler run)
test: $(STAMP)
	$(PY) -m pytest -n 2 -q
	LIEGROUP_DISABLE_KERNELS=1 $(PY) -m pytest -n 2 -q -p no:cacheprovider

test-all: $(STAMP)
	$(PY) -m pytest -n 2 -q -m "slow or not slow"

lint: $(STAMP)
	$(PY) -m ruff check liegroup tests examples benchmarks
	$(PY) -m mypy

demo: $(STAMP)
	$(PY) -m examples.demo

bench: $(STAMP)
	$(PY) -m benchmarks

# the documentation site, into site/: the pages under docs/ and the API reference generated
# from the docstrings; --strict fails on any warning (broken link, bad docstring section)
# (the `docs` extra's requirements only: `pip install -e ".[docs]"` would rebuild the compiled
# kernels in place under a running test suite; liegroup itself is already installed)
DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): $(STAMP) pyproject.toml
	$(PY) -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['docs'], sep='\n')" > $(VENV)/docs-requirements.txt
	$(PY) -m pip install -q -r $(VENV)/docs-requirements.txt
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

# timm needs torchvision, and no torchvision wheel imports beside the pinned CPU torch above
# (PyPI's torchvision is a CUDA build: `torchvision::nms does not exist`). `make timm` builds a
# separate venv with a torch/torchvision pair that imports together and runs the timm example
# and tests there; it is not part of `make test`. The default pairs are those these machines
# hold on disk (x86-64: a CUDA build of about 5.5 GB that runs on the CPU; aarch64: a CPU
# build); set TIMM_TORCH for another matching pair.
TIMM_VENV := .venv-timm
ifeq ($(shell uname -m),aarch64)
TIMM_TORCH ?= torch==2.9.1 torchvision==0.24.1
else
TIMM_TORCH ?= torch==2.14.1 torchvision==0.29.1
endif
$(TIMM_VENV)/.installed: pyproject.toml Makefile setup.py
	$(PYTHON) -m venv $(TIMM_VENV)
	$(TIMM_VENV)/bin/python -m pip install -q --upgrade pip
	$(TIMM_VENV)/bin/python -m pip install -q $(TIMM_TORCH) timm
	$(TIMM_VENV)/bin/python -m pip install -q -e ".[dev]" $(TIMM_TORCH) timm
	touch $@

timm: $(TIMM_VENV)/.installed
	$(TIMM_VENV)/bin/python -m examples.timm_convnext
	$(TIMM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/hf/test_timm.py

clean:
	rm -rf $(VENV) $(TIMM_VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
