# The two commands a newcomer needs:  make run  |  make test
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: run daemon stop test lint format bench venv dev clean

$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements.txt
	touch $@

$(VENV)/.dev: requirements-dev.txt $(VENV)/.runtime
	$(PIP) install -r requirements-dev.txt
	touch $@

venv: $(VENV)/.runtime
dev: $(VENV)/.dev

## run: set up the venv and run syncer + workers under supervisord in the foreground
##      (with the embedded demo when no SERVER_API_URL is configured). Ctrl-C stops all.
run: $(VENV)/.runtime
	scripts/run

## daemon: the same, detached (logs in log/; stop with 'make stop')
daemon: $(VENV)/.runtime
	scripts/run -d

stop:
	scripts/ctl shutdown

## test: set up the dev venv and run the whole test suite (what CI runs)
test: $(VENV)/.dev
	$(PY) -m pytest

lint: $(VENV)/.dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.dev
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: $(VENV)/.dev
	$(PY) -m bench

clean:
	rm -rf $(VENV) run log .pytest_cache .ruff_cache
