"""Hypothesis searches over four promises of the pools, each against a plain reference.

- A process pool whose dead workers cannot all be replaced (the driver is out of file
  descriptors: a replacement cannot even get its pipes) ends the run with every item
  delivered once, the crashing items as ``WorkerCrashed`` failures, or breaks with
  ``PoolError`` after delivering a correct prefix; it never hangs, loses, invents or
  reorders an item.
- An item that kills its worker, while the worker rebuilds it, runs it or pickles its
  result, fails alone, saying how and where, in three worker restarts at most.
- Worker starts that are slow, never return, raise or exit never hang a run while one
  worker can run: it finishes, or breaks with ``PoolError`` once a start failed.
- A process a node starts (``os.fork``, ``multiprocessing`` with any start method, a
  program) handles SIGTERM and SIGINT exactly as it would if the node ran in a plain
  Python process: the handlers PaPy installs in its workers and in a running driver never
  reach it, and the node's own handlers do.
"""

from __future__ import annotations

import faulthandler
import functools
import json
import multiprocessing.forkserver
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from faults.crashers import CHILD_KINDS, HANDLER_SETUPS, child_handlers
from papy import Failure, InlinePool, Pipeline, PoolError, ProcessPool, ThreadPool, WorkerCrashed

TESTS = Path(__file__).resolve().parents[1]
#: ``make fuzz`` draws more examples, new ones each round; CI runs the same ones every time
EXAMPLES = int(os.environ.get("PAPY_RECOVERY_EXAMPLES", "14"))
SEARCH = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("PAPY_FUZZ_PROFILE") != "fuzz",
    database=None if os.environ.get("PAPY_FUZZ_PROFILE") != "fuzz" else settings().database,
    suppress_health_check=[HealthCheck.too_slow],
    print_blob=True,
)
#: the searches whose examples start and kill many workers (spawn included): half as many
SEARCH_HALF = settings(SEARCH, max_examples=max(1, EXAMPLES // 2))
#: a process pool with 1 to 3 workers on any start method, and up to 40 items
WORKER_POOLS = {
    "method": st.sampled_from(["fork", "forkserver", "spawn"]),
    "workers": st.integers(1, 3),
    "n": st.integers(1, 40),
    "data": st.data(),
}

# -- workers that cannot be replaced --------------------------------------------------------

CRASHES = ("exit", "kill", "fork_exit")


def crash_on(bad: frozenset[int], how: str):  # type: ignore[no-untyped-def]
    """A node that ends its worker on the items in ``bad``: ``os._exit``, SIGKILL, or a
    fork whose child holds the worker's pipes for half a second after the worker exits."""

    def node(x: int) -> int:
        if x in bad:
            if how == "exit":
                os._exit(3)
            if how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if os.fork() == 0:
                time.sleep(0.5)
                os._exit(0)
            os._exit(4)
        return 2 * x

    return node


def forkserver_pid() -> int | None:
    """Return the pid of this process's ``multiprocessing`` fork server, if it started one."""
    return getattr(multiprocessing.forkserver._forkserver, "_forkserver_pid", None)  # type: ignore[attr-defined]


def limit_leaving(spare: int) -> int:
    """Return the descriptor limit under which exactly ``spare`` numbers are free (a new
    descriptor takes the lowest free number, holes included)."""
    listing = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
    try:
        taken = {int(n) for n in os.listdir(listing)} - {listing}
    finally:
        os.close(listing)
    limit, free = 0, 0
    while limit in taken or free < spare:
        free += limit not in taken
        limit += 1
    return limit


@pytest.mark.timeout(300)
@SEARCH
@given(
    method=st.sampled_from(["fork", "forkserver"]),
    workers=st.integers(1, 3),
    batch=st.integers(1, 4),
    how=st.sampled_from(CRASHES),
    spare=st.integers(0, 16),
    n=st.integers(1, 24),
    data=st.data(),
)
def test_a_pool_that_cannot_replace_its_workers_finishes_or_breaks_but_never_loses_an_item(
    method: str, workers: int, batch: int, how: str, spare: int, n: int, data: st.DataObject
) -> None:
    bad = frozenset(data.draw(st.sets(st.integers(0, n - 1), max_size=min(n, 4)), label="bad"))
    out: list[object] = []
    error: PoolError | None = None
    with ProcessPool(workers, start_method=method) as pool:
        pipe = Pipeline("recovery", pool=pool)
        pipe.add(crash_on(bad, how), name="node", batch=batch)
        assert list(pipe.map([n])) == [2 * n]  # the workers are up
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        server = forkserver_pid()
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit_leaving(spare), hard))
        started = time.monotonic()
        try:
            for o in pipe.map(range(n), errors="yield"):
                out.append(o)
        except PoolError as exc:
            error = exc
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        elapsed = time.monotonic() - started
    if forkserver_pid() != server:
        # started anew under the tight limit, which its workers would inherit in later tests
        multiprocessing.forkserver._forkserver._stop()  # type: ignore[attr-defined]
    assert elapsed < 60, f"the run took {elapsed:.0f} s"
    assert len(out) <= n
    for x, o in zip(range(n), out):
        if x in bad:
            assert isinstance(o, Failure), (x, o)
            assert (o.item, o.node) == (x, "node")
            assert isinstance(o.exception, WorkerCrashed), o.exception
        else:
            assert o == 2 * x, (x, o)
    event("finished" if error is None else "the pool broke")
    if error is None:
        assert len(out) == n
    else:
        assert "could not be started" in str(error), error


