# Everything runs through one virtual environment, .venv, made by `make setup`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BASE_STAMP := $(VENV)/.installed-base

.PHONY: setup setup-base test lint format browser demo bench clean

setup: $(STAMP)

# What `make demo` needs: the package and its runtime dependencies, without the test and web-page
# extras (gradio, selenium, diffusers, ruff), which take a fifth of a fresh set-up's time.
setup-base: $(BASE_STAMP)

# torch and torchvision are pinned through constraints.txt so every machine resolves the
# same build; pyproject.toml itself only gives ranges, as a library should.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --constraint constraints.txt -e '.[dev,serve]'
	touch $(STAMP) $(BASE_STAMP)

$(BASE_STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --constraint constraints.txt -e .
	touch $(BASE_STAMP)

test: setup browser lint
	$(PY) -m pytest -q tests

# One formatter and linter (ruff, configured in pyproject.toml); `make test` fails on either.
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

# The browser test of `latentdiff serve` drives Debian's headless Chromium: installed here when it is
# missing and we are root with apt-get; otherwise that one test is skipped and says how to install it.
browser:
	@if ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1 && [ "$$(id -u)" = 0 ] && \
		command -v apt-get >/dev/null 2>&1; then \
		echo "installing headless Chromium for the browser test: apt-get install chromium chromium-driver"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
			>/dev/null 2>&1 || echo "warning: could not install chromium; the browser test will be skipped"; \
	fi

demo: setup-base
	$(VENV)/bin/python -m latentdiff.scripts.demo

# The seven benchmarks of bench/ (speed and quality tables, JSON under runs/bench); under 20 min
# on 2 CPU cores. The samplers table scores the demo model; without `make demo` it is skipped.
bench: setup
	$(PY) -m bench

clean:
	rm -rf $(VENV) runs build *.egg-info
