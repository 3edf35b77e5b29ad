"""The driver's record of a DaskPool's tasks in flight, and which of them may be withdrawn."""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from papy._task import TaskResult
from papy.pools._base import Task


@dataclass(eq=False)
class Sent:
    """One Dask task in flight: part (or all) of the task behind the future ``out``.

    ``number`` names it on the workers (see :class:`papy.pools.dask.worker.StepCache`).
    """

    number: int
    task: Task
    done: Callable[[TaskResult], None]
    out: Future[TaskResult]
    dfut: Any = None
    #: set once the task's outcome was handed on (or it was withdrawn): later news is ignored
    finished: threading.Event = field(default_factory=threading.Event)


def withdrawable(
    asked: Iterable[Sent],
    live: Iterable[Sent],
    started: Collection[int],
    split: Collection[Future[TaskResult]],
) -> list[Sent]:
    """Return the Dask tasks to withdraw, of the parts ``asked`` about on the workers.

    A future's task is withdrawn whole or not at all: not if any part of it ``started``
    on a worker, if it was ``split`` (one part may already be delivered), or if its parts
    ``live`` now are not the ones asked about or one of them already finished. Call with
    the pool's lock held.
    """
    asked_numbers: dict[int, set[int]] = {}
    outs: dict[int, Future[TaskResult]] = {}
    for s in asked:
        asked_numbers.setdefault(id(s.out), set()).add(s.number)
        outs[id(s.out)] = s.out
    now: dict[int, list[Sent]] = {}
    for s in live:
        now.setdefault(id(s.out), []).append(s)
    chosen: list[Sent] = []
    for key, numbers in asked_numbers.items():
        current = now.get(key, [])
        if (
            any(n in started for n in numbers)
            or outs[key] in split
            or {s.number for s in current} != numbers
            or any(s.finished.is_set() for s in current)
        ):
            continue
        chosen.extend(current)
    return chosen


def marks(parts: Iterable[Sent]) -> Mapping[str, list[int]]:
    """Return the task numbers of ``parts`` by step id, as the workers' ``withdraw`` takes."""
    out: dict[str, list[int]] = {}
    for s in parts:
        out.setdefault(s.task.spec.id, []).append(s.number)
    return out
