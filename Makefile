# detectflow — the two commands a new user needs: `make demo` and `make test`.
# Both create (or refresh, when pyproject.toml changed) the virtual environment in .venv.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.detectflow-installed

.PHONY: venv demo demo-s3 s3-server test lint clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --progress-bar off -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(PY) -m flows.demo

demo-s3: $(STAMP)
	$(PY) -m flows.demo --storage s3

# A local S3 server (SeaweedFS, the one the tests use) on 127.0.0.1:8333 with a bucket "detectflow",
# data in .s3-data/; up until Ctrl-C. It prints the settings to use.
s3-server: $(STAMP)
	$(PY) -m tests.seaweed --port 8333 --dir .s3-data --bucket detectflow

lint: $(STAMP)
	$(PY) -m ruff check detector pipeline flows tests bench

test: $(STAMP) lint
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
