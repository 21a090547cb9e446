# binarize: two commands on a fresh machine.
#   make demo   creates .venv, installs, converts resnet18 (PA, M=4, N=5) on the bundled digits data, reports
#   make test   creates .venv, installs, lints and runs the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test test-slow lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch comes from the package registry into this environment (the preinstalled CPU torch
	# file breaks torchvision from the registry; see docs/getting-started.md).
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/binarize convert resnet18 --scheme pa -M 4 -N 5
	$(VENV)/bin/binarize report

lint: $(STAMP)
	$(VENV)/bin/ruff check binarize_cli tests benchmarks examples
	$(VENV)/bin/ruff format --check binarize_cli tests benchmarks examples

format: $(STAMP)
	$(VENV)/bin/ruff check --fix binarize_cli tests benchmarks examples
	$(VENV)/bin/ruff format binarize_cli tests benchmarks examples

test: $(STAMP) lint
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
