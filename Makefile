# detectflow — the two commands a new user needs: `make demo` and `make test`.
# Both create (or refresh, when pyproject.toml changed) the virtual environment in .venv.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.detectflow-installed

.PHONY: venv demo demo-s3 test lint clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --progress-bar off -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m flows.demo

demo-s3: $(STAMP)
	$(PY) -m flows.demo --storage s3

lint: $(STAMP)
	$(PY) -m ruff check detector pipeline flows tests bench

test: $(STAMP) lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
