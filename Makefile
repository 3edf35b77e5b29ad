# The two commands: `make demo` and `make test`. Everything else is set up by them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest bench system clean fuzz

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

bench: $(STAMP)
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

# The differential fuzzer for a long run: randomized examples in rounds of
# PAPY_FUZZ_EXAMPLES for FUZZ_MINUTES; a counterexample stops it and is kept in .hypothesis/.
FUZZ_MINUTES ?= 20
fuzz: $(STAMP)
	@end=$$(( $$(date +%s) + $(FUZZ_MINUTES) * 60 )); round=0; \
	while [ $$(date +%s) -lt $$end ]; do \
	  round=$$((round + 1)); echo "fuzz round $$round"; \
	  PAPY_FUZZ_PROFILE=fuzz $(BIN)/python -m pytest tests/test_fuzz.py -x -q -p no:cacheprovider \
	    --hypothesis-show-statistics || exit 1; \
	done
