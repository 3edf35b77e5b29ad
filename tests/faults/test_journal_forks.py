"""Processes forked while a run's journal is in use neither hang nor corrupt it.

SQLite forbids carrying a connection over ``fork()``. A driver forks while its threads use
the journal: a ``fork`` process pool starts or replaces a crashed worker, and a node on a
thread pool forks a child of its own or runs a program (``subprocess``, whose pipes a
worker forked meanwhile must not keep), while the checkpointer, the scheduler and thread
pool tasks query and commit. Hypothesis draws the pool (start method, workers, batch),
the items that kill their worker, the size of the records (past the write-ahead log's
checkpoint mark, or not), whether a thread-pool node records beside the process pool and
starts processes, and two or three runs on one journal over more and more items. Each run must
finish (a hang fails the test at its time limit), leave a journal that passes SQLite's
``integrity_check``, and skip exactly the items earlier runs finished; the last run must
give what a plain evaluation gives.

``PAPY_JOURNAL_FORK_EXAMPLES`` sets the number of examples (4; ``make fuzz``: 60).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from papy import Failure, Pipeline, ProcessPool, ThreadPool

EXAMPLES = int(os.environ.get("PAPY_JOURNAL_FORK_EXAMPLES", "4"))


def work(x: int, crash: frozenset[int], pad: int) -> tuple[int, str]:
    if x in crash:
        os._exit(3)
    return x, "x" * pad


def tail(t: tuple[int, str], starts: str) -> int:
    """Keep the item's number; on every third item start a process: fork a child that
    exits at once, or run a program (``starts``: "fork", "program" or "none")."""
    if starts == "fork" and t[0] % 3 == 0:
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    elif starts == "program" and t[0] % 3 == 0:
        subprocess.run(["true"], check=True)
    return t[0]


def plain(x: int, crash: frozenset[int]) -> Any:
    return "crash" if x in crash else x


@st.composite
def setups(draw: st.DrawFn) -> dict[str, Any]:
    sizes = sorted(draw(st.sets(st.integers(20, 300), min_size=2, max_size=3)))
    return {
        "method": draw(st.sampled_from(["fork", "fork", "forkserver"])),
        "workers": draw(st.integers(1, 3)),
        "batch": draw(st.integers(1, 16)),
        "crash": draw(st.frozensets(st.integers(0, sizes[-1] - 1), max_size=6)),
        "pad": draw(st.sampled_from([0, 20_000])),  # 300 items of 20 KB: past the 4 MiB mark
        "sibling": draw(st.booleans()),
        "starts": draw(st.sampled_from(["none", "fork", "program"])),
        "sizes": sizes,
    }


def integrity(path: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA integrity_check").fetchall()
    finally:
        conn.close()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(setups())
@example(  # corrupt by the second run, or a replacement hung in sqlite3.connect, before
    {
        "method": "fork",
        "workers": 2,
        "batch": 8,
        "crash": frozenset({13, 110, 207}),
        "pad": 20_000,
        "sibling": True,
        "starts": "fork",
        "sizes": [100, 250],
    }
)
def test_forks_while_the_journal_is_in_use_leave_it_whole(tmp_path_factory, setup):
    journal = str(tmp_path_factory.mktemp("forks") / "run.db")
    crash = setup["crash"]
    procs = ProcessPool(setup["workers"], start_method=setup["method"])  # the run starts it
    threads = ThreadPool(2)
    try:
        pipe = Pipeline("forks", pool=procs)
        args = (crash, setup["pad"])
        first = pipe.add(work, args=args, name="work", batch=setup["batch"], cache=True)
        args = (setup["starts"],)
        pipe.add(tail, args=args, name="tail", after=first, pool=threads, cache=setup["sibling"])
        done = 0
        for n in setup["sizes"]:
            report = pipe.run(range(n), journal=journal)
            failed = sum(x in crash for x in range(n))
            assert (report.items, report.failed, report.skipped) == (n, failed, done)
            assert integrity(journal) == [("ok",)]
            done = n
        got = list(pipe.map(range(done), journal=journal, errors="yield"))
        assert pipe.last_report is not None and pipe.last_report.skipped == done
        seen = [
            "crash" if isinstance(v, Failure) and v.exc_type == "papy.WorkerCrashed" else v
            for v in got
        ]
        assert seen == [plain(x, crash) for x in range(done)]
    finally:
        procs.close()
        threads.close()
