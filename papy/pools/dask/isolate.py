"""Finding the item, then the node, that kills Dask workers.

Dask fails a task with ``KilledWorker`` once the workers it was *assigned to* died a few
times (the scheduler's ``allowed-failures``), whether it was running or only queued there
behind the task that killed them. So a one-item task failed that way is a suspect, not a
culprit: it runs again alone, and only a second ``KilledWorker`` makes it a crash.
Suspects are confirmed one at a time (:class:`Suspects`), so an innocent item's second
chance never waits on a worker behind another suspect.

A Dask worker that dies leaves no trace of which of a fused task's nodes was running (a
:class:`~papy.ProcessPool` reads it from its worker's slot). So a one-item task that keeps
killing workers is run again one node at a time: its first node alone, then the rest on
that node's output, and so on down, until the task that kills is a single node. Its
Failure then names that node and shows the item's input to it. Steps that record to a
journal, or that run a scatter group, are not split (their records and sub-items follow
the whole step): their Failure names the step's first node.
"""

from __future__ import annotations

import dataclasses
import threading
from collections import deque
from collections.abc import Callable

from papy._errors import WorkerCrashed
from papy._items import Failure
from papy._task import StageStats, StepSpec, TaskResult
from papy.pools._base import Task, merge_parts

#: a derived step's id: the step's id, this, and the stage range
SEPARATOR = "/stages"

Send = Callable[[Task, Callable[[TaskResult], None]], None]


def splittable(task: Task) -> bool:
    """Tell whether a one-item task can run one node at a time (see the module docstring)."""
    spec = task.spec
    return len(task) == 1 and len(spec.stages) > 1 and spec.journal is None and spec.group is None


def part(spec: StepSpec, start: int, stop: int) -> StepSpec:
    """Return the step of ``spec``'s stages ``start:stop`` (its own id, derived)."""
    return dataclasses.replace(
        spec, id=f"{spec.id}{SEPARATOR}{start}:{stop}", stages=spec.stages[start:stop]
    )


def derived_from(spec_id: str, ids: set[str]) -> bool:
    """Tell whether ``spec_id`` was derived (by :func:`part`) from one of ``ids``."""
    return SEPARATOR in spec_id and spec_id.split(SEPARATOR, 1)[0] in ids


def node_by_node(task: Task, send: Send, done: Callable[[TaskResult], None]) -> None:
    """Run ``task`` (one item, see :func:`splittable`) as its first node, then the rest.

    ``send(task, on_done)`` submits a task as the pool does; ``done`` gets one result with
    one statistics entry per stage of ``task``, as if it had run whole.
    """
    spec = task.spec
    head, tail = part(spec, 0, 1), part(spec, 1, len(spec.stages))

    def after_head(first: TaskResult) -> None:
        if type(first.values[0]) is Failure:  # the rest pass the Failure on
            rest = [StageStats(n_in=1) for _ in tail.stages]
            done(TaskResult(first.values, first.stats + rest, first.crashes, dirty=True))
            return

        def after_tail(second: TaskResult) -> None:
            crashes = first.crashes + second.crashes
            done(TaskResult(second.values, first.stats + second.stats, crashes, dirty=True))

        limit = tail.stages[0].timeout  # the rest's first node's, as the scheduler sets it
        send(Task(tail, task.keys, first.values, limit, task.jkeys, False), after_tail)

    send(Task(head, task.keys, task.values, task.timeout, task.jkeys, task.dirty), after_head)


class Confirming:
    """The completion callback of a suspect's second run (and of its parts, node by node).

    A ``KilledWorker`` reaching a task whose callback is one of these is final. ``release``
    (the suspect's own run only) lets the next suspect go once the outcome is handed on.
    """

    __slots__ = ("done", "release")

    def __init__(
        self, done: Callable[[TaskResult], None], release: Callable[[], None] | None = None
    ) -> None:
        self.done = done
        self.release = release

    def __call__(self, result: TaskResult) -> None:
        release, self.release = self.release, None
        try:
            self.done(result)
        finally:
            if release is not None:
                release()


class Suspects:
    """One-item tasks failed with ``KilledWorker``, run again one at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: deque[Callable[[Callable[[], None]], None]] = deque()
        self._busy = False

    def confirm(self, run: Callable[[Callable[[], None]], None]) -> None:
        """Call ``run(release)`` once no other suspect is running; ``run`` must see that
        ``release()`` is called once its outcome is known (a :class:`Confirming` does)."""
        with self._lock:
            if self._busy:
                self._waiting.append(run)
                return
            self._busy = True
        self._start(run)

    def _start(self, run: Callable[[Callable[[], None]], None]) -> None:
        def release() -> None:
            with self._lock:
                following = self._waiting.popleft() if self._waiting else None
                self._busy = following is not None
            if following is not None:
                self._start(following)

        run(release)

    def reset(self) -> None:
        """Forget every suspect (a run ended: its tasks were answered or withdrawn)."""
        with self._lock:
            self._waiting.clear()
            self._busy = False


def killed(
    task: Task,
    done: Callable[[TaskResult], None],
    exc: BaseException,
    send: Send,
    split: Callable[[], None],
    suspects: Suspects,
) -> None:
    """Answer Dask's ``KilledWorker`` for ``task``: halve it, confirm it, or fail its item.

    A task of several items is halved (``split()`` first: its parts answer apart); a
    one-item task runs again alone as a suspect (see the module docstring); a confirmed
    one runs node by node if it has several nodes, else its item fails with WorkerCrashed.
    """
    n = len(task)
    if n > 1:
        split()
        for part, on_done in zip(
            (task.slice(0, n // 2), task.slice(n // 2, n)), merge_parts(2, done)
        ):
            send(part, on_done)
    elif not isinstance(done, Confirming):  # perhaps it was only queued on those workers
        suspects.confirm(lambda release: send(task, Confirming(done, release)))
    elif splittable(task):  # which of its nodes kills them?
        split()
        node_by_node(task, lambda t, d: send(t, Confirming(d)), done)
    else:
        message = f"Dask workers died running this item ({exc}); it was tried on several workers"
        done(task.fail_all(WorkerCrashed(message)))
