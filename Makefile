# Two commands set up everything on a fresh machine:
#   make demo   creates .venv, installs the package, runs the main job on the synthetic dataset
#   make test   creates .venv with the dev extras (pinned in requirements-dev.txt), runs ruff, mypy and pytest
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
PIN := -c requirements-dev.txt

.PHONY: demo test lint typecheck venv clean

$(VENV)/.installed: setup.cfg pyproject.toml requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(PIN) torch==2.13.0
	$(PIP) install -q $(PIN) -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/lightning-dissect demo

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check lightning_dissect tests examples benchmarks

typecheck: $(VENV)/.installed
	$(VENV)/bin/mypy lightning_dissect

test: lint typecheck
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
