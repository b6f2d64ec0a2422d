# Two commands on a fresh machine:  `make demo` (the main job) and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

# Burgers data if missing, 3 strategies x 5 phases at demo scale, evaluation, comparison report.
demo: setup
	$(BIN)/seqgen demo

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

bench: setup
	$(BIN)/seqgen bench --baseline

clean:
	rm -rf outputs reports mlflow.db mlartifacts
