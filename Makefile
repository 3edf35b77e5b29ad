# The two commands: `make demo` and `make test`. Everything else is set up by them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest bench system slurm clean

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

# A single-host SLURM for tests/integration/test_slurm.py (its fixture configures and
# starts munged, slurmctld and slurmd, and stops them; nothing runs outside the tests).
slurm:
	@command -v slurmctld >/dev/null 2>&1 && command -v munged >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then apt-get update -qq && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null; \
	    else echo "SLURM tests skipped: installing slurm-wlm and munge needs root and apt"; fi; }

demo: $(STAMP)
	$(BIN)/papy demo

lint: $(STAMP)
	$(BIN)/ruff check papy tests benchmarks examples
	$(BIN)/ruff format --check papy tests benchmarks examples

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) system slurm
	$(BIN)/python -m pytest

test: lint typecheck pytest

bench: $(STAMP)
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
