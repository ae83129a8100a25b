# One command each: `make test` (sets up .venv, lints, runs the suite), `make demo` (the main job).
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python

$(VENV)/.installed: requirements.txt requirements-dev.txt requirements-train.txt
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements-dev.txt
	touch $@

.PHONY: test lint demo
# The main job: train a PeRFlow delta for the bundled toy teacher on CPU (a few minutes), writing
# out/demo/perflow_delta.safetensors, out/demo/comparison.png and out/demo/metrics.json.
demo: $(VENV)/.installed
	$(VPY) -m training.train --backend toy --out out/demo --overwrite --steps 600 --batch-size 32 --solver-steps 4 --timestep-grid 8 --lr 3e-4 --threads 1

lint: $(VENV)/.installed
	$(VPY) -m ruff check .
	$(VPY) -m ruff format --check .

test: lint
	$(VPY) -m pytest -q tests
