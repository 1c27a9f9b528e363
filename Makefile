# make test: creates .venv unless a virtualenv is active, installs phitune with its test extras, runs pytest (all of it,
#            the benchmarks' smoke runs included: what CI runs before a merge).
# make test-fast: the same without the tests marked slow (a few minutes less on 2 cores): while you work.
# make lint: ruff (line length 120, pycodestyle + pyflakes + blank lines), then scripts/check_docs.py (the names the
#            README and docs/architecture.md quote exist, and the import rules hold), as CI runs it.
# make demo: the embedded default (tiny Phi-3 + bundled chat data), fine-tuned and evaluated on the CPU.
SHELL := /bin/bash
PYTHON ?= python3
ifdef VIRTUAL_ENV
  VENV := $(VIRTUAL_ENV)
else
  VENV := .venv
endif
PY := $(VENV)/bin/python
# The CPU build of torch: a bare "torch" requirement would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: install test test-fast lint demo bench clean

$(VENV)/.installed-%: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q -e ".[$*]"
	@touch $@

install: $(VENV)/.installed-test

test: $(VENV)/.installed-test
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: $(VENV)/.installed-test
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check .
	$(PY) scripts/check_docs.py

demo: $(VENV)/.installed-test
	$(VENV)/bin/phitune demo

bench: $(VENV)/.installed-test
	$(PY) benchmarks/lora_layers.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
