"""A journal replaced or removed during a run stops that run, and loses nothing after it.

Someone (a node, another program, the user) renames another journal over the run's,
renames the run's journal away, or deletes it (with or without its ``-wal`` and ``-shm``
files), at a moment Hypothesis draws, and the worker process that did it may end right
after (a ``fork`` pool then forks its replacement): while a node runs on item ``at`` (in
a worker process or on a thread), or in the driver after ``at`` outputs were read. The
pool (threads, ``fork`` or ``forkserver`` processes), workers, batch and buffer are drawn
too. The run must stop
with a JournalError naming what happened (mid-run or at its close), after delivering a
correct prefix of the outputs, and never hang; the journal swapped in must keep exactly
its own records; a journal renamed away must be whole where it went; the next run on
that path must give what a plain evaluation gives, and
the one after it must skip every item.

``PAPY_JOURNAL_SWAP_EXAMPLES`` sets the number of examples (5; ``make fuzz``: 60).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from papy import JournalError, Pipeline, ProcessPool, ThreadPool
from papy._journal.admin import describe

EXAMPLES = int(os.environ.get("PAPY_JOURNAL_SWAP_EXAMPLES", "5"))
OTHER = 50  # records of the journal swapped in


def act(action: str, journal: str, other: str) -> None:
    """Replace the journal with ``other``, rename it to ``<journal>.away``, or remove it
    (``delete_all``: its log too)."""
    if action == "swap":
        os.replace(other, journal)
        return
    if action == "rename":
        os.replace(journal, journal + ".away")
        return
    suffixes = ["", "-wal", "-shm"] if action == "delete_all" else [""]
    for suffix in suffixes:
        try:
            os.unlink(journal + suffix)
        except FileNotFoundError:
            pass


def work(
    x: int, at: int | None, action: str, journal: str, other: str, once: str, crash: bool
) -> int:
    """Double ``x``; on item ``at`` (the first time only), do ``action`` to the journal,
    then (``crash``) end the worker process."""
    if x == at:
        try:
            os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            pass
        else:
            act(action, journal, other)
            if crash:
                os._exit(7)
    return 2 * x


def other_journal(path: Path) -> None:
    other = Pipeline("other", pool=ThreadPool(2))
    other.add(lambda x: str(x) * 3, name="h")
    assert other.run(range(OTHER), journal=path).items == OTHER


def stored(path: Path) -> dict[str, int]:
    return {n["name"]: n["done"] for n in describe(str(path))["nodes"]}


def _setup(
    pool: str,
    workers: int,
    batch: int | None,
    buffer: int | None,
    n: int,
    at: int,
    where: str,
    action: str,
) -> dict[str, Any]:
    return dict(
        pool=pool,
        workers=workers,
        batch=batch,
        buffer=buffer,
        n=n,
        at=at,
        where=where,
        action=action,
    )


@st.composite
def setups(draw: st.DrawFn) -> dict[str, Any]:
    n = draw(st.integers(2, 120))
    return {
        "pool": draw(st.sampled_from(["thread", "fork", "forkserver"])),
        "workers": draw(st.integers(1, 3)),
        "batch": draw(st.none() | st.integers(1, 16)),
        "buffer": draw(st.none() | st.integers(1, 32)),
        "n": n,
        "at": draw(st.integers(0, n - 1)),
        "where": draw(st.sampled_from(["node", "driver"])),
        "action": draw(st.sampled_from(["swap", "delete", "delete_all", "rename"])),
        "crash": draw(st.booleans()),
    }


@pytest.mark.timeout(600)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("PAPY_FUZZ_PROFILE") != "fuzz",
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    print_blob=True,
)
@given(setup=setups())
# Found by this search: a worker's connection opened after the journal and its log were
# deleted made the file again, empty ("not a papy journal (no such table: outputs)"); a
# query on a deleted journal's log failed "disk I/O error", reported as corruption.
@example(setup=_setup("fork", 3, None, None, 2, 0, "node", "delete_all"))
@example(setup=_setup("fork", 3, 1, 10, 78, 0, "node", "delete"))
def test_a_journal_swapped_or_removed_mid_run_stops_it_and_loses_nothing_after(
    setup: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> None:
    tmp = tmp_path_factory.mktemp("swap")
    journal, other, once = tmp / "run.db", tmp / "other.db", tmp / "once"
    other_journal(other)
    n, at, action = setup["n"], setup["at"], setup["action"]
    in_node = setup["where"] == "node"
    # a worker process that ends right after: a fork pool forks its replacement
    crash = setup.get("crash", False) and in_node and setup["pool"] != "thread"
    if setup["pool"] == "thread":
        pool: Any = ThreadPool(setup["workers"])
    else:
        pool = ProcessPool(setup["workers"], start_method=setup["pool"])
    expected = [2 * x for x in range(n)]
    with pool:
        pipe = Pipeline("swapped", pool=pool)
        args = (at if in_node else None, action, str(journal), str(other), str(once), crash)
        pipe.add(work, name="work", args=args, batch=setup["batch"])
        pipe.buffer = setup["buffer"]
        out: list[int] = []
        with pytest.raises(JournalError) as stopped:
            for o in pipe.map(range(n), journal=journal):
                out.append(o)
                if not in_node and len(out) == at + 1:
                    act(action, str(journal), str(other))
        said = "replaced by another file" if action == "swap" else "was removed"
        away = Path(f"{journal}.away")
        assert said in str(stopped.value), str(stopped.value)
        assert out == expected[: len(out)]
        event(f"{action}: stopped after {len(out)} of {n} outputs")
        if action == "swap":
            assert stored(journal) == {"h": OTHER}  # none of the stopped run's records
        if action == "rename":  # a whole journal where it went, with what the run recorded
            kept = stored(away).get("work", 0)
            assert list(pipe.map(range(n), journal=away)) == expected
            again = pipe.run(range(n), journal=away)
            assert (again.items, again.skipped) == (n, n), (kept, again.skipped)
        assert list(pipe.map(range(n), journal=journal)) == expected
        again = pipe.run(range(n), journal=journal)
        assert (again.items, again.skipped) == (n, n), (again.items, again.skipped)
    assert stored(journal) == ({"h": OTHER, "work": n} if action == "swap" else {"work": n})
