# The README's two commands: `make demo` (main job end to end on embedded data) and `make test`.
# Both create .venv and install the project into it first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint docs docs-build clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,server]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/recsys pipeline

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ""

lint: $(STAMP)
	$(BIN)/ruff check recsys flows tests benchmarks

# The documentation site (docs/ + mkdocs.yml): served on 127.0.0.1:8000, or built into site/.
# `make test` builds it too (tests/docs), with --strict, into a temporary directory.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --dev-addr 127.0.0.1:8000

docs-build: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf data site .pytest_cache
