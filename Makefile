# Two commands on a fresh machine:  `make demo` (the main job) and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo demo-study test test-fast postgres chromium lint bench clean wheelhouse

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@

# Burgers data if missing, the table's default strategies (mae, autocorr, combined) x 5 phases at
# demo scale, evaluation, comparison report.
demo: setup
	$(BIN)/seqgen demo

# The demo's question at 3 seeds, inside and outside the training range, with the seeds'
# ensembles: the report in docs/demo-study/ (its store: mlflow.db here, as for `make demo`).
demo-study: setup
	$(BIN)/seqgen demo --seeds 0,1,2 --out reports/demo-random
	$(BIN)/seqgen demo --seeds 0,1,2 --split edge --out reports/demo-edge
	for s in mae autocorr combined; do \
	  $(BIN)/seqgen ensemble --strategy $$s --phase 5 --seeds 0,1,2 --preset demo --split edge; \
	done
	$(BIN)/seqgen compare --preset demo --seed 0 --seed 1 --seed 2 --out docs/demo-study

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

# Wheels for an offline GPU node (docs/gpu.md): requirements-gpu-node.txt and their dependencies,
# pinned to this venv's versions, for WHEEL_PYTHON on manylinux x86_64; at most 64 MiB.
WHEELHOUSE ?= wheelhouse
WHEEL_PYTHON ?= 3.12
WHEEL_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 any
wheelhouse: setup
	rm -rf $(WHEELHOUSE) && mkdir -p $(WHEELHOUSE)
	$(BIN)/pip freeze --exclude-editable > $(WHEELHOUSE)/constraints.txt
	cp requirements-gpu-node.txt $(WHEELHOUSE)/requirements.txt
	$(BIN)/pip download --quiet --only-binary=:all: --implementation cp \
		--python-version $(WHEEL_PYTHON) $(addprefix --platform ,$(WHEEL_PLATFORMS)) \
		-c $(WHEELHOUSE)/constraints.txt -r $(WHEELHOUSE)/requirements.txt -d $(WHEELHOUSE)
	@size=$$(du -sm $(WHEELHOUSE) | cut -f1); echo "$(WHEELHOUSE): $$size MiB"; \
		test $$size -le 64 || { echo "over 64 MiB"; exit 1; }

bench: setup
	$(BIN)/seqgen bench --baseline

clean:
	rm -rf outputs reports mlflow.db mlartifacts
