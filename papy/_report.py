"""Per-node statistics of a run, the bottleneck, and the Report that shows them.

The scheduler owns a :class:`NodeStats` per node and updates it as tasks complete; when the
run ends it freezes them into a :class:`Report`. Times per item are measured once per
batch inside the worker (batch time / batch size), so measuring costs nothing per item;
``p95_item_s`` is the 95th percentile of those per-batch means.
"""

from __future__ import annotations

import json
import shutil
import statistics
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from papy._items import Failure, FrameResolver, Key

#: how many Failure objects a Report keeps (every failure is counted in its group)
FAILURES_KEPT = 100

#: what "util" means, wherever it is shown (table, bottleneck sentence, HTML report)
UTIL_MEANING = "util: the node's busy time / (wall time x workers of its pool)"


@dataclass
class NodeStats:
    """Counters of one node, updated by the scheduler during a run."""

    name: str
    pool: str = ""
    items_in: int = 0
    items_out: int = 0
    failed: int = 0
    busy_s: float = 0.0
    tasks: int = 0
    batch_item_s: list[float] = field(default_factory=list)
    wait_input_s: float = 0.0
    wait_room_s: float = 0.0
    wait_pool_s: float = 0.0
    #: failed items per exception type (they add up to ``failed``)
    failed_by_type: dict[str, int] = field(default_factory=dict)
    #: the first Failure of each exception type seen (when it could travel)
    first_by_type: dict[str, Failure] = field(default_factory=dict)

    def record(
        self,
        n_in: int,
        n_failed: int,
        busy: float,
        by_type: dict[str, int] | None = None,
        firsts: dict[str, Failure] | None = None,
    ) -> None:
        """Add one finished task's figures (``by_type``: its failures per exception type,
        ``firsts``: the first Failure of each)."""
        self.items_in += n_in
        self.failed += n_failed
        for exc, n in (by_type or {}).items():
            self.failed_by_type[exc] = self.failed_by_type.get(exc, 0) + n
        for exc, f in (firsts or {}).items():
            self.first_by_type.setdefault(exc, f)
        self.busy_s += busy
        self.tasks += 1
        if n_in and len(self.batch_item_s) < 100_000:
            self.batch_item_s.append(busy / n_in)


def driver_time(profile: dict[str, float], pools: Sequence[object]) -> dict[str, float]:
    """Return the driver's seconds per activity, with the pools' pickling threads' time.

    ``profile`` is the scheduler's (admit, dispatch, wait, route, deliver); a pool with a
    ``codec_seconds()`` method (the process pool) adds its ``pickle``/``unpickle`` time.
    """
    out = dict(profile)
    for pool in pools:
        for name, seconds in getattr(pool, "codec_seconds", dict)().items():
            out[name] = out.get(name, 0.0) + seconds
    return out


class FailureLog:
    """Keep the first :data:`FAILURES_KEPT` failures that reached the run's sinks, and the
    first of each (node, exception type); count those replayed from a journal.

    A failure reaching several sinks is one failure (it is recognised by node and item).
    How many items failed where is counted by the scheduler (``NodeStats``), since a
    gather folds its failed sub-items into one and a sink sees only that one.
    """

    def __init__(self, fns: Iterable[Any] = (), limit: int = FAILURES_KEPT) -> None:
        self.limit = limit
        self.first: list[Failure] = []
        #: failures an earlier run recorded and this one replayed from the journal, per
        #: node and exception type (this run's own are counted per node by the scheduler)
        self.replayed: dict[str, dict[str, int]] = {}
        self._seen: set[tuple[str, Key]] = set()
        #: the first failure of each (node, exception type), kept even past ``limit``
        self.group_first: dict[tuple[str, str], Failure] = {}
        self._fns = list(fns)
        self._resolver: FrameResolver | None = None

    def resolve(self, f: Failure) -> Failure:
        """Return ``f`` with the file names its traceback lost in transit put back."""
        if "<dynamic-code>" not in f.traceback:
            return f
        if self._resolver is None:
            self._resolver = FrameResolver(self._fns)
        return self._resolver.fix_failure(f)

    def add(self, values: list[Any], replayed: bool = False) -> None:
        """Record the Failure values among ``values`` (other values are ignored);
        ``replayed``: they come from the journal of an earlier run.

        Failures whose traceback lost its file names in transit (functions shipped by
        value) are replaced, in ``values``, by copies that name them again.
        """
        for i, v in enumerate(values):
            if type(v) is not Failure:
                continue
            if "<dynamic-code>" in v.traceback:
                v = values[i] = self.resolve(v)
            ident = (v.node, v.item)
            if ident in self._seen:
                continue
            self._seen.add(ident)
            if replayed:
                per_node = self.replayed.setdefault(v.node, {})
                per_node[v.exc_type] = per_node.get(v.exc_type, 0) + 1
            self.group_first.setdefault((v.node, v.exc_type), v)
            if len(self.first) < self.limit:
                self.first.append(v)


