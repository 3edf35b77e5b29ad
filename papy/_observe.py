"""Observers: things that watch a run without touching the scheduler's state.

The scheduler calls these hooks from its own thread; an observer may read the public
counters (``sched.stats``, ``sched.pool_load()``) but never changes them. The progress
display, the timeline of the HTML report and the journal are observers.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from papy._graph import Step
    from papy._items import Key
    from papy._scheduler import Scheduler


class Observer:
    """Base class with no-op hooks; override what you need."""

    def started(self, sched: Scheduler) -> None:
        """Call when the run has set up its steps and pools."""

    def admitted(self, keys: Sequence[Key], values: list[Any]) -> None:
        """Call when input items enter the run."""

    def completed(self, step: Step, keys: Sequence[Key], values: list[Any]) -> None:
        """Call when a task of ``step`` finished (outputs by key)."""

    def tick(self, sched: Scheduler) -> None:
        """Call once per scheduler loop turn (cheap: sample, do not compute)."""

    def finished(self, sched: Scheduler, error: BaseException | None) -> None:
        """Call when the run ends, normally (error is None) or not."""


class Timeline(Observer):
    """Sample how many items each node has in flight, for the HTML report's plot."""

    def __init__(self, interval: float = 0.05, limit: int = 5_000) -> None:
        self.interval = interval
        self.limit = limit
        self.samples: list[dict[str, Any]] = []
        self._t0 = 0.0
        self._next = 0.0

    def started(self, sched: Scheduler) -> None:
        self._t0 = time.perf_counter()
        self._next = 0.0
        self.tick(sched, force=True)

    def tick(self, sched: Scheduler, force: bool = False) -> None:
        now = time.perf_counter() - self._t0
        if not force and now < self._next:
            return
        if len(self.samples) >= self.limit:
            # Keep the whole run in view: drop every other sample and sample half as often.
            self.samples = self.samples[::2]
            self.interval *= 2
        self._next = now + self.interval
        self.samples.append({"t": round(now, 4), **sched.in_flight()})

    def finished(self, sched: Scheduler, error: BaseException | None) -> None:
        self.tick(sched, force=True)
