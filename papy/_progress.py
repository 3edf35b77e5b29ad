"""Live progress on the terminal: one row per node, drawn by rich.

The display is an :class:`~papy._observe.Observer`: rich refreshes it from its own thread
and it only reads the scheduler's counters. It is on by default when stderr is a terminal
or the code runs in a Jupyter notebook, and off otherwise (logs and pipes stay clean). In a
notebook the table is a rich display (HTML) in the cell's output, updated in place.

``items/s`` is a rate over a sliding window of the last few seconds. A node that is still
moving but finished nothing within the window shows its rate since its last completion
(decaying, never 0); 0 means the node has not finished an item yet.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from papy._observe import Observer, RunView

if TYPE_CHECKING:
    from rich.console import Console


#: seconds of history the ``items/s`` column averages over
RATE_WINDOW_S = 5.0


def in_jupyter() -> bool:
    """Tell whether this code runs in a Jupyter kernel (notebook, lab, qtconsole)."""
    ipython = sys.modules.get("IPython")
    if ipython is None:
        return False
    try:
        shell = ipython.get_ipython()
    except Exception:
        return False
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def progress_wanted(progress: bool | None) -> bool:
    """Decide whether to show progress: explicit choice, else on a terminal or notebook."""
    if progress is not None:
        return progress
    if in_jupyter():
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class SlidingRate:
    """Items per second of one counter over the last ``window`` seconds.

    ``rate(done, now)`` is called with the counter's current value. Within the window the
    rate is (change over the window) / (window length). When nothing changed within the
    window but the counter moved before, the window stretches back to the last change, so
    the rate decays smoothly instead of dropping to 0 between slow items.
    """

    def __init__(self, t0: float, window: float = RATE_WINDOW_S) -> None:
        self.window = window
        self.t0 = t0
        # (time, value) at each change, oldest first; kept to about one window
        self.changes: deque[tuple[float, int]] = deque([(t0, 0)])

    def rate(self, done: int, now: float) -> float:
        changes = self.changes
        if done != changes[-1][1]:
            changes.append((now, done))
        # Drop changes older than the window, keeping the last one before it as a base.
        while len(changes) > 2 and changes[1][0] <= now - self.window:
            changes.popleft()
        if done == 0:
            return 0.0
        base_t, base_n = changes[0]
        base_done = float(base_n)
        start = max(base_t, now - self.window)
        if base_t < start and len(changes) > 1:
            # Interpolate the counter at the window's start between base and next change.
            next_t, next_done = changes[1]
            frac = min(1.0, (start - base_t) / (next_t - base_t)) if next_t > base_t else 1.0
            base_done = base_done + (next_done - base_done) * frac
        elif base_t < start:
            start = base_t  # nothing changed within the window: since the last change
        moved = done - base_done
        if moved <= 0:  # stretch back to the change before the last one
            prev_t, prev_done = changes[-2] if len(changes) > 1 else (self.t0, 0)
            start, moved = prev_t, done - prev_done
        span = max(now - start, 1e-6)
        return moved / span


class Progress(Observer):
    """Show done / in flight / failed, items/s and pool load per node while a run goes."""

    def __init__(self, console: Console | None = None, refresh_per_second: float = 4) -> None:
        self._console = console
        self._refresh = refresh_per_second
        self._live: Any = None
        self._sched: RunView | None = None
        self._rates: dict[str, SlidingRate] = {}
        self._t0 = 0.0
        self._jupyter: Any = None  # the notebook's display handle
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def started(self, sched: RunView) -> None:
        from rich.console import Console
        from rich.live import Live

        self._sched = sched
        self._t0 = time.perf_counter()
        self._rates = {}
        if self._console is None and in_jupyter():
            self._start_notebook()
            return
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

    def _start_notebook(self) -> None:
        """Show the table as a display in the notebook cell; a thread updates it in place."""
        from IPython.display import display

        self._jupyter = display(self._render(), display_id=True)
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._notebook_loop, name="papy-progress", daemon=True
        )
        self._thread.start()

    def _notebook_loop(self) -> None:
        while not self._stop.wait(1 / self._refresh):
            try:
                self._jupyter.update(self._render())
            except Exception:  # a closed kernel channel must not break the run
                return

    def finished(self, sched: RunView, error: BaseException | None) -> None:
        if self._live is not None:
            self._live.refresh()
            self._live.stop()
            self._live = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None
        if self._jupyter is not None:
            self._jupyter.update(self._render())
            self._jupyter = None

    def _rate(self, name: str, done: int, now: float) -> float:
        rate = self._rates.get(name)
        if rate is None:
            rate = self._rates[name] = SlidingRate(self._t0)
        return rate.rate(done, now)

    def _render(self) -> Any:
        from rich.table import Table

        sched = self._sched
        table = Table(title=f"papy: {sched.name if sched else ''}", expand=False)
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
                _rate_text(self._rate(name, s.items_in, now)),
                f"{busy}/{workers}",
            )
        elapsed = now - self._t0
        table.caption = (
            f"{sched.admitted:,} items in, {sched.retired:,} done, {sched.failed:,} failed, "
            f"{elapsed:.1f} s"
        )
        return table


def _rate_text(rate: float) -> str:
    """Format items/s so that a slow but moving node never reads 0."""
    if rate >= 10 or rate == 0:
        return f"{rate:,.0f}"
    if rate >= 0.1:
        return f"{rate:.1f}"
    return f"{rate:.2g}"
