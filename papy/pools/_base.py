"""The one interface every pool implements, and the task it runs.

A pool runs tasks (a batch of items through a fused step) and hands back a
:class:`concurrent.futures.Future` of a :class:`~papy._task.TaskResult`. The scheduler only
ever calls :meth:`Pool.submit`, reads :attr:`Pool.workers` and calls :meth:`Pool.close`,
so a new kind of pool (a cluster, a GPU queue) is one new module and no scheduler change.

Contract for implementers:
- ``submit`` never raises for a problem with an *item* (unpicklable, crashing, timing out):
  that item's output becomes a :class:`~papy.Failure` and the other items complete.
- A future fails (``set_exception``) only when the pool itself is unusable (closed, or a
  cluster unreachable); the scheduler then stops the run with that error.
- ``close()`` is idempotent, releases every worker, and leaves no process or thread that
  keeps the interpreter alive.
"""

from __future__ import annotations

import abc
import functools
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

from papy._errors import PoolError
from papy._items import Failure, Key, failure_from_exception
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
        ``on_error="raise"``, like any other failure.
        """
        name = node or self.first_stage()
        values = []
        first: Failure | None = None
        fresh = 0
        for k, v in zip(self.keys, self.values):
            if type(v) is not Failure:
                v = failure_from_exception(name, k, exc, v, attempts)
                fresh += 1
                first = first or v
            values.append(v)
        stats = [
            StageStats(n_in=fresh, n_failed=fresh, first_failure=first)
            if s.name == name
            else StageStats()
            for s in self.spec.stages
        ]
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
        return Task(self.spec, self.keys, [None] * len(self)).fail_all(error, node)


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
    """Run tasks on some workers; the scheduler's only view of compute resources."""

    #: How many tasks can run at the same time.
    workers: int
    #: Whether a node on this pool should be fused with a following node on the same pool.
    fuses: bool = True
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
        """Run ``task`` and return a future of its result."""
        if not self._started or self._closed:
            self.start()
        return self._submit(task)

    def close(self) -> None:
        """Stop the workers; idempotent. Tasks not finished get a PoolError."""
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

        The default cancels the futures themselves, which is enough for any pool that
        calls ``future.set_running_or_notify_cancel()`` when a task starts and skips the
        task when that returns ``False`` (as :mod:`concurrent.futures` executors do).
        """
        return sum(1 for f in futures if f.cancel())

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
