# Two commands from a fresh clone (Python 3.10+ is all you need):
#   make quickstart   # builds .venv, then runs the whole pipeline on the packaged demo
#   make test         # builds .venv, then runs the test suite
PYTHON ?= python3
VENV ?= .venv
# CPU torch by default. On a GPU machine: make install CONSTRAINTS= (keeps your CUDA torch).
CONSTRAINTS ?= .ci/constraints-cpu.txt
PIP_CONSTRAINT_FLAG = $(if $(CONSTRAINTS),-c $(CONSTRAINTS),)
BIN = $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: install test test-slow quickstart bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install $(PIP_CONSTRAINT_FLAG) -e '.[dev]'
	touch $@

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

quickstart: install
	$(BIN)/raypipe run examples/configs/quickstart.yaml

bench: install
	$(BIN)/python -m bench all

clean:
	rm -rf $(VENV) raypipe-work .pytest_cache
