# Set-up and the two main jobs. Everything installs into .venv, pinned by constraints.txt.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip

.PHONY: install viewer demo test test-cuda clean
# The report's 3D viewer: NiiVue's built file from npm, unpacked into the venv (never into the repository).
NIIVUE := @niivue/niivue@0.69.0
NIIVUE_DIR := $(VENV)/share/esegeta/niivue

$(BIN)/esegeta: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e ".[all,test]"
	touch $@

install: $(BIN)/esegeta viewer

viewer: $(NIIVUE_DIR)/package/dist/niivue.umd.js

$(NIIVUE_DIR)/package/dist/niivue.umd.js:
	@command -v npm >/dev/null || { echo "npm not found: report.html will have no 3D viewer (install npm, then make viewer)"; exit 0; }; \
	mkdir -p $(NIIVUE_DIR) && cd $(NIIVUE_DIR) && npm pack --silent $(NIIVUE) >/dev/null && \
	tar xzf niivue-niivue-*.tgz && rm niivue-niivue-*.tgz

demo: install
	$(BIN)/esegeta demo

test: install
	@command -v chromium >/dev/null || echo "chromium not found: the browser checks of report.html and explorer.html are skipped (apt-get install chromium)"
	$(BIN)/python -m pytest -q

# The CUDA lane: the conformance suite on CUDA, compared with the CPU (skipped without CUDA).
test-cuda: install
	$(BIN)/python -m pytest -q -m cuda tests/

clean:
	rm -rf $(VENV) results .pytest_cache
