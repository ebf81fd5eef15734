# Two entry points for a fresh machine (see README):
#   make demo   install, generate + ingest the synthetic cohort, run the quick benchmark, open the dashboard
#   make test   install test needs (incl. Debian chromium for browser tests) and run the whole suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

$(BIN)/ctssl: requirements.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

install: $(BIN)/ctssl

$(BIN)/.test-deps: $(BIN)/ctssl requirements-test.txt
	$(BIN)/pip install -q -r requirements-test.txt
	command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)
	touch $@

demo: install
	$(BIN)/ctssl benchmark --profile quick
	$(BIN)/ctssl dashboard

test: $(BIN)/.test-deps
	$(BIN)/python -m pytest -q

.PHONY: install demo test
