"""The state a DaskPool shares with its callbacks, and small helpers of the pool.

:class:`Shared` holds the client, the workers' plugin and the Dask tasks in flight, so
the pool's callbacks reference it and not the pool: a pool nobody closed can then be
garbage-collected, and its ``weakref.finalize`` closes the shared state.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, InvalidStateError
from typing import Any

from papy._errors import PoolError
from papy._task import TaskResult
from papy.pools.dask.cluster import ClusterWatch
from papy.pools.dask.inflight import Sent

log = logging.getLogger("papy")


def fail(out: Future[TaskResult], error: BaseException) -> None:
    """Fail ``out`` with ``error`` unless it is done already (answered, or cancelled)."""
    try:
        out.set_exception(error)
    except InvalidStateError:
        pass


class Shared:
    """What a DaskPool's callbacks, cluster watch and finalizer use; never the pool itself.

    Holding the client, the workers' plugin and the tasks in flight here, rather than on
    the pool, lets a pool nobody closed be garbage-collected: its finalizer then calls
    :meth:`close`, which releases them.
    """

    def __init__(self, cache_name: str) -> None:
        self.lock = threading.Lock()
        #: set by close(): no task is accepted, every unfinished future failed
        self.closed = False
        self.client: Any = None
        self.own_client = False
        self.cluster: Any = None
        self.own_cluster = False
        self.adapt: tuple[int, int] | None = None
        self.watch: ClusterWatch | None = None
        #: the name of the pool's StepCache plugin on the workers
        self.cache_name = cache_name
        self.registered = False
        #: futures given out and not answered yet
        self.outs: set[Future[TaskResult]] = set()
        #: Dask tasks in flight, by number
        self.live: dict[int, Sent] = {}
        #: futures whose task was split (workers died): cancel() leaves them alone
        self.split: set[Future[TaskResult]] = set()
        #: pickled steps of the runs in progress, by step id
        self.specs: dict[str, bytes] = {}
        self.broken: PoolError | None = None

    def fail_waiting(self, exc: PoolError) -> None:
        """Stop the run: every task still waiting for this pool fails with ``exc``."""
        self.broken = exc
        with self.lock:
            outs = list(self.outs)
            live = [s.dfut for s in self.live.values()]
            for s in self.live.values():
                s.finished.set()  # the cancellation below must not answer first
        if live:
            try:
                self.client.cancel(live)
            except Exception:
                pass
        for out in outs:
            fail(out, exc)

    def close(self) -> None:
        """Fail every unfinished task with PoolError, then release everything; idempotent."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            outs = list(self.outs)
            self.outs.clear()
            self.split.clear()
            for s in self.live.values():
                s.finished.set()  # news of it that comes later is ignored
        error = PoolError("the DaskPool was closed before the task finished")
        for out in outs:
            fail(out, error)
        self.release()

    def release(self) -> None:
        """Cancel the tasks in flight, drop the plugin, close what the pool opened."""
        if self.watch is not None:
            self.watch.stop()
        with self.lock:
            live = [s.dfut for s in self.live.values()]
            self.live.clear()
        if self.client is not None and live:
            try:
                self.client.cancel(live)
            except Exception:
                pass
        if self.registered:
            self.registered = False
            try:  # drops this pool's steps from every worker
                self.client.unregister_worker_plugin(self.cache_name)
            except Exception:
                log.debug("could not unregister %s", self.cache_name, exc_info=True)
        self.specs.clear()
        if self.own_client and self.client is not None:
            try:
                self.client.close(timeout=5)
            except Exception:
                pass
        if self.cluster is not None and self.own_cluster:
            try:
                self.cluster.close()  # cancels every job it submitted
            except Exception:
                log.warning("could not close %r", self.cluster, exc_info=True)
        elif self.watch is not None and self.adapt is not None:
            try:
                self.watch.scale(self.adapt[0])  # give the jobs back now
            except Exception:
                pass


def on_shared(name: str, doc: str) -> Any:
    """Return a property reading and writing attribute ``name`` of the pool's ``_shared``."""
    return property(
        lambda self: getattr(self._shared, name),
        lambda self, value: setattr(self._shared, name, value),
        doc=doc,
    )


class Submitted:
    """A task just handed to Dask: its number on the workers and its Dask future."""

    __slots__ = ("number", "future")

    def __init__(self, number: int, future: Any) -> None:
        self.number = number
        self.future = future
