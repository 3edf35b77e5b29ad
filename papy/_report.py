"""Per-node statistics of a run, the bottleneck, and the Report that shows them.

The scheduler owns a :class:`NodeStats` per node and updates it as tasks complete; when the
run ends it freezes them into a :class:`Report`. Times per item are measured once per
batch inside the worker (batch time / batch size), so measuring costs nothing per item;
``p95_item_s`` is the 95th percentile of those per-batch means.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from typing import Any


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

    def record(self, n_in: int, n_failed: int, busy: float) -> None:
        """Add one finished task's figures."""
        self.items_in += n_in
        self.failed += n_failed
        self.busy_s += busy
        self.tasks += 1
        if n_in and len(self.batch_item_s) < 100_000:
            self.batch_item_s.append(busy / n_in)


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
    items: int
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
    #: nodes whose journal records no longer held (their code or inputs changed), and why
    changed: dict[str, str] = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Return the report as plain data."""
        d = asdict(self)
        d["nodes"] = {k: asdict(v) for k, v in self.nodes.items()}
        return d

    def to_json(self, **kwargs: Any) -> str:
        """Return the report as JSON text."""
        return json.dumps(self.to_dict(), **kwargs)

    def table(self) -> str:
        """Return a plain-text table, one row per node."""
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
                    str(n.items_in),
                    str(n.items_out),
                    str(n.failed),
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
        lines = [
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
            )
            for r in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        summary = (
            f"{self.pipeline}: {self.items} items in {self.wall_s:.2f} s "
            f"({self.items / self.wall_s if self.wall_s else 0:,.0f} items/s), "
            f"{self.failed} failed"
            + (f", {self.skipped} finished earlier (journal)" if self.skipped else "")
        )
        tail = [summary] + ([self.suggestion] if self.suggestion else [])
        tail += [f"journal: node {k!r}: {v}; recomputed" for k, v in self.changed.items()]
        if self.driver and self.show_driver:
            tail.append(
                "driver time: " + ", ".join(f"{k} {v:.3f} s" for k, v in self.driver.items())
            )
        return "\n".join([*lines, "", *tail])

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
    )


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
    if pool_busy < 0.5:
        return best, (
            f"node {best!r} is the busiest ({n.mean_item_s * 1e3:.2f} ms per item), but its "
            f"pool is only {pool_busy:.0%} busy: the run waits on its input or on per-item "
            "overhead; try larger batches, fewer and larger items, or a faster source"
        )
    return best, (
        f"node {best!r} limits throughput ({n.mean_item_s * 1e3:.2f} ms per item, "
        f"{pool_busy:.0%} of its pool busy): give it more workers or a larger batch"
    )
