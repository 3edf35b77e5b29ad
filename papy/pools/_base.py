"""The one interface every pool implements, and the task it runs.

A pool runs tasks (a batch of items through a fused step) and hands back a
:class:`concurrent.futures.Future` of a :class:`~papy._task.TaskResult`. The scheduler only
ever calls :meth:`Pool.submit`, :meth:`Pool.cancel`, :meth:`Pool.release` and
:meth:`Pool.close` and reads :attr:`Pool.workers`, so a new kind of pool (a cluster, a GPU
queue) is one new module and no scheduler change. What a pool promises is written once, in
the docstring of :class:`Pool`.
"""

from __future__ import annotations

import abc
import functools
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from papy._errors import PoolError
from papy._items import NO_INPUT, Failure, Key, failure_from_exception
from papy._task import StageStats, StepSpec, TaskResult


@dataclass
class Task:
    """A batch of items to run through one step.

    ``timeout`` is the per-item limit (seconds) of the step's first node, when it set one;
    each stage's own limit is in ``spec.stages[i].timeout``. Pools with
    ``item_timeouts`` time every item from its own start (see :class:`papy._task.Tracker`);
    the scheduler gives other pools one item per task of a timed node.
    """

    spec: StepSpec
    keys: Sequence[Key]
    values: list[Any]
    timeout: float | None = None
    #: journal keys of the items, on terminal steps of a journaled run
    jkeys: list[tuple[str, str]] | None = None
    #: False when the driver knows no value is a Failure (lets the worker skip a scan)
    dirty: bool = True

    def __len__(self) -> int:
        return len(self.keys)

    def slice(self, start: int, stop: int) -> Task:
        """Return the task for items ``start:stop`` (to split a batch that crashed)."""
        jkeys = self.jkeys[start:stop] if self.jkeys is not None else None
        return Task(
            self.spec,
            self.keys[start:stop],
            self.values[start:stop],
            self.timeout,
            jkeys,
            self.dirty,
        )

    def first_stage(self) -> str:
        """Return the name of the node an item enters this task at."""
        return self.spec.stages[0].name

    def last_stage(self) -> str:
        """Return the name of the node whose output this task returns."""
        return self.spec.stages[-1].name

    def fail_all(
        self, exc: BaseException, node: str | None = None, attempts: int = 1
    ) -> TaskResult:
        """Return a result in which every still-good item failed with ``exc``.

        The failures are counted in the statistics of node ``node`` (default: the step's
        first), so a crash or a timeout shows in the report and stops a run whose node has
        ``on_error="raise"``, like any other failure. The task holds its first node's
        inputs only: a Failure named after a later node has no ``input_repr``.
        """
        name = node or self.first_stage()
        known = name == self.first_stage()
        values = []
        first: Failure | None = None
        fresh = 0
        for k, v in zip(self.keys, self.values):
            if type(v) is not Failure:
                v = failure_from_exception(name, k, exc, v if known else NO_INPUT, attempts)
                fresh += 1
                first = first or v
            values.append(v)
        stats = []
        for s in self.spec.stages:
            st = StageStats()
            if s.name == name and first is not None:
                st.n_in = fresh
                st.failed(first, fresh)  # all with the same exception
            stats.append(st)
        return TaskResult(values, stats, dirty=True)

    def miscounted(self, pool: object, got: Sequence[Any]) -> TaskResult:
        """Return the result of a task whose pool returned ``len(got)`` values, not one per item.

        Which output belongs to which item cannot be known, so every item fails with a
        PoolError naming the pool and the node; none of the outputs is trusted.
        """
        node = self.first_stage()
        label = getattr(pool, "describe", lambda: repr(pool))()
        error = PoolError(
            f"pool {label} returned {len(got)} results for {len(self)} items "
            f"of node {node!r}; none of them can be trusted"
        )
        return Task(self.spec, self.keys, [NO_INPUT] * len(self)).fail_all(error, node)


def merge_parts(n: int, done: Callable[[TaskResult], None]) -> list[Callable[[TaskResult], None]]:
    """Return one callback per part of a split task; ``done`` gets the parts joined in order.

    Pools split a batch whose worker died to find the item at fault; the scheduler still
    sees one task and one result.
    """
    results: list[TaskResult | None] = [None] * n
    remaining = [n]
    lock = threading.Lock()

    def part_done(i: int, result: TaskResult) -> None:
        with lock:
            results[i] = result
            remaining[0] -= 1
            finished = remaining[0] == 0
        if finished:
            merged = TaskResult([], [])
            for r in results:
                merged.extend(r)  # type: ignore[arg-type]
            done(merged)

    return [functools.partial(part_done, i) for i in range(n)]


_P = TypeVar("_P", bound="Pool")


