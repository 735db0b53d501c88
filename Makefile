# Set-up and the two main jobs. Everything installs into .venv, pinned by constraints.txt.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

.PHONY: install demo test test-cuda clean

$(BIN)/esegeta: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e ".[all,test]"
	touch $@

install: $(BIN)/esegeta

demo: install
	$(BIN)/esegeta demo

test: install
	$(BIN)/python -m pytest -q

# The CUDA lane: the conformance suite on CUDA, compared with the CPU (skipped without CUDA).
test-cuda: install
	$(BIN)/python -m pytest -q -m cuda tests/

clean:
	rm -rf $(VENV) results .pytest_cache
