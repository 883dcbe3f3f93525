# Everything runs through one virtual environment, .venv, made by `make setup`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo bench clean

setup: $(STAMP)

# torch and torchvision are pinned through constraints.txt so every machine resolves the
# same build; pyproject.toml itself only gives ranges, as a library should.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --constraint constraints.txt -e '.[dev]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests

demo: setup
	$(VENV)/bin/python -m latentdiff.scripts.demo

# The seven benchmarks of bench/ (speed and quality tables, JSON under runs/bench); under 20 min
# on 2 CPU cores. The samplers table scores the demo model; without `make demo` it is skipped.
bench: setup
	$(PY) -m bench

clean:
	rm -rf $(VENV) runs build *.egg-info
