"""Observers: things that watch a run without touching the scheduler's state.

The scheduler calls these hooks from its own thread; an observer may read what
:class:`RunView` lists (counters, ``stats``, ``in_flight()``, ``pool_load()``) but never
changes it. The progress display and the timeline of the HTML report are observers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from papy._items import Key
    from papy._plan import Step
    from papy._report import NodeStats, Report


class RunView(Protocol):
    """What an observer may read of a running scheduler (``papy._scheduler.Scheduler``)."""

    #: per node name: items in and out, failures, busy and waiting seconds
    stats: dict[str, NodeStats]
    #: the run's report, set before ``finished`` is called (None while running)
    report: Report | None

    @property
    def admitted(self) -> int:
        """Input items admitted so far."""
        ...

    @property
    def retired(self) -> int:
        """Input items that left the run (all their outputs delivered)."""
        ...

    @property
    def failed(self) -> int:
        """Failures that reached a terminal."""
        ...

    @property
    def name(self) -> str:
        """The pipeline's name."""
        ...

    def in_flight(self) -> dict[str, int]:
        """Per node name: items waiting for it or inside its tasks."""
        ...

    def pool_load(self) -> dict[str, tuple[int, int]]:
        """Per pool label: (tasks in flight, workers)."""
        ...


class Observer:
    """Base class with no-op hooks; override what you need."""

    def started(self, sched: RunView) -> None:
        """Call when the run has set up its steps and pools."""

    def admitted(self, keys: Sequence[Key], values: list[Any]) -> None:
        """Call when input items enter the run."""

    def completed(self, step: Step, keys: Sequence[Key], values: list[Any]) -> None:
        """Call when a task of ``step`` finished (outputs by key)."""

    def tick(self, sched: RunView) -> None:
        """Call once per scheduler loop turn (cheap: sample, do not compute)."""

    def finished(self, sched: RunView, error: BaseException | None) -> None:
        """Call when the run ends, normally (error is None) or not."""


class Timeline(Observer):
    """Sample how many items each node has in flight, for the HTML report's plot."""

    def __init__(self, interval: float = 0.05, limit: int = 5_000) -> None:
        self.interval = interval
        self.limit = limit
        self.samples: list[dict[str, Any]] = []
        self._t0 = 0.0
        self._next = 0.0

    def started(self, sched: RunView) -> None:
        self._t0 = time.perf_counter()
        self._next = 0.0
        self.tick(sched, force=True)

    def tick(self, sched: RunView, force: bool = False) -> None:
        now = time.perf_counter() - self._t0
        if not force and now < self._next:
            return
        if len(self.samples) >= self.limit:
            # Keep the whole run in view: drop every other sample and sample half as often.
            self.samples = self.samples[::2]
            self.interval *= 2
        self._next = now + self.interval
        self.samples.append({"t": round(now, 4), **sched.in_flight()})

    def finished(self, sched: RunView, error: BaseException | None) -> None:
        self.tick(sched, force=True)


class RunLog(Observer):
    """Log on the ``papy`` logger how a run ended (and, with ``profile``, the driver's time)."""

    def __init__(self, profile: bool = False) -> None:
        self.profile = profile

    def finished(self, sched: RunView, error: BaseException | None) -> None:
        log = logging.getLogger("papy")
        report = sched.report
        if report is None:
            return
        if self.profile:
            spent = ", ".join(f"{k} {v:.3f} s" for k, v in report.driver.items())
            log.info("driver time of %r: %s", sched.name, spent)
        if error is None:
            log.info(
                "run of %r finished: %d items, %d failed, %d from the journal, %.2f s",
                sched.name,
                report.items,
                report.failed,
                report.skipped,
                report.wall_s,
            )
        else:
            log.warning("run of %r stopped: %s", sched.name, type(error).__name__)