# -- a poison item, wherever in the worker it strikes ----------------------------------------

PHASES = ("rebuild", "run", "pickle")
#: how a poison item ends its worker, and the exit code the pool reports for it
HOWS = {"exit": 3, "kill": -signal.SIGKILL, "term": -signal.SIGTERM}
SAYS = {
    "rebuild": "while rebuilding this item from its pickle",
    "run": "while running this item",
    "pickle": "while pickling this item's result",
}


def die(how: str) -> None:
    """End this process as ``how`` says: ``os._exit(3)``, SIGKILL or SIGTERM to itself."""
    if how == "exit":
        os._exit(3)
    os.kill(os.getpid(), signal.SIGKILL if how == "kill" else signal.SIGTERM)
    time.sleep(30)


def _rebuild(v: int, how: str, pid: int) -> DiesRebuilt:
    if os.getpid() != pid:
        die(how)
    return DiesRebuilt(v, how, pid)


class DiesRebuilt:
    """An input item whose rebuilding ends any process but the one that made it."""

    def __init__(self, v: int, how: str, pid: int) -> None:
        self.v, self.how, self.pid = v, how, pid

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_rebuild, (self.v, self.how, self.pid))


class DiesPickled:
    """A result whose pickling ends the process that pickles it."""

    def __init__(self, how: str) -> None:
        self.how = how

    def __reduce__(self):  # type: ignore[no-untyped-def]
        die(self.how)


def poison_node(poison: dict[int, tuple[str, str]]):  # type: ignore[no-untyped-def]
    """A node that doubles its item, unless ``poison`` says it ends its worker there."""

    def node(x: object) -> object:
        v = x.v if isinstance(x, DiesRebuilt) else x
        phase, how = poison.get(v, ("", ""))  # type: ignore[call-overload]
        if phase == "run":
            die(how)
        if phase == "pickle":
            return DiesPickled(how)
        return 2 * v  # type: ignore[operator]

    return node


@pytest.mark.timeout(300)
@SEARCH_HALF
@given(batch=st.none() | st.integers(1, 16), **WORKER_POOLS)
def test_a_poison_item_fails_alone_in_three_restarts_wherever_it_kills_its_worker(
    method: str, workers: int, batch: int | None, n: int, data: st.DataObject
) -> None:
    """An item that ends its worker (``os._exit``, SIGKILL, SIGTERM) while the worker
    rebuilds it, runs the node on it, or pickles its result, fails alone with a
    ``WorkerCrashed`` that says how and where, after three worker restarts at most; every
    other item is delivered once, in order."""
    bad = data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=min(n, 3)), label="bad")
    poison = {
        x: (data.draw(st.sampled_from(PHASES)), data.draw(st.sampled_from(sorted(HOWS))))
        for x in sorted(bad)
    }
    items: list[object] = [
        DiesRebuilt(x, poison[x][1], os.getpid()) if poison.get(x, ("",))[0] == "rebuild" else x
        for x in range(n)
    ]
    started = time.monotonic()
    with ProcessPool(workers, start_method=method, initializer=faulthandler.disable) as pool:
        pipe = Pipeline("poison", pool=pool)
        pipe.add(poison_node(poison), name="node", batch=batch)
        out = list(pipe.map(items, errors="yield"))
        restarts = pool.restarts
    assert time.monotonic() - started < 120
    assert len(out) == n
    for x, o in enumerate(out):
        if x not in poison:
            assert o == 2 * x, (x, o)
            continue
        phase, how = poison[x]
        assert isinstance(o, Failure), (x, o)
        assert (o.item, o.node) == (x, "node")
        assert isinstance(o.exception, WorkerCrashed), o.exception
        assert o.exception.exitcode == HOWS[how], (phase, how, str(o.exception))
        assert SAYS[phase] in str(o.exception), (phase, how, str(o.exception))
    assert restarts <= 3 * len(poison), (restarts, poison)
    event(f"{len(poison)} poison item(s)")


# -- worker starts that are slow, hang or fail ------------------------------------------------

STARTS = ("ok", "slow", "hang", "raise", "exit")