class Pool(abc.ABC):
    """Run tasks on some workers; the scheduler's only view of compute resources.

    **The contract.** Every pool (inline, thread, process, Dask, and any new one) keeps
    the promises below; ``tests/pools/test_contract.py`` checks them, the same tests for
    every pool.

    ``submit(task)`` returns a :class:`~concurrent.futures.Future` of a
    :class:`~papy._task.TaskResult`:

    - *One output per item, in the task's order.* ``result.values[i]`` is the output (or a
      :class:`~papy.Failure`) of item ``task.keys[i]``, and ``len(result.values) ==
      len(task.keys)``, whatever happened to the items. ``result.stats`` has one
      :class:`~papy._task.StageStats` per stage of ``task.spec`` (empty when the pool
      failed the task as a whole). The futures of different tasks complete in any order.
    - *An item's own problem is that item's Failure*, never a failed future and never its
      batch-mates' failure. Each of these becomes a Failure whose ``node`` names the node
      and ``item`` the item's key, and the other items of the task complete normally (a
      pool may run them again to find the culprit; each is still reported once):
      an exception raised by a node's function (any exception, ``SystemExit`` and
      ``KeyboardInterrupt`` included, unless it is a real interrupt of the driver); an
      input or an output that cannot be pickled on a pool that pickles
      (``TypeError``; pools in the driver's process pass the object itself); a worker
      that dies while running the item (``os._exit``, a signal, the OOM killer):
      :class:`~papy.WorkerCrashed`; an item that runs past its node's ``timeout``:
      ``TimeoutError`` (see *Timeouts*).
    - A Failure already among ``task.values`` (the item failed upstream) comes back
      unchanged; no function runs on it.
    - *A future fails* (``set_exception``) *only when the pool itself cannot run work*,
      with a :class:`~papy.PoolError`: it was closed before the task finished, its
      cluster is gone or refuses the work, its workers cannot start (or on a bug in PaPy
      itself, or a real interrupt of the driver: then with that exception). The scheduler
      then stops the run with that error: nothing is silently lost. A closed pool never
      answers with a result whose items are PoolError Failures.
    - On a closed pool ``submit`` *raises* :class:`~papy.PoolError` (it does not return a
      failed future), also when ``close()`` runs in another thread at the same moment.
    - ``submit`` does not wait for the work, except on an :class:`~papy.InlinePool`, which
      runs the task in the caller's thread and returns a future already done.

    ``close()`` is idempotent and returns promptly, without waiting for running tasks.
    When it returns, every future the pool gave out is done: finished tasks keep their
    result, every other one failed with :class:`~papy.PoolError` (queued tasks never run;
    a running task is stopped where the pool can stop it: a worker process is killed, a
    Dask task cancelled; a thread cannot be stopped, so a ThreadPool abandons the task: its
    call goes on in the background and its result is discarded). Every worker is released:
    no process of the pool is left, and no thread, except a ThreadPool thread still inside
    a node's function, which ends when that call returns; nothing the pool started keeps
    the interpreter from exiting. Garbage collection and interpreter exit close a pool
    that was never closed. A Dask cluster or client the user passed in stays up.

    *A worker crash* (a worker process that dies, a Dask worker lost) costs only the items
    it held: the pool replaces the worker (on Dask, the worker's nanny restarts it), runs
    the other items again, and the item that killed it becomes a
    :class:`~papy.WorkerCrashed` Failure (see above); the pool stays usable. Pools
    that run in the driver's own process (inline, thread) have no separate worker: what
    kills their worker kills the driver.

    ``cancel(futures)`` withdraws the given tasks that have not started (see
    :meth:`cancel`): their futures are cancelled and their items never run; running
    tasks finish and report as usual; futures already done, or not from this pool, are
    left alone. It returns how many tasks it withdrew.

    ``release(spec_ids)`` is called at the end of every run with the ids of its steps'
    specs: the pool may drop what it keeps for them (shipped functions, caches). It is
    never an error: unknown ids are ignored, and a task of a released spec submitted
    later still runs (its spec is shipped again).

    ``workers`` is how many tasks the pool runs at the same time *now* (at least 1); it
    may change while the pool lives (a self-sizing ThreadPool, a Dask cluster that grows
    or loses workers) and the scheduler reads it at every dispatch, keeping ``workers *
    prefetch`` tasks in flight.

    *Timeouts.* A pool with ``enforces_timeout = False`` cannot interrupt a call (an
    InlinePool runs in the caller's thread): it never enforces a ``timeout``, and a
    Pipeline refuses a node with a ``timeout`` on it (:class:`~papy.GraphError`) before
    any work. A pool with ``item_timeouts = True`` times every item of a task from the
    item's own start (``k * timeout`` for one call of a ``batched=True`` node on ``k``
    items): only the item that overran fails with ``TimeoutError`` and its batch-mates
    complete. A pool with ``item_timeouts = False`` only times the whole task
    (``task.timeout * len(task)``) and fails all its still-good items when it overruns,
    so the scheduler gives a timed node one item per task on such a pool and never fuses
    a timed node there. Either way the clock starts when the item (or the task) starts
    running on a worker, never while it waits in a queue or travels there, so no item is
    cut short before its limit; the failure arrives within the limit plus a small grace.

    *Threads.* ``submit``, ``cancel``, ``release`` and ``close`` may be called from any
    thread, and several threads may submit at the same time (one pool shared by runs in
    progress at once). Futures complete on the pool's own threads (its worker threads,
    its manager thread, Dask's event loop), or, on an InlinePool, in the caller's thread
    before ``submit`` returns; done-callbacks therefore run on those threads and must be
    quick and must not wait for the pool (the scheduler's callback only puts the future
    on its completion queue).
    """

    #: How many tasks can run at the same time.
    workers: int
    #: Whether a node on this pool should be fused with a following node on the same pool.
    fuses: bool = True
    #: Whether a scatter, its 1:1 nodes and its gather may run as one task. False where a
    #: worker can die (process and Dask pools): crash recovery finds the culprit among a
    #: task's items, so a sub-item's crash would be blamed on its whole item.
    groups_scatter: bool = True
    #: A short, human name for reports and drawings (``processx4``).
    kind: str = "pool"
    #: Tasks per worker the scheduler keeps in flight (one running, the rest queued).
    prefetch: int = 2
    #: Seconds of work per task that automatic batch sizes aim at: long enough that the
    #: cost of a task (messages, wake-ups of the driver's threads, which take CPU from the
    #: workers) is a few percent, short enough to keep workers evenly loaded.
    target_task_s: float = 0.02
    #: Whether a node's ``timeout`` can be enforced at all (the caller's own thread cannot
    #: be interrupted, so an InlinePool refuses timed nodes before any work).
    enforces_timeout: bool = True
    #: Whether the pool times each item of a task from its own start (through a
    #: :class:`papy._task.Tracker`); if not, a timed node gets one item per task.
    item_timeouts: bool = False

    def __init__(self) -> None:
        self._closed = False
        self._start_lock = threading.Lock()
        self._started = False
        #: the futures this pool gave out and that someone still holds (for cancel())
        self._issued: weakref.WeakSet[Future[TaskResult]] = weakref.WeakSet()

    @property
    def closed(self) -> bool:
        """Tell whether :meth:`close` was called."""
        return self._closed

    def start(self) -> None:
        """Start the workers now (pools also start lazily on first submit)."""
        with self._start_lock:
            if self._closed:
                raise PoolError(f"{self!r} is closed; make a new pool")
            if not self._started:
                self._start()
                self._started = True

    def submit(self, task: Task) -> Future[TaskResult]:
        """Run ``task`` and return a future of its result (see the class docstring).

        Raises :class:`~papy.PoolError` when the pool is closed.
        """
        if not self._started or self._closed:
            self.start()
        fut = self._submit(task)
        self._issued.add(fut)
        return fut

    def close(self) -> None:
        """Stop the workers; idempotent. Futures not done fail with a PoolError.

        See the class docstring for what must be true when this returns.
        """
        with self._start_lock:
            if self._closed:
                return
            self._closed = True
            started = self._started
        if started:
            self._close()

    def release(self, spec_ids: Sequence[str]) -> None:
        """Forget the steps of a run that ended (their functions and cached state).

        Called by the scheduler at the end of every run, so a long-lived pool does not
        keep every function it ever ran. The default keeps nothing, so does nothing.
        """
        return None

    def cancel(self, futures: Iterable[Future[TaskResult]]) -> int:
        """Withdraw the given tasks that have not started; return how many were withdrawn.

        Called by the scheduler when a run stops early (an error, ``RunAborted``, the
        consumer closing the iterator), so a pool the user owns and keeps does not go on
        with the dead run's queued work. A withdrawn task's future is cancelled
        (``future.cancelled()`` is true) and its items are never run; a task already
        running is left to finish and its future completes as usual. Futures of other
        pools, or already done, are ignored.

        The default cancels the futures themselves (those this pool gave out), which is
        enough for any pool that calls ``future.set_running_or_notify_cancel()`` when a
        task starts and skips the task when that returns ``False`` (as
        :mod:`concurrent.futures` executors do).
        """
        issued = self._issued
        return sum(1 for f in futures if f in issued and f.cancel())

    def describe(self) -> str:
        """Return the label used in reports and drawings, such as ``processx2``."""
        return f"{self.kind}x{self.workers}"

    @abc.abstractmethod
    def _start(self) -> None: ...

    @abc.abstractmethod
    def _submit(self, task: Task) -> Future[TaskResult]: ...

    @abc.abstractmethod
    def _close(self) -> None: ...

    def __enter__(self: _P) -> _P:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self._started else "idle")
        return f"{type(self).__name__}(workers={self.workers}, {state})"
