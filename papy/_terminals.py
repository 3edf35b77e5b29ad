"""Where items leave a run: terminals, the ordered output, and retirement.

An input position *retires* (frees its buffer slot) when every terminal finished it: a
top-level terminal when its one output arrived, a terminal below a scatter when every
sub-item did, the output ``map`` yields when the caller took it. :class:`Terminals` keeps
that count and the :class:`~papy._tables.ReorderBuffer`; the scheduler tells it what
arrived and reads ``retired``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

from papy._errors import ItemFailed
from papy._items import Failure, Key, position
from papy._plan import Plan, Terminal
from papy._report import FailureLog
from papy._tables import ReorderBuffer, TerminalTable


class Terminals:
    """Count what reached each terminal; file the output in order; retire positions.

    ``on_finish(terminal_name, position)`` is called when a terminal below a scatter
    finished a position (the journal marks it complete); ``on_retire(position)`` when a
    position left the run; ``on_failed(terminal_name, keys, values)`` when values with
    Failures arrived (the journal records those no worker recorded). All three are for journaled
    runs; without them the hot path makes no call per item.
    ``failed`` counts the input items of which a Failure reached a terminal (once each,
    however many sub-items or sinks it failed in); ``failure_log`` keeps the Failures for
    the report.
    """

    def __init__(
        self,
        plan: Plan,
        failure_log: FailureLog,
        on_finish: Callable[[str, int], None] | None = None,
        on_retire: Callable[[int], None] | None = None,
        on_failed: Callable[[str, Sequence[Key], list[Any]], None] | None = None,
    ) -> None:
        self.n = len(plan.terminals)
        output = plan.output
        self.out = ReorderBuffer(output is None or output.ordered)
        self._tables = {t.index: TerminalTable(t.is_output) for t in plan.terminals if t.stack}
        self._done_count: dict[int, int] = {}  # position -> terminals that finished it
        self._on_finish = on_finish
        self._on_retire = on_retire
        self._on_failed = on_failed
        self.failure_log = failure_log
        self._failed: set[int] = set()  # input positions with a Failure delivered
        self.retired = 0

    @property
    def failed(self) -> int:
        """Return how many input items had a Failure delivered so far."""
        return len(self._failed)

    @property
    def finishing(self) -> int:
        """Return how many positions some but not all terminals finished."""
        return len(self._done_count)

    def arrive(self, t: Terminal, keys: Sequence[Key], values: list[Any], dirty: bool) -> None:
        """Take outputs of terminal ``t`` (``dirty``: they may hold Failures)."""
        if dirty and Failure in set(map(type, values)):
            self._failed.update(position(v.item) for v in values if type(v) is Failure)
            self.failure_log.add(values)
            if self._on_failed is not None:  # the journal keeps the ones no worker recorded
                self._on_failed(t.node.name, keys, values)
        if t.top_level:
            if t.is_output:
                self.out.put(keys, values, keys)  # type: ignore[arg-type]
            else:
                for p in keys:
                    self.position_done(p)  # type: ignore[arg-type]
            return
        for p in self._tables[t.index].arrive(keys, values):
            self._finish(t, p)

    def expect(self, t: Terminal, p: int, n: int) -> None:
        """Learn that one pending item of position ``p`` scattered into ``n`` above ``t``."""
        if self._tables[t.index].expect(p, n):
            self._finish(t, p)

    def replayed_failures(self, failures: list[Failure]) -> None:
        """Count the Failures terminals recorded for an item an earlier run finished."""
        if failures:
            self._failed.update(position(f.item) for f in failures)
            self.failure_log.add(failures, replayed=True)

    def replay(self, p: int, keys: list[Key], values: list[Any]) -> None:
        """File the recorded outputs of position ``p``, which an earlier run finished.

        Every other terminal finished it then, so they count as done now.
        """
        self._failed.update(position(v.item) for v in values if type(v) is Failure)
        self.failure_log.add(values, replayed=True)
        for _ in range(self.n - 1):
            self.position_done(p)
        self.out.put(keys, values, [p])

    def delivered(self, positions: Sequence[int]) -> None:
        """Count positions whose outputs the caller took."""
        if self.n == 1:
            self.retired += len(positions)
            if self._on_retire is not None:
                for p in positions:
                    self._on_retire(p)
        else:
            for p in positions:
                self.position_done(p)

    def position_done(self, p: int) -> None:
        """Count one terminal as finished with position ``p``; retire it after the last."""
        if self.n > 1:
            c = self._done_count.get(p, 0) + 1
            if c < self.n:
                self._done_count[p] = c
                return
            del self._done_count[p]
        self.retired += 1
        if self._on_retire is not None:
            self._on_retire(p)

    def skip(self) -> None:
        """Retire a position an earlier run finished, when no output is yielded."""
        self.retired += 1

    def _finish(self, t: Terminal, p: int) -> None:
        keys, values = self._tables[t.index].finish(p)
        if self._on_finish is not None:
            self._on_finish(t.node.name, p)
        if t.is_output:
            self.out.put(keys, values, [p])
        else:
            self.position_done(p)


def deliver(values: list[Any], errors: str) -> Iterator[Any]:
    """Yield outputs for the caller; a Failure raises ItemFailed, is yielded, or is skipped.

    ``errors`` is ``Pipeline.map``'s: ``"raise"``, ``"yield"`` or ``"skip"``.
    """
    for v in values:
        if type(v) is Failure:
            if errors == "raise":
                raise ItemFailed(v)
            if errors == "yield":
                yield v
        else:
            yield v
