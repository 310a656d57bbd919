# Two commands do all the set-up on a fresh CPU machine (Python 3.11, pip only):
#   make bench   installs into .venv and runs `python bench/run.py` on its default case
#   make test    installs into .venv and runs the whole test suite
# GPU users who keep their own torch: `pip install -e ".[dev,bench,train]"` in their environment.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup test test-compat bench lint mutants

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

# Mutation testing of one module in a copy of the tree (not CI; minutes per module on 2 cores), e.g.
#   make mutants MODULE=tpo_fast/ops/torch_chunked.py [TESTS="tests/..."] [FUNCTIONS="forward backward"]
#   make mutants MODULE=kernels/token_stats_fwd.py   (a Triton kernel: scripts/kernel_mutants.py)
# (docs/testing.md)
mutants:
	PY=$(PY) MODULE=$(MODULE) TESTS="$(TESTS)" FUNCTIONS="$(FUNCTIONS)" bash scripts/mutants.sh