def start_as_planned(folder: str, plan: tuple[str, ...]) -> None:
    """An initializer: worker start number k (counted in ``folder``) does ``plan[k]``:
    returns at once or after 0.3 s, never returns, raises, or exits; later starts are ok."""
    k = 0
    while True:
        try:
            os.close(os.open(os.path.join(folder, f"start-{k}"), os.O_CREAT | os.O_EXCL))
            break
        except FileExistsError:
            k += 1
    faulthandler.disable()
    how = plan[k] if k < len(plan) else "ok"
    if how == "slow":
        time.sleep(0.3)
    elif how == "hang":
        time.sleep(600)
    elif how == "raise":
        raise RuntimeError(f"start {k} refuses")
    elif how == "exit":
        os._exit(7)


def starts_done(folder: Path, plan: tuple[str, ...]) -> list[str]:
    k = len(list(folder.glob("start-*")))
    return [plan[i] if i < len(plan) else "ok" for i in range(k)]


@pytest.mark.timeout(300)
@SEARCH_HALF
@given(batch=st.none() | st.integers(1, 8), **WORKER_POOLS)
def test_workers_that_start_slowly_hang_or_fail_to_start_never_hang_the_run(
    method: str,
    workers: int,
    batch: int | None,
    n: int,
    data: st.DataObject,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Worker starts (the first ones, and replacements after crashes) return at once or
    late, never return, raise or exit, as drawn. While one worker can run, the run ends:
    every item delivered once (crashing items as ``WorkerCrashed``), or, once a start has
    failed, a ``PoolError`` after a correct prefix. Never a hang."""
    first = data.draw(st.lists(st.sampled_from(STARTS), min_size=workers, max_size=workers))
    if not {"ok", "slow"} & set(first):
        first[data.draw(st.integers(0, workers - 1))] = "ok"  # one worker can run at first
    later = data.draw(st.lists(st.sampled_from(STARTS), max_size=6), label="replacements")
    # A worker whose start hangs lives on: leave one place for a worker that can run.
    plan, hangs = [], 0
    for how in first + later:
        hangs += how == "hang"
        plan.append("ok" if how == "hang" and hangs >= workers else how)
    bad = frozenset(data.draw(st.sets(st.integers(0, n - 1), max_size=min(n, 3)), label="bad"))
    folder = tmp_path_factory.mktemp("starts")
    init = functools.partial(start_as_planned, str(folder), tuple(plan))
    out: list[object] = []
    error: PoolError | None = None
    started = time.monotonic()
    with ProcessPool(workers, start_method=method, initializer=init) as pool:
        pipe = Pipeline("starts", pool=pool)
        pipe.add(crash_on(bad, "exit"), name="node", batch=batch)
        try:
            for o in pipe.map(range(n), errors="yield"):
                out.append(o)
        except PoolError as exc:
            error = exc
    assert time.monotonic() - started < 120
    for x, o in zip(range(n), out):
        if x in bad:
            assert isinstance(o, Failure) and isinstance(o.exception, WorkerCrashed), (x, o)
        else:
            assert o == 2 * x, (x, o)
    done = starts_done(folder, tuple(plan))
    if error is None:
        assert len(out) == n
        event("finished")
    else:
        assert {"raise", "exit"} & set(done), (str(error), done)
        event("the pool broke")
    event(f"starts: {' '.join(done)}")


# -- the signal handling of processes a node starts -------------------------------------------

POOLS = ("inline", "thread", "fork", "forkserver", "spawn")


@functools.cache
def reference(spec: tuple[str, str, str]) -> tuple[str, str]:
    """What a child started by ``child_handlers(spec)`` sees in a plain Python process."""
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]);"
        "from faults.crashers import child_handlers;"
        "print(json.dumps(child_handlers(tuple(json.loads(sys.argv[2])))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(TESTS), json.dumps(spec)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    term, intr = json.loads(out)
    return term, intr


@st.composite
def specs(draw: st.DrawFn, main_thread: bool) -> tuple[str, str, str]:
    kind = draw(st.sampled_from(CHILD_KINDS))
    # A node may set handlers only in a main thread; the handlers a fork server's children
    # get depend on when that server started, not on the node: left untouched there.
    settable = main_thread and kind != "mp_forkserver"
    setups = st.sampled_from(HANDLER_SETUPS) if settable else st.just("untouched")
    return draw(setups), draw(setups), kind


@pytest.mark.timeout(300)
@SEARCH
@given(pool_kind=st.sampled_from(POOLS), data=st.data())
def test_processes_a_node_starts_handle_signals_as_in_a_plain_process(
    pool_kind: str, data: st.DataObject
) -> None:
    main_thread = pool_kind != "thread"
    items = data.draw(st.lists(specs(main_thread), min_size=1, max_size=3), label="specs")
    if pool_kind == "inline":
        pool = InlinePool()
    elif pool_kind == "thread":
        pool = ThreadPool(2)
    else:
        pool = ProcessPool(1, start_method=pool_kind)
    with pool:
        pipe = Pipeline("child-signals", pool=pool)
        pipe.add(child_handlers, batch=1)
        got = list(pipe.map(items))
    assert got == [reference(spec) for spec in items]
