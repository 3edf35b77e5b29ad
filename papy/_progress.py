"""Live progress on the terminal: one row per node, drawn by rich.

The display is an :class:`~papy._observe.Observer`: rich refreshes it from its own thread
and it only reads the scheduler's counters. It is on by default when stderr is a terminal
and off otherwise (logs, pipes, notebooks stay clean).
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

from papy._observe import Observer

if TYPE_CHECKING:
    from rich.console import Console

    from papy._scheduler import Scheduler


def progress_wanted(progress: bool | None) -> bool:
    """Decide whether to show progress: explicit choice, else only on a terminal."""
    if progress is not None:
        return progress
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class Progress(Observer):
    """Show done / in flight / failed, items/s and pool load per node while a run goes."""

    def __init__(self, console: Console | None = None, refresh_per_second: float = 4) -> None:
        self._console = console
        self._refresh = refresh_per_second
        self._live: Any = None
        self._sched: Scheduler | None = None
        self._rates: dict[str, tuple[float, int, float]] = {}
        self._t0 = 0.0

    def started(self, sched: Scheduler) -> None:
        from rich.console import Console
        from rich.live import Live

        self._sched = sched
        self._t0 = time.perf_counter()
        console = self._console or Console(stderr=True)
        self._live = Live(
            get_renderable=self._render,
            console=console,
            refresh_per_second=self._refresh,
            transient=False,
            redirect_stdout=True,
            redirect_stderr=False,
        )
        self._live.start()

    def finished(self, sched: Scheduler, error: BaseException | None) -> None:
        if self._live is not None:
            self._live.refresh()
            self._live.stop()
            self._live = None

    def _rate(self, name: str, done: int, now: float) -> float:
        last_t, last_done, rate = self._rates.get(name, (self._t0, 0, 0.0))
        if now - last_t >= 0.5:
            rate = (done - last_done) / (now - last_t)
            self._rates[name] = (now, done, rate)
        elif name not in self._rates:
            self._rates[name] = (last_t, last_done, rate)
        return rate

    def _render(self) -> Any:
        from rich.table import Table

        sched = self._sched
        table = Table(title=f"papy: {sched.pipeline.name if sched else ''}", expand=False)
        for col in ("node", "pool", "done", "in flight", "failed", "items/s", "pool busy"):
            table.add_column(col, justify="left" if col in ("node", "pool") else "right")
        if sched is None:
            return table
        now = time.perf_counter()
        load = sched.pool_load()
        flight = sched.in_flight()
        for name, s in list(sched.stats.items()):
            busy, workers = load.get(s.pool, (0, 1))
            table.add_row(
                name,
                s.pool,
                f"{s.items_in:,}",
                f"{flight.get(name, 0):,}",
                f"[red]{s.failed:,}[/red]" if s.failed else "0",
                f"{self._rate(name, s.items_in, now):,.0f}",
                f"{busy}/{workers}",
            )
        elapsed = now - self._t0
        table.caption = (
            f"{sched.admitted:,} items in, {sched.retired:,} done, {sched.failed:,} failed, "
            f"{elapsed:.1f} s"
        )
        return table
