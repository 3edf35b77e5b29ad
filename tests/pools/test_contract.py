"""The pool contract (the docstring of :class:`papy.pools._base.Pool`), one suite for all pools.

Every test runs against an InlinePool, a ThreadPool, a ProcessPool and a DaskPool on a real
local Dask cluster (a scheduler and two one-thread workers, separate processes), submitting
:class:`~papy.pools._base.Task` objects directly, as the scheduler does. A case that cannot
apply to a pool is skipped with the reason (killing the worker of a pool that runs in this
very process; a queued or unfinished task on an InlinePool, which finishes every task
inside ``submit``); everything else is the same test, the same assertions.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import live_descendants
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from papy import Failure, GraphError, InlinePool, Pipeline, PoolError, ProcessPool, ThreadPool
from papy._items import Key
from papy._task import Call, Stage, StepSpec, TaskResult
from papy.pools._base import Pool, Task
from papy.pools.dask import DaskPool

KINDS = ["inline", "thread", "process", "dask"]
#: pools whose workers are other processes: only they can outlive a worker's death
OUT_OF_PROCESS = ["process", "dask"]
#: pools that queue tasks (an InlinePool runs each inside submit())
QUEUEING = ["thread", "process", "dask"]
#: pools whose items and results cross a process boundary (pickled)
PICKLING = {"process", "dask"}
#: seconds any single wait in this module may take before the test fails (loaded machine)
WAIT_S = 60.0

_ids = itertools.count()


# -- the node functions (module level: worker processes import them) ----------------------


def plus_one(x: int) -> int:
    return x + 1


def times_three(x: int) -> int:
    return x * 3


def fail_on(x: Any, bad: int) -> Any:
    """Raise for item value ``bad``; pass anything else through, plus one when an int."""
    if x == bad:
        raise ValueError(f"item value {x} is bad")
    return x + 1 if isinstance(x, int) else x


def lock_on(x: int, bad: int) -> Any:
    """Return something that cannot be pickled for item value ``bad``."""
    return threading.Lock() if x == bad else x


def crash_on(x: int, bad: int) -> int:
    """Kill the worker (no exception, no cleanup) on item value ``bad``."""
    if x == bad:
        os._exit(3)
    return x * 10


def stuck_on(x: int, slow: int, gate: str) -> int:
    """Wait on item value ``slow`` until the file ``gate`` exists (the test's own limit)."""
    if x == slow:
        deadline = time.monotonic() + WAIT_S
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
    return x


def gated(x: int, log: str, gate: str) -> int:
    """Write ``x`` to ``log`` when the call starts, then wait until the file ``gate`` exists."""
    with open(log, "a") as f:
        f.write(f"{x}\n")
    deadline = time.monotonic() + WAIT_S
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return x


def first_rule(x: int) -> int:
    if x % 5 == 1:
        raise ValueError(f"first: {x} % 5 == 1")
    return x * 2


def second_rule(x: int) -> int:
    if x % 7 == 4:
        raise KeyError(f"second: {x} % 7 == 4")
    return x - 1


# -- building tasks as papy._graph.build_steps does -----------------------------------------


def stage(name: str, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Stage:
    """Return the Stage of a node ``name`` that calls ``fn(item, *args)``."""
    return Stage(name=name, call=Call([fn], [args], [{}]), timeout=timeout)


def spec(*stages: Stage) -> StepSpec:
    """Return a fused step of ``stages`` with an id of its own, as ``build_steps`` makes."""
    return StepSpec(f"contract-{os.getpid()}-{next(_ids)}", list(stages))


def task(step: StepSpec, keys: Sequence[Key], values: Sequence[Any]) -> Task:
    """Return the task the scheduler would submit (timeout: the first node's, as Step has)."""
    return Task(step, list(keys), list(values), step.stages[0].timeout)


def result_of(fut: Future[TaskResult], timeout: float = WAIT_S) -> TaskResult:
    return fut.result(timeout=timeout)


def check_failure(v: Any, node: str, key: Key, exc_type: str) -> None:
    assert type(v) is Failure, f"item {key!r}: expected a Failure of {node!r}, got {v!r}"
    assert v.node == node
    assert v.item == key
    assert exc_type in v.exc_type, v.describe()


def wait_until(cond: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.02)


def started(log: Path) -> list[int]:
    """Return the item values whose call started, from the file ``gated`` appends to."""
    if not log.exists():
        return []
    return [int(line) for line in log.read_text().split()]


# -- the pools ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real Dask cluster: a scheduler and two one-thread workers under nannies.

    The scheduler gives up on a task at the first death of a worker running it
    (``allowed-failures: 0``; Dask's default retries it on three more workers) and sends
    each worker only the task it runs (``worker-saturation: 1.0``), so the crash test costs
    two worker deaths rather than eight, and a death never blames a task that was merely
    queued on the same worker.
    """
    from integration.cluster import start_scheduler, start_worker, wait_for_workers

    tmp = tmp_path_factory.mktemp("dask-contract")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES", "0")
        mp.setenv("DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION", "1.0")
        cluster = start_scheduler(tmp)
    try:
        start_worker(cluster, "contract-a")
        start_worker(cluster, "contract-b")
        wait_for_workers(cluster, 2)
        yield cluster
    finally:
        # Nothing on this cluster is worth a graceful shutdown (several seconds per
        # nanny on a loaded machine): kill the workers, then their nannies and the scheduler.
        workers = cluster.worker_processes()
        for worker in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                worker.kill()
        for proc in [*cluster.workers, cluster.scheduler]:
            proc.kill()
            proc.wait(timeout=WAIT_S)
        psutil.wait_procs(workers, timeout=WAIT_S)


def new_pool(kind: str, address: str | None = None) -> Pool:
    """Return a pool of this kind (two workers where there is a choice), not started."""
    if kind == "inline":
        return InlinePool()
    if kind == "thread":
        return ThreadPool(2)
    if kind == "process":
        return ProcessPool(2)
    return DaskPool(address, connect_timeout=30)


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make(kind: str, request: pytest.FixtureRequest) -> Iterator[Callable[[], Pool]]:
    """A factory of pools of this kind; every pool it made is closed after the test."""
    made: list[Pool] = []
    address = request.getfixturevalue("dask_cluster").address if kind == "dask" else None

    def new() -> Pool:
        pool = new_pool(kind, address)
        made.append(pool)
        return pool

    yield new
    for pool in made:
        pool.close()


@pytest.fixture
def pool(make: Callable[[], Pool]) -> Pool:
    p = make()
    p.start()
    return p


# -- submit: one output per item, in order --------------------------------------------------


def test_one_output_per_key_in_the_tasks_order(pool: Pool) -> None:
    step = spec(stage("inc", plus_one), stage("triple", times_three))
    batches = [[5], [3, 1, 2], list(range(17, 0, -1)), [0] * 4]
    keys: list[list[Key]] = [[40], [(7, 2), (7, 0), (7, 1)], list(range(100, 117)), [9, 8, 7, 6]]
    futs = [pool.submit(task(step, k, v)) for k, v in zip(keys, batches)]
    for values, fut in zip(batches, futs):
        result = result_of(fut)
        assert result.values == [(x + 1) * 3 for x in values]
        assert len(result.stats) == 2
        assert [s.n_in for s in result.stats] == [len(values)] * 2
        assert [s.n_failed for s in result.stats] == [0, 0]


def test_a_raising_item_is_a_failure_naming_node_and_key(pool: Pool) -> None:
    step = spec(stage("inc", plus_one), stage("picky", fail_on, 4))
    fut = pool.submit(task(step, [10, 11, 12, 13], [1, 3, 5, 7]))
    result = result_of(fut)
    assert fut.exception() is None
    assert result.values[0] == 3  # (1 + 1) + 1
    check_failure(result.values[1], "picky", 11, "ValueError")
    assert result.values[1].message == "item value 4 is bad"
    assert "fail_on" in result.values[1].traceback
    assert result.values[2:] == [7, 9]
    assert [s.n_failed for s in result.stats] == [0, 1]
    first = result.stats[1].first_failure
    assert first is not None and first.item == 11


def test_a_failure_from_upstream_comes_back_unchanged_and_is_not_run(pool: Pool) -> None:
    upstream = Failure(node="parse", item=2, exc_type="ValueError", message="no number")
    step = spec(stage("picky", fail_on, 3))
    result = result_of(pool.submit(task(step, [1, 2, 3], [3, upstream, 5])))
    check_failure(result.values[0], "picky", 1, "ValueError")
    assert result.values[1] == upstream
    assert result.values[2] == 6


# An item: (value, failed upstream?). The reference is the same functions, run here in order.
_items = st.lists(st.tuples(st.integers(-50, 50), st.booleans()), min_size=1, max_size=12)


def _reference(keys: list[Key], items: list[tuple[int, bool]]) -> list[Any]:
    out: list[Any] = []
    for key, (x, upstream) in zip(keys, items):
        if upstream:
            out.append(("upstream", key, "RuntimeError"))
        elif x % 5 == 1:
            out.append(("first", key, "ValueError"))
        elif (x * 2) % 7 == 4:
            out.append(("second", key, "KeyError"))
        else:
            out.append(x * 2 - 1)
    return out


def _comparable(v: Any) -> Any:
    return (v.node, v.item, v.exc_type) if type(v) is Failure else v


@settings(
    max_examples=15,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(items=_items, split=st.integers(0, 12), data=st.data())
def test_generated_batches_equal_a_serial_reference(
    pool: Pool, items: list[tuple[int, bool]], split: int, data: st.DataObject
) -> None:
    """Batches of values, some raising in the first or second node, some failed upstream,
    cut into two tasks at a generated point: the pool's outputs are the serial reference's.
    """
    keys: list[Key] = data.draw(
        st.lists(st.integers(0, 10**6), min_size=len(items), max_size=len(items), unique=True)
    )
    values = [
        Failure("upstream", k, "RuntimeError", "failed before") if upstream else x
        for k, (x, upstream) in zip(keys, items)
    ]
    step = spec(stage("first", first_rule), stage("second", second_rule))
    split = min(split, len(items))
    parts = [(keys[:split], values[:split]), (keys[split:], values[split:])]
    futs = [pool.submit(task(step, k, v)) for k, v in parts if k]
    got = [v for f in futs for v in result_of(f).values]
    assert [_comparable(v) for v in got] == _reference(keys, items)


# -- values that cannot be pickled ---------------------------------------------------------


def test_an_unpicklable_input_fails_that_item_only(kind: str, pool: Pool) -> None:
    lock = threading.Lock()
    step = spec(stage("picky", fail_on, -1))
    result = result_of(pool.submit(task(step, [0, 1, 2], [1, lock, 3])), 10)
    assert result.values[0] == 2 and result.values[2] == 4
    if kind in PICKLING:
        check_failure(result.values[1], "picky", 1, "TypeError")
        assert "lock" in result.values[1].message
        assert result.values[1].input_repr == repr(lock)  # the item the node was given
    else:  # pools in this process never pickle an item: the function gets the object
        assert result.values[1] is lock


def test_an_unpicklable_output_fails_that_item_only(kind: str, pool: Pool) -> None:
    step = spec(stage("inc", plus_one), stage("locker", lock_on, 3))
    result = result_of(pool.submit(task(step, [0, 1, 2], [0, 2, 4])), 10)
    assert result.values[0] == 1 and result.values[2] == 5
    if kind in PICKLING:
        check_failure(result.values[1], "locker", 1, "TypeError")
        assert "lock" in result.values[1].message
        # "locker"'s input (3) stayed in the worker: no input is shown, never the output
        # or the task's first input (2)
        assert result.values[1].input_repr == ""
    else:
        assert type(result.values[1]) is type(threading.Lock())


# -- worker crash ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", OUT_OF_PROCESS)
def test_a_worker_crash_fails_only_the_crashing_item(
    kind: str, pool: Pool, request: pytest.FixtureRequest
) -> None:
    # Inline and thread pools run items in this process: os._exit there ends the driver.
    step = spec(stage("crashy", crash_on, 2))
    result = result_of(pool.submit(task(step, [0, 1], [1, 2])))
    assert result.values[0] == 10
    check_failure(result.values[1], "crashy", 1, "WorkerCrashed")
    assert result.values[1].input_repr == "2"
    # The pool is still usable, with its size.
    again = result_of(pool.submit(task(step, [5, 6], [3, 4])))
    assert again.values == [30, 40]
    if kind == "dask":  # let the nannies bring the killed workers back for the next tests
        from integration.cluster import wait_for_workers

        wait_for_workers(request.getfixturevalue("dask_cluster"), 2)


@pytest.mark.parametrize("kind", OUT_OF_PROCESS)
def test_a_crash_in_a_later_node_names_it_and_no_other_nodes_input(
    kind: str, pool: Pool, request: pytest.FixtureRequest
) -> None:
    # The worker died in "crashy" (the second node of the task) on item 1. A ProcessPool
    # reads the node from the worker's slot; the item's input there (3) died with the
    # worker, so the Failure shows none rather than the task's (2). A DaskPool runs the
    # item again node by node, so it knows both.
    step = spec(stage("inc", plus_one), stage("crashy", crash_on, 3))
    result = result_of(pool.submit(task(step, [0, 1], [1, 2])))
    assert result.values[0] == 20
    check_failure(result.values[1], "crashy", 1, "WorkerCrashed")
    assert result.values[1].input_repr == ("" if kind == "process" else "3")
    if kind == "dask":
        from integration.cluster import wait_for_workers

        assert isinstance(pool, DaskPool)
        pool.release([step.id])  # the steps it ran one node at a time go with the step
        assert pool.cache_sizes()["driver"] == 0

        wait_for_workers(request.getfixturevalue("dask_cluster"), 2)


# -- timeouts -------------------------------------------------------------------------------


def test_an_item_past_its_timeout_fails_alone(kind: str, pool: Pool, tmp_path: Path) -> None:
    if not pool.enforces_timeout:
        # The pool says it cannot enforce a timeout: a pipeline must refuse the node.
        pipe = Pipeline("timed", pool=pool)
        pipe.add(plus_one, name="timed", timeout=1.0)
        with pytest.raises(GraphError, match="timed"):
            list(pipe.map([1, 2]))
        return
    gate = tmp_path / "gate"
    step = spec(stage("sleepy", stuck_on, 2, str(gate), timeout=1.0))
    try:
        if pool.item_timeouts:  # one task: the late item fails, its batch-mates complete
            futs = [pool.submit(task(step, [0, 1, 2], [1, 2, 3]))]
        else:  # the scheduler gives a timed node one item per task here
            futs = [pool.submit(task(step, [k], [v])) for k, v in [(0, 1), (1, 2), (2, 3)]]
        values = [v for f in futs for v in result_of(f).values]
    finally:
        gate.touch()  # an abandoned thread or a cancelled Dask task ends now
    assert values[0] == 1 and values[2] == 3
    check_failure(values[1], "sleepy", 1, "TimeoutError")


@pytest.mark.parametrize("kind", QUEUEING)
def test_time_waiting_for_a_worker_does_not_count_against_a_timeout(
    kind: str, pool: Pool, tmp_path: Path
) -> None:
    _, gate, running, _, _ = _fill(pool, tmp_path, queued=0)
    step = spec(stage("timed", plus_one, timeout=0.5))
    try:
        waiting = [pool.submit(task(step, [i], [i])) for i in range(pool.workers)]
        time.sleep(1.5)  # every timed task waits three times its limit for a worker
    finally:
        gate.touch()
    assert [result_of(f).values for f in waiting] == [[i + 1] for i in range(len(waiting))]
    assert [result_of(f).values for f in running] == [[i] for i in range(len(running))]


# -- close ----------------------------------------------------------------------------------


def test_submit_after_close_raises_pool_error(pool: Pool) -> None:
    step = spec(stage("inc", plus_one))
    assert result_of(pool.submit(task(step, [0], [1]))).values == [2]
    pool.close()
    assert pool.closed
    with pytest.raises(PoolError, match="closed"):
        pool.submit(task(step, [1], [2]))


def _nothing_left(threads: set[threading.Thread], procs: set[int], after: str) -> None:
    """Fail unless, within 10 s, no thread or process is alive that the snapshot lacks."""
    deadline = time.monotonic() + 10
    while True:
        new_threads = [t for t in threading.enumerate() if t not in threads and t.is_alive()]
        new_procs = [p.pid for p in live_descendants() if p.pid not in procs]
        if not new_threads and not new_procs:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"left after {after}: threads {new_threads}, pids {new_procs}")
        time.sleep(0.05)


def _busy(pool: Pool, step: StepSpec) -> None:
    """Run enough tasks that every worker of ``pool`` had one."""
    n = max(2, pool.workers) * 2
    futs = [pool.submit(task(step, [i], [i])) for i in range(n)]
    assert [result_of(f).values[0] for f in futs] == [i + 1 for i in range(n)]


def test_close_is_idempotent_and_leaves_no_process_or_thread(
    kind: str, make: Callable[[], Pool]
) -> None:
    step = spec(stage("inc", plus_one))
    if kind == "dask":
        # A first pool starts what Dask keeps once per process (its event loop thread,
        # its offload executor): that is not the pool's to stop.
        with make() as first:
            _busy(first, step)
    threads = set(threading.enumerate())
    procs = {p.pid for p in live_descendants()}
    pool = make()
    _busy(pool, step)
    pool.close()
    pool.close()
    assert pool.closed

    _nothing_left(threads, procs, "close()")


def test_a_pool_never_closed_is_released_by_garbage_collection(
    kind: str, make: Callable[[], Pool], request: pytest.FixtureRequest
) -> None:
    step = spec(stage("inc", plus_one))
    address = None
    if kind == "dask":  # what Dask keeps once per process is not the pool's (see above)
        address = request.getfixturevalue("dask_cluster").address
        with make() as first:
            _busy(first, step)
    threads = set(threading.enumerate())
    procs = {p.pid for p in live_descendants()}
    pool = new_pool(kind, address)
    _busy(pool, step)
    gone = weakref.ref(pool)
    del pool
    gc.collect()
    assert gone() is None, "the pool is still referenced after its user let it go"

    _nothing_left(threads, procs, "garbage collection")


def _fill(
    pool: Pool, tmp_path: Path, queued: int
) -> tuple[Path, Path, list[Future[TaskResult]], list[Future[TaskResult]], StepSpec]:
    """Give every worker a task that waits for a gate, then queue ``queued`` more.

    Returns the log of started calls, the gate, the running futures, the queued ones and
    the step. The running tasks are known to run: their calls wrote to the log.
    """
    log, gate = tmp_path / "started.log", tmp_path / "gate"
    step = spec(stage("gated", gated, str(log), str(gate)))
    n = pool.workers
    running = [pool.submit(task(step, [i], [i])) for i in range(n)]
    wait_until(lambda: len(started(log)) == n, f"{n} tasks run at once on {pool!r}")
    waiting = [pool.submit(task(step, [100 + i], [100 + i])) for i in range(queued)]
    return log, gate, running, waiting, step


@pytest.mark.parametrize("kind", QUEUEING)
def test_close_fails_every_unfinished_task_with_pool_error(
    kind: str, pool: Pool, tmp_path: Path
) -> None:
    log, gate, running, waiting, _ = _fill(pool, tmp_path, queued=3)
    try:
        pool.close()
        for fut in running + waiting:
            assert fut.done(), f"a future of {pool!r} is still pending after close()"
            assert isinstance(fut.exception(timeout=0), PoolError), fut
    finally:
        gate.touch()  # a ThreadPool's abandoned calls end now
    assert all(x < 100 for x in started(log)), "a queued task ran after close()"


def test_submit_racing_close_never_leaves_a_future_pending(pool: Pool) -> None:
    step = spec(stage("inc", plus_one))
    futs: list[Future[TaskResult]] = []
    raised: list[BaseException] = []
    go = threading.Event()

    def submitter() -> None:
        go.set()
        for i in itertools.count():
            try:
                futs.append(pool.submit(task(step, [i], [i])))
            except BaseException as exc:
                raised.append(exc)
                return

    t = threading.Thread(target=submitter)
    t.start()
    go.wait()
    wait_until(lambda: len(futs) >= 20, "some tasks were submitted")
    pool.close()
    t.join(WAIT_S)
    assert not t.is_alive()
    assert len(raised) == 1 and isinstance(raised[0], PoolError), raised
    for i, fut in enumerate(futs):
        wait_until(fut.done, f"task {i} is done after close()", 5)
        if fut.exception() is None:
            assert fut.result().values == [i + 1]
        else:
            assert isinstance(fut.exception(), PoolError), fut.exception()


# -- cancel ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", QUEUEING)
def test_cancel_withdraws_queued_tasks_and_lets_running_ones_finish(
    kind: str, pool: Pool, tmp_path: Path
) -> None:
    log, gate, running, waiting, step = _fill(pool, tmp_path, queued=3)
    try:
        withdrawn = pool.cancel(running + waiting)
    finally:
        gate.touch()
    assert withdrawn == len(waiting)
    assert all(f.cancelled() for f in waiting)
    assert [result_of(f).values for f in running] == [[i] for i in range(len(running))]
    # Later work runs; nothing withdrawn ever does.
    after = [pool.submit(task(step, [200 + i], [200 + i])) for i in range(pool.workers)]
    assert [result_of(f).values[0] for f in after] == [200 + i for i in range(len(after))]
    assert sorted(started(log)) == [*range(len(running)), *(200 + i for i in range(len(after)))]


def test_cancel_leaves_done_and_foreign_futures_alone(pool: Pool) -> None:
    step = spec(stage("inc", plus_one))
    done = [pool.submit(task(step, [i], [i])) for i in range(3)]
    for f in done:
        result_of(f)
    foreign: Future[TaskResult] = Future()  # another pool's task, still waiting
    assert pool.cancel([*done, foreign]) == 0
    assert not foreign.cancelled() and not foreign.done()
    assert [f.result().values for f in done] == [[1], [2], [3]]


# -- release, workers, threads --------------------------------------------------------------


def test_a_released_spec_can_run_again(pool: Pool) -> None:
    step = spec(stage("inc", plus_one), stage("triple", times_three))
    assert result_of(pool.submit(task(step, [0], [1]))).values == [6]
    pool.release([step.id, "never-seen"])
    assert result_of(pool.submit(task(step, [1, 2], [2, 3]))).values == [9, 12]


def test_workers_is_a_positive_count(pool: Pool) -> None:
    assert isinstance(pool.workers, int) and pool.workers >= 1


def test_concurrent_submits_from_several_threads_all_complete(pool: Pool) -> None:
    step = spec(stage("inc", plus_one), stage("picky", fail_on, 13))
    results: dict[int, list[Any]] = {}
    errors: list[BaseException] = []

    def client(t: int) -> None:
        try:
            futs = [
                (b, pool.submit(task(step, [(t, b, i) for i in range(5)], range(b, b + 5))))
                for b in range(0, 40, 5)
            ]
            results[t] = [(b, result_of(f).values) for b, f in futs]
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert not errors, errors
    assert sorted(results) == [0, 1, 2, 3]
    for t, batches in results.items():
        assert len(batches) == 8
        for b, values in batches:
            for i, v in enumerate(values):
                x = b + i
                if x + 1 == 13:
                    check_failure(v, "picky", (t, b, i), "ValueError")
                else:
                    assert v == x + 2


@pytest.mark.parametrize("kind", ["inline"])
def test_an_inline_pool_answers_inside_submit_so_nothing_waits(kind: str, pool: Pool) -> None:
    """What the queueing cases above mean for an InlinePool: every future is done at once,
    so close() finds nothing unfinished, cancel() withdraws nothing, and timed nodes are
    refused before any work (it enforces no timeout)."""
    step = spec(stage("inline", plus_one))
    futures = [pool.submit(task(step, [i], [i])) for i in range(3)]
    assert all(f.done() for f in futures)
    assert pool.cancel(futures) == 0
    assert [result_of(f).values for f in futures] == [[1], [2], [3]]
    assert pool.enforces_timeout is False
    pool.close()
    assert all(not f.cancelled() and f.exception() is None for f in futures)
