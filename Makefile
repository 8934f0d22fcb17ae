# The two commands: `make serve` and `make test` (and `make lint`: ruff + mypy).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 9090
WORKERS ?= 1
THREADS ?= 32

.PHONY: serve test install install-test lint clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip >/dev/null
	$(PY) -m pip install -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -e '.[test]'
	touch $@

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

serve: install
	$(VENV)/bin/gunicorn -c python:backend.gunicorn_conf --bind 0.0.0.0:$(PORT) --workers $(WORKERS) --threads $(THREADS) \
		--timeout 300 --preload 'backend.wsgi:app'

test: install-test
	$(PY) -m pytest $(PYTEST_ARGS)

# ruff (rules and line length: [tool.ruff] in pyproject.toml) and mypy ([tool.mypy]: the modules not checked yet
# are listed there)
LINT_PATHS ?= backend model tests scripts weights

lint: install-test
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/mypy backend model

clean:
	rm -rf $(VENV) data .pytest_cache
