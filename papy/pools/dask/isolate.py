"""Finding the node that kills Dask workers, once the item that does is alone.

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
from collections.abc import Callable

from papy._items import Failure
from papy._task import StageStats, StepSpec, TaskResult
from papy.pools._base import Task

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
