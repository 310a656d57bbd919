# Two commands do all the set-up on a fresh CPU machine (Python 3.11, pip only):
#   make bench   installs into .venv and runs `python bench/run.py` on its default case
#   make test    installs into .venv and runs the whole test suite
# GPU users who keep their own torch: `pip install -e ".[dev,bench,train]"` in their environment.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test test-compat bench lint

setup:
	bash scripts/setup.sh $(VENV)

test: setup
	$(PY) -m pytest tests -q -ra

test-compat: setup
	VENV=$(VENV) bash scripts/test_transformers_compat.sh

bench: setup
	$(PY) bench/run.py

lint: setup
	$(PY) -m ruff check tpo_fast kernels bench tests
