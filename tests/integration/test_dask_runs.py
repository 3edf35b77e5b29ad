"""DaskPool state belongs to the pool and the run; cancel() withdraws tasks not yet started.

Two real clusters (a scheduler and one single-threaded worker each, separate processes),
started by the test itself.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from concurrent.futures import CancelledError
from pathlib import Path
from typing import Any

import psutil
import pytest

from integration.cluster import Cluster, start_scheduler, start_worker, wait_for_workers
from papy import Failure, Pipeline, PoolError
from papy._task import Stage, StepSpec
from papy.pools import Task
from papy.pools.dask import DaskPool
from papy.pools.dask.worker import StepCache


@pytest.fixture(scope="module")
def clusters(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Cluster]]:
    started: list[Cluster] = []
    try:
        for name in ("one", "two"):
            c = start_scheduler(tmp_path_factory.mktemp(f"dask-{name}"))
            started.append(c)
            start_worker(c, f"{name}-worker")
        for c in started:
            wait_for_workers(c, 1)
        yield started[0], started[1]
    finally:
        for c in started:
            c.stop()


def caches_of(dask_worker: Any) -> dict[str, int]:
    """Return each DaskPool's cached steps on a Dask worker (plugin name: count)."""
    plugins = dask_worker.plugins.items()
    return {name: p.sizes()["specs"] for name, p in plugins if isinstance(p, StepCache)}


def caches_here(_: object = None) -> dict[str, int]:
    """Return, in a task, each DaskPool's cached steps on this worker."""
    from distributed import get_worker

    return caches_of(get_worker())


def pair(seen: dict[str, int]) -> tuple[dict[str, int], dict[str, int]]:
    return seen, caches_here()


def empty(pool: DaskPool) -> dict[str, object]:
    """Return what an idle pool must hold: nothing on the driver or on its one worker."""
    workers = list(pool.client.scheduler_info()["workers"])
    zero = {"specs": 0, "started": 0, "withdrawn": 0}
    return {"driver": 0, "workers": {w: zero for w in workers}}


def test_pools_on_two_clusters_keep_their_own_steps(clusters: tuple[Cluster, Cluster]) -> None:
    one, two = clusters
    with DaskPool(one.address) as p1, DaskPool(two.address) as p2:
        pipe = Pipeline("two-clusters")
        a = pipe.add(caches_here, pool=p1, name="a")
        pipe.add(pair, after=a, pool=p2, name="b")
        out = list(pipe.map(range(3)))
        assert len(out) == 3
        for seen1, seen2 in out:
            # Each worker holds the step of its own pool only, and one step each.
            assert seen1 == {p1._cache_name: 1}
            assert seen2 == {p2._cache_name: 1}
        # The run is over: neither pool keeps its step, here or on its workers.
        assert p1.cache_sizes() == empty(p1)
        assert p2.cache_sizes() == empty(p2)


def test_a_pool_reused_for_many_runs_keeps_no_old_steps(
    clusters: tuple[Cluster, Cluster],
) -> None:
    one, _ = clusters
    with DaskPool(one.address) as pool:
        for run in range(4):
            pipe = Pipeline(f"run{run}")
            pipe.add(caches_here, pool=pool)
            out = list(pipe.map(range(2)))
            # During each run the worker holds this run's one step, none of the earlier runs'.
            assert out == [{pool._cache_name: 1}] * 2, run
            assert pool.cache_sizes() == empty(pool), run
    # A closed pool leaves no plugin behind on the workers.
    from distributed import Client

    with Client(one.address, set_as_default=False) as client:
        left = client.run(caches_of)
    assert left == {w: {} for w in left}


def append_slowly(x: int, path: str, seconds: float) -> int:
    """Append ``x`` to the file at ``path`` (the item ran), then take ``seconds``."""
    with open(path, "a") as f:
        f.write(f"{x}\n")
    time.sleep(seconds)
    return x


def _tasks(path: Path, n: int, seconds: float) -> list[Task]:
    stage = Stage("append", functools.partial(append_slowly, path=str(path), seconds=seconds))
    spec = StepSpec(f"cancel-{path.name}", [stage])
    return [Task(spec, [i], [i]) for i in range(n)]