@dataclass(frozen=True)
class NodeReport:
    """What one node did in a run."""

    name: str
    pool: str
    items_in: int
    items_out: int
    failed: int
    busy_s: float
    tasks: int
    mean_item_s: float
    p95_item_s: float
    throughput: float  # items per second of wall time
    wait_input_s: float  # idle: nothing to do, upstream has not delivered yet
    wait_room_s: float  # a source held back: the buffer is full, downstream must drain
    wait_pool_s: float  # items ready, waiting for a free worker of the node's pool
    utilization: float  # busy seconds / (wall seconds * pool workers)


@dataclass(frozen=True)
class Report:
    """Per-node counts and timings of a run, with the bottleneck named."""

    pipeline: str
    wall_s: float
    #: input items the run read
    items: int
    #: input items of which a Failure reached a sink (once each, however many of its
    #: sub-items or sinks failed); ``failure_counts`` counts failures per node
    failed: int
    nodes: dict[str, NodeReport]
    bottleneck: str | None
    suggestion: str
    timeline: list[dict[str, Any]] = field(default_factory=list, compare=False, repr=False)
    #: input items a journal showed finished in an earlier run (not run again)
    skipped: int = 0
    #: where the driver's time went (seconds): admit, dispatch, wait, route, deliver (this
    #: one includes the caller's loop), and the pools' pickling threads (pickle, unpickle)
    driver: dict[str, float] = field(default_factory=dict, compare=False)
    #: whether table() shows the driver's time (``profile=True``)
    show_driver: bool = field(default=False, compare=False, repr=False)
    #: the first 100 items to fail in the run (by time), ordered by item key
    failures: list[Failure] = field(default_factory=list, compare=False, repr=False)
    #: how many items failed, per node and exception type: ``{node: {exc_type: count}}``;
    #: a node's counts add up to ``nodes[node].failed`` (plus failures replayed from a
    #: journal), sub-items a gather folded into one included
    failure_counts: dict[str, dict[str, int]] = field(
        default_factory=dict, compare=False, repr=False
    )
    #: the first failure of each (node, exception type) group, in the order they failed
    group_failures: list[Failure] = field(default_factory=list, compare=False, repr=False)

    def failure_groups(self) -> list[tuple[str, str, int, Failure | None]]:
        """Return ``(node, exc_type, count, first failure)`` per group, largest first."""
        first: dict[tuple[str, str], Failure] = {}
        for f in [*self.group_failures, *self.failures]:
            first.setdefault((f.node, f.exc_type), f)
        groups = [
            (node, exc, count, first.get((node, exc)))
            for node, per in self.failure_counts.items()
            for exc, count in per.items()
        ]
        groups.sort(key=lambda g: -g[2])
        return groups

    #: nodes whose journal records no longer held (their code or inputs changed), and why
    changed: dict[str, str] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Return the report as plain data (failures as dicts, see ``Failure.to_dict``)."""
        d = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("nodes", "failures", "group_failures")
        }
        d = json.loads(json.dumps(d, default=str))  # a deep, plain copy
        d["nodes"] = {k: asdict(v) for k, v in self.nodes.items()}
        d["failures"] = [f.to_dict() for f in self.failures]
        d["failure_groups"] = [
            {
                "node": node,
                "exc_type": exc,
                "count": count,
                "first": first.to_dict() if first is not None else None,
            }
            for node, exc, count, first in self.failure_groups()
        ]
        return d

    def to_json(self, **kwargs: Any) -> str:
        """Return the report as JSON text."""
        return json.dumps(self.to_dict(), **kwargs)

    def table(self, width: int | None = None) -> str:
        """Return a plain-text table, one row per node, then the summary, in ``width`` columns.

        ``width`` defaults to the terminal's (80 when there is none). Columns that do not
        fit are left out, least useful first (the waits, p95, busy s, pool), and named
        under the table; sentences wrap. ``to_dict()`` and the HTML report have them all.
        """
        if width is None:
            width = shutil.get_terminal_size((80, 24)).columns
        width = max(40, width)
        head = (
            "node",
            "pool",
            "in",
            "out",
            "failed",
            "busy s",
            "mean ms",
            "p95 ms",
            "items/s",
            "util",
            "wait in s",
            "wait room s",
            "wait pool s",
        )
        rows = [head]
        for n in self.nodes.values():
            rows.append(
                (
                    n.name + (" *" if n.name == self.bottleneck else ""),
                    n.pool,
                    f"{n.items_in:,}",
                    f"{n.items_out:,}",
                    f"{n.failed:,}",
                    f"{n.busy_s:.2f}",
                    f"{n.mean_item_s * 1e3:.2f}",
                    f"{n.p95_item_s * 1e3:.2f}",
                    f"{n.throughput:,.0f}",
                    f"{n.utilization:.0%}",
                    f"{n.wait_input_s:.2f}",
                    f"{n.wait_room_s:.2f}",
                    f"{n.wait_pool_s:.2f}",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        keep = list(range(len(head)))
        dropped: list[str] = []
        # Least useful first: drop until the table fits.
        for i in (11, 12, 10, 7, 5, 3, 1, 8):
            if sum(widths[j] for j in keep) + 2 * (len(keep) - 1) <= width:
                break
            keep.remove(i)
            dropped.append(head[i])
        room = width - sum(widths[j] for j in keep if j) - 2 * (len(keep) - 1)
        if widths[0] > room:  # still too wide: cut long node names
            widths[0] = max(8, room)
        lines = []
        for r in rows:
            cells = []
            for j in keep:
                c = r[j]
                if j == 0 and len(c) > widths[0]:
                    c = c[: widths[0] - 1] + "~"
                cells.append(c.ljust(widths[j]) if j < 2 else c.rjust(widths[j]))
            lines.append("  ".join(cells).rstrip())
        lines.insert(1, "  ".join("-" * widths[j] for j in keep))
        summary = (
            f"{self.pipeline}: {self.items:,} items in {self.wall_s:.2f} s "
            f"({self.items / self.wall_s if self.wall_s else 0:,.0f} items/s), "
            f"{self.failed:,} failed"
            + (f", {self.skipped:,} finished earlier (journal)" if self.skipped else "")
        )
        notes = []
        if self.bottleneck is not None:
            notes.append("* bottleneck. " + UTIL_MEANING)
        if dropped:
            notes.append(f"not shown for width: {', '.join(dropped)} (see Report.to_dict())")
        tail = [summary] + ([self.suggestion] if self.suggestion else [])
        tail += [f"journal: node {k!r}: {v}; recomputed" for k, v in self.changed.items()]
        if self.driver and self.show_driver:
            tail.append(
                "driver time: " + ", ".join(f"{k} {v:.3f} s" for k, v in self.driver.items())
            )
        wrapped = [
            line
            for text in [*notes, "", *tail]
            for line in (textwrap.wrap(text, width, break_on_hyphens=False) or [""])
        ]
        return "\n".join([*lines, *wrapped])

    def __str__(self) -> str:
        return self.table()


def build_report(
    pipeline: str,
    wall_s: float,
    items: int,
    failed: int,
    stats: dict[str, NodeStats],
    workers: dict[str, int],
    timeline: list[dict[str, Any]] | None = None,
    skipped: int = 0,
    driver: dict[str, float] | None = None,
    show_driver: bool = False,
    failures: FailureLog | None = None,
) -> Report:
    """Freeze the scheduler's counters into a Report and name the bottleneck."""
    nodes: dict[str, NodeReport] = {}
    for name, s in stats.items():
        mean = s.busy_s / s.items_in if s.items_in else 0.0
        p95 = _percentile(s.batch_item_s, 0.95) if s.batch_item_s else 0.0
        w = max(1, workers.get(name, 1))
        nodes[name] = NodeReport(
            name=name,
            pool=s.pool,
            items_in=s.items_in,
            items_out=s.items_out,
            failed=s.failed,
            busy_s=s.busy_s,
            tasks=s.tasks,
            mean_item_s=mean,
            p95_item_s=p95,
            throughput=s.items_in / wall_s if wall_s > 0 else 0.0,
            wait_input_s=s.wait_input_s,
            wait_room_s=s.wait_room_s,
            wait_pool_s=s.wait_pool_s,
            utilization=min(1.0, s.busy_s / (wall_s * w)) if wall_s > 0 else 0.0,
        )
    bottleneck, suggestion = _bottleneck(nodes, workers)
    if items and failed >= items:
        suggestion = ""  # nothing succeeded: speed is not the question
    log = failures or FailureLog()
    return Report(
        pipeline,
        wall_s,
        items,
        failed,
        nodes,
        bottleneck,
        suggestion,
        timeline or [],
        skipped,
        driver or {},
        show_driver,
        sorted(log.first, key=_by_item),
        failure_counts(stats, log.replayed),
        first_failures(stats, log),
    )


