# The README's two commands: `make demo` (main job end to end on embedded data) and `make test`.
# Both create .venv and install the project into it first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint bench clean

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

clean:
	rm -rf data .pytest_cache
