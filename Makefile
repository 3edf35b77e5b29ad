# The two commands: `make demo` and `make test`. Everything else is set up by them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest bench system clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test,bench]"
	touch $(STAMP)

# System tools the tests drive for real: Graphviz (drawings) and Chromium (HTML report).
system:
	@command -v dot >/dev/null 2>&1 && command -v chromium >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ]; then apt-get update -qq && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz chromium >/dev/null; \
	    else echo "install graphviz and chromium (needs root)"; fi; }

demo: $(STAMP)
	$(BIN)/papy demo

lint: $(STAMP)
	$(BIN)/ruff check papy tests benchmarks examples
	$(BIN)/ruff format --check papy tests benchmarks examples

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) system
	$(BIN)/python -m pytest

test: lint typecheck pytest

# Every workload (W1-W10) on every contestant, with the limit row: about 15 minutes on a
# quiet 2-core machine. Options through BENCH_ARGS, e.g. make bench BENCH_ARGS="--quick --only W9".
bench: $(STAMP)
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