def failure_counts(
    stats: dict[str, NodeStats], replayed: dict[str, dict[str, int]]
) -> dict[str, dict[str, int]]:
    """Return failed items per node and exception type: where they failed in this run
    (sub-items a gather later folded into one included), plus those replayed from the
    journal. A node's counts add up to its ``failed`` (replayed ones aside)."""
    counts = {name: dict(s.failed_by_type) for name, s in stats.items() if s.failed_by_type}
    for node, per in replayed.items():
        mine = counts.setdefault(node, {})
        for exc, n in per.items():
            mine[exc] = mine.get(exc, 0) + n
    return counts


def first_failures(stats: dict[str, NodeStats], log: FailureLog) -> list[Failure]:
    """Return the first Failure of each (node, exception type): the one that reached a
    sink first, else the first the node made (a gather or a join may have kept another
    of the item's Failures)."""
    out = dict(log.group_first)
    for name, s in stats.items():
        for exc, f in s.first_by_type.items():
            if (name, exc) not in out:
                out[(name, exc)] = log.resolve(f)
    return list(out.values())


def _by_item(f: Failure) -> tuple[int, ...]:
    return f.item if isinstance(f.item, tuple) else (f.item,)


def _percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1]


def _bottleneck(nodes: dict[str, NodeReport], workers: dict[str, int]) -> tuple[str | None, str]:
    """Name the node that limits throughput: most busy time per worker it can use."""
    best, load = None, 0.0
    for name, n in nodes.items():
        per_worker = n.busy_s / max(1, workers.get(name, 1))
        if per_worker > load:
            best, load = name, per_worker
    if best is None or load <= 0:
        return None, ""
    n = nodes[best]
    pool_busy = sum(m.utilization for m in nodes.values() if m.pool == n.pool)
    # "util" is a node's busy time / (wall time x workers of its pool), as in the table;
    # the nodes sharing a pool add up to that pool's util.
    together = pool_busy > n.utilization + 0.005
    shared = f", util {pool_busy:.0%} with the other nodes of its pool" if together else ""
    if pool_busy < 0.5:
        return best, (
            f"node {best!r} is the busiest (util {n.utilization:.0%}, "
            f"{n.mean_item_s * 1e3:.2f} ms per item), but the nodes of its pool together "
            f"reach only util {pool_busy:.0%}: the run waits on its input or on per-item "
            "overhead; try larger batches, fewer and larger items, or a faster source"
        )
    return best, (
        f"node {best!r} limits throughput (util {n.utilization:.0%}{shared}, "
        f"{n.mean_item_s * 1e3:.2f} ms per item): give it more workers or a larger batch"
    )
