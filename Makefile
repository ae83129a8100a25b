# One command each: `make test` (sets up .venv, lints, runs the suite), `make demo` (the main job).
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements-dev.txt
	touch $@

.PHONY: test lint
lint: $(VENV)/.installed
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .

test: lint
	$(VPY) -m pytest -q tests
