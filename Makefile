# Two commands on a fresh machine:  `make demo` (the main job) and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast postgres chromium lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

# Burgers data if missing, 3 strategies x 5 phases at demo scale, evaluation, comparison report.
demo: setup
	$(BIN)/seqgen demo

# Two workers, a module each at a time, the longest modules first (tests/conftest.py): the
# end-to-end tests spend much of their time waiting on servers and processes.
PARALLEL := -n 2 --dist loadfile --no-loadscope-reorder
# `make test PRECISION=float32` (or bf16) forces the CPU trainer's precision in every test and the
# processes they start; empty: what this CPU picks (bf16 where it has native bf16, else float32).
PYTEST := $(BIN)/pytest $(PARALLEL) $(if $(PRECISION),--precision $(PRECISION))

# Everything, the slow tests with real servers and clusters included (what CI runs).
test: setup postgres chromium
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(PYTEST)

# The quick loop while changing code: lint and every test not marked slow (no servers, clusters,
# subprocesses of the real entry points).
test-fast: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(PYTEST) -m "not slow"

# The tests start their own PostgreSQL servers: install Debian's if it is missing (needs root).
postgres:
	@bash .ci/install-postgres

# tests/test_ui.py drives Debian's Chromium through Playwright (no browser download): install it
# if it is missing (needs root).
chromium:
	@bash .ci/install-chromium

bench: setup
	$(BIN)/seqgen bench --baseline

clean:
	rm -rf outputs reports mlflow.db mlartifacts