def _wait_for_lines(path: Path, n: int, timeout: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = path.read_text().split() if path.exists() else []
        if len(lines) >= n:
            return lines
        time.sleep(0.05)
    raise AssertionError(f"{path} did not get {n} line(s) in {timeout} s")


def test_cancel_withdraws_queued_tasks_and_lets_the_running_one_finish(
    clusters: tuple[Cluster, Cluster], tmp_path: Path
) -> None:
    one, _ = clusters
    ran = tmp_path / "ran"
    with DaskPool(one.address) as pool:
        assert pool.workers == 1
        tasks = _tasks(ran, 6, seconds=2.0)
        futures = [pool.submit(t) for t in tasks]
        _wait_for_lines(ran, 1)  # the first task runs; the five others wait
        assert pool.cancel(futures) == 5
        first = futures[0].result(timeout=60)  # the running task is delivered, not lost
        assert first.values == [0]
        for f in futures[1:]:
            assert f.cancelled()
            with pytest.raises(CancelledError):
                f.result()
        time.sleep(3.0)  # time enough for another task to start, were one left
        assert ran.read_text().split() == ["0"]
        # A task it was not given, or one already done, is not withdrawn.
        assert pool.cancel(futures) == 0
        # The pool goes on working, and the run's state is dropped with its step.
        again = pool.submit(_tasks(tmp_path / "again", 1, seconds=0.0)[0])
        assert again.result(timeout=60).values == [0]
        pool.release([tasks[0].spec.id, f"cancel-{(tmp_path / 'again').name}"])
        assert pool.cache_sizes() == empty(pool)


def test_cancel_leaves_a_running_task_to_finish(
    clusters: tuple[Cluster, Cluster], tmp_path: Path
) -> None:
    one, _ = clusters
    ran = tmp_path / "ran"
    with DaskPool(one.address) as pool:
        (task,) = _tasks(ran, 1, seconds=1.0)
        future = pool.submit(task)
        _wait_for_lines(ran, 1)
        assert pool.cancel([future]) == 0
        assert not future.cancelled()
        assert future.result(timeout=60).values == [0]
        assert ran.read_text().split() == ["0"]


def nap(x: int) -> int:
    """Sleep 30 s on item 1, return the others at once."""
    if x == 1:
        time.sleep(30)
    return x


def test_a_node_timeout_fails_the_late_item_only(clusters: tuple[Cluster, Cluster]) -> None:
    _, two = clusters
    with DaskPool(two.address) as pool:
        pipe = Pipeline("timed")
        pipe.add(nap, pool=pool, timeout=2.0)
        # (Item 1 comes last: the one worker thread cannot be interrupted and stays busy
        # with it, and a node's timeout counts the time a task waits on the cluster.)
        out = list(pipe.map(range(2), errors="yield"))
        assert out[0] == 0
        failed = out[1]
        assert isinstance(failed, Failure)
        assert (failed.node, failed.exc_type) == ("nap", "TimeoutError")
        assert "timeout of 2 s" in failed.message
        assert pool.cache_sizes() == empty(pool)


def keep(x: Any) -> Any:
    return x


def test_an_unpicklable_input_stops_a_node_that_raises_on_error(
    clusters: tuple[Cluster, Cluster],
) -> None:
    """An item that cannot travel to the workers counts as a failure of its node."""
    import threading

    from papy import RunAborted

    one, _ = clusters
    with DaskPool(one.address) as pool:
        pipe = Pipeline("strict")
        pipe.add(keep, pool=pool, on_error="raise")
        with pytest.raises(RunAborted) as caught:
            list(pipe.map([1, threading.Lock(), 3]))
    failure = caught.value.failure
    assert (failure.node, failure.item, failure.exc_type) == ("keep", 1, "TypeError")
    assert "lock" in failure.message


def test_close_with_running_tasks_fails_them_and_logs_no_callback_error(
    clusters: tuple[Cluster, Cluster], tmp_path: Path
) -> None:
    """close() cancels Dask tasks under their callbacks: none may log an error for it."""
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append  # type: ignore[method-assign]
    dask_log = logging.getLogger("distributed")
    dask_log.addHandler(handler)
    one, _ = clusters
    log = tmp_path / "ran.log"
    try:
        for _ in range(3):
            log.unlink(missing_ok=True)
            pool = DaskPool(one.address)
            futures = [pool.submit(t) for t in _tasks(log, 3, 1.0)]
            _wait_for_lines(log, 1)
            pool.close()
            for f in futures:
                assert f.done()
                assert isinstance(f.exception(timeout=0), PoolError), f
        time.sleep(1.0)  # callbacks of the cancelled Dask tasks run on Dask's threads
    finally:
        dask_log.removeHandler(handler)
    assert [r.getMessage() for r in records] == []
    wait_for_workers(one, 1)


async def interrupting(x: int) -> int:
    if x == 1:
        raise KeyboardInterrupt("k1")
    return x


def test_an_async_node_with_a_timeout_raising_keyboard_interrupt_fails_its_item(
    clusters: tuple[Cluster, Cluster],
) -> None:
    # asyncio re-raised it out of the worker's event loop: the Dask task failed again and
    # again, workers died, and the run never ended.
    one, _ = clusters
    with DaskPool(one.address) as pool:
        pipe = Pipeline("async-interrupt")
        pipe.add(interrupting, pool=pool, timeout=5.0)
        out = list(pipe.map(range(3), errors="yield"))
        report = pipe.last_report
    assert out[0] == 0 and out[2] == 2
    assert isinstance(out[1], Failure)
    assert (out[1].node, out[1].item, out[1].exc_type) == ("interrupting", 1, "KeyboardInterrupt")
    assert report is not None and report.failed == 1


def lock_on_2(x: int) -> Any:
    import threading

    return threading.Lock() if x == 2 else x


def test_failures_made_on_a_dask_worker_are_counted_once_and_reported(
    clusters: tuple[Cluster, Cluster],
) -> None:
    # A late item was counted twice (failed 2 of 2 items); an output that cannot come
    # back was yielded as a Failure but missing from report.failed and report.failures.
    _, two = clusters
    with DaskPool(two.address) as pool:
        pipe = Pipeline("counted")
        pipe.add(nap, pool=pool, timeout=2.0)
        list(pipe.map(range(2), errors="yield"))
        report = pipe.last_report
        assert report is not None
        assert (report.nodes["nap"].items_in, report.nodes["nap"].failed) == (2, 1)
        assert report.failure_counts == {"nap": {"TimeoutError": 1}}

        pipe = Pipeline("unsendable")
        pipe.add(lock_on_2, pool=pool)
        out = list(pipe.map(range(4), errors="yield"))
        report = pipe.last_report
        assert report is not None
        assert [o.item for o in out if isinstance(o, Failure)] == [2]
        assert (report.failed, [f.item for f in report.failures]) == (1, [2])
        assert report.failure_counts == {"lock_on_2": {"TypeError": 1}}


def split_in_two(x: int) -> list[int]:
    return [x, x]


def test_an_item_that_cannot_reach_a_dask_worker_is_counted_once(
    clusters: tuple[Cluster, Cluster],
) -> None:
    # It was counted by the pool and again by the node's stage (twice below a scatter).
    import threading

    from papy import ThreadPool

    one, _ = clusters
    with DaskPool(one.address) as pool, ThreadPool(1) as threads:
        pipe = Pipeline("unsent")
        made = pipe.add(lambda x: threading.Lock() if x == 1 else x, pool=threads, name="mk")
        pipe.add(split_in_two, after=made, pool=pool, scatter=True, name="sp")
        out = list(pipe.map(range(4), errors="yield"))
        report = pipe.last_report
    assert [o.item for o in out if isinstance(o, Failure)] == [1]
    assert report is not None
    assert (report.nodes["sp"].items_in, report.nodes["sp"].failed) == (4, 1)
    assert report.failure_counts == {"sp": {"TypeError": 1}}


def test_a_run_on_a_cluster_that_lost_every_worker_fails_within_start_timeout(
    tmp_path: Path,
) -> None:
    # A pool given an address had no watch: with every worker gone (a node killing them
    # again and again can exhaust a cluster's nannies), the run waited for ever.
    cluster = start_scheduler(tmp_path)
    try:
        start_worker(cluster, "only")
        wait_for_workers(cluster, 1)
        with DaskPool(cluster.address, start_timeout=3.0) as pool:
            pipe = Pipeline("orphaned")
            pipe.add(keep, pool=pool)
            assert list(pipe.map(range(3))) == [0, 1, 2]
            for nanny in cluster.workers:  # the worker and its nanny, for good
                for p in [*psutil.Process(nanny.pid).children(recursive=True)]:
                    p.kill()
                nanny.kill()
                nanny.wait()
            t0 = time.monotonic()
            with pytest.raises(PoolError, match="no worker for 3 s"):
                list(pipe.map(range(3)))
            assert time.monotonic() - t0 < 30
    finally:
        cluster.stop()
