# The two commands: `make demo` and `make test`. Everything else is set up by them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest bench soak system slurm clean fuzz

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test,bench]"
	# The Jupyter kernel the notebook test runs in: this venv's Python.
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
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
	    else echo "SLURM tests will fail: installing slurm-wlm and munge needs root and apt"; fi; }

demo: $(STAMP)
	$(BIN)/papy demo

lint: $(STAMP)
	$(BIN)/ruff check papy tests benchmarks examples
	$(BIN)/ruff format --check papy tests benchmarks examples
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

pytest: $(STAMP) system slurm
	$(BIN)/python -m pytest

# mypy (about 20 s of one core) runs beside the suite, which mostly waits on processes
test: lint
	$(MAKE) --no-print-directory -j2 typecheck pytest

# Every workload (W1-W10) on every contestant, with the limit row: about 15 minutes on a
# quiet 2-core machine. Options through BENCH_ARGS, e.g. make bench BENCH_ARGS="--quick --only W9".
bench: $(STAMP)
	$(BIN)/pip install --quiet -e ".[bench-ray]" || echo "Ray Data could not be installed: its cells will say so"
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

# The long versions of the process-pool resource tests: 200 programs that stop after one
# result must all exit promptly; 1,000 runs on one pool must leave no trace.
soak: $(STAMP)
	PAPY_EXIT_PROGRAMS=200 PAPY_POOL_RUNS=1000 $(BIN)/python -m pytest -q \
	  tests/test_process_pool.py -k "exit_promptly or leave_no_trace"

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache

# The differential fuzzers (plain, journaled, with a DaskPool) and the recovery searches
# for a long run: randomized examples in rounds for FUZZ_MINUTES; a counterexample stops
# it and is kept in .hypothesis/.
FUZZ_MINUTES ?= 20
fuzz: $(STAMP)
	@end=$$(( $$(date +%s) + $(FUZZ_MINUTES) * 60 )); round=0; \
	while [ $$(date +%s) -lt $$end ]; do \
	  round=$$((round + 1)); echo "fuzz round $$round"; \
	  PAPY_FUZZ_PROFILE=fuzz PAPY_FUZZ_JOURNAL_EXAMPLES=200 PAPY_FUZZ_DASK_EXAMPLES=60 \
	  PAPY_RECOVERY_EXAMPLES=100 PAPY_JOURNAL_FORK_EXAMPLES=60 PAPY_JOURNAL_SWAP_EXAMPLES=300 \
	  PAPY_THREAD_TIMEOUT_EXAMPLES=100 \
	    $(BIN)/python -m pytest tests/test_fuzz.py tests/test_fuzz_journal.py \
	    tests/integration/test_dask_fuzz.py tests/faults/test_recovery_search.py \
	    tests/faults/test_journal_forks.py tests/faults/test_journal_swaps.py \
	    tests/faults/test_thread_timeouts_search.py -x -q -p no:cacheprovider \
	    --hypothesis-show-statistics || exit 1; \
	done
