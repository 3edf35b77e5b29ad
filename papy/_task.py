"""What a worker runs: one task is a batch of items through a chain of fused nodes.

The scheduler groups consecutive 1:1 nodes that share a pool into one *step*; a task runs
one batch through every node of the step, node after node (stage-major), so the data does
not return to the driver in between and each node's time is measured once per batch, not
once per item. This module is imported by worker processes, so it stays small and pure.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from papy._apply import (
    Abandoned,
    Call,
    Stage,
    StageStats,
    Tracker,
    apply_batched,
    apply_one,
    chain_items,
    is_plain,
    map_plain,
    map_tracked,
    reraise,
    run_async_stage,
)
from papy._items import Failure, Key, at_position, child_key, failure_from_exception, position
from papy._journal.records import lookup, record, unrecordable
from papy._journal.sinklog import SinkLog, keep_failures
from papy._journal.store import JournalSpec, store_for, task_guard
from papy._rundir import set_current as set_run_dir

__all__ = [
    "Abandoned",
    "Call",
    "JournalSpec",
    "Stage",
    "StageStats",
    "StepSpec",
    "TaskResult",
    "Tracker",
    "run_task",
]


@dataclass(frozen=True)
class StepSpec:
    """The fused chain of stages a task runs, shipped to each worker once (part of the plan)."""

    id: str
    stages: Sequence[Stage]
    run_dir: str | None = None  # where file helpers write (papy.io.run_dir())
    journal: JournalSpec | None = None  # set on recording steps of a journaled run
    private: bool = True  # files written in run_dir are mode 0600 (False: a user's workdir)
    #: (scatter stage, gather stage) when the step runs a scatter, the 1:1 stages after it
    #: and the gather that closes it as one task: each item's sub-items never leave the
    #: worker (see :func:`_run_group`)
    group: tuple[int, int] | None = None


@dataclass
class TaskResult:
    """The outputs of a task (one per input item) and each stage's statistics.

    For a step ending in a scatter node each output is a list of sub-values (or a Failure).
    """

    values: list[Any]
    stats: list[StageStats] = field(default_factory=list)
    crashes: int = 0
    dirty: bool = True  # may hold Failure values (False lets the driver skip a scan)
    nbytes: int = 0  # size of the result as it crossed a process boundary (0: did not)

    def __reduce__(self) -> tuple[Any, ...]:
        # Plain tuples pickle several times faster than dataclass instances; a result
        # crosses a pipe once per task, so this is on the hot path.
        stats = [
            (s.n_in, s.n_failed, s.busy, s.first_failure, s.by_type, s.firsts, s.replayed)
            for s in self.stats
        ]
        return (_rebuild_result, (self.values, stats, self.crashes, self.dirty))

    def extend(self, other: TaskResult) -> None:
        """Append another part of the same task (used when a crashed batch was split)."""
        self.values.extend(other.values)
        if not self.stats:
            self.stats = other.stats
        else:
            for mine, theirs in zip(self.stats, other.stats):
                mine.add(theirs)
        self.crashes += other.crashes
        self.dirty = self.dirty or other.dirty


def _rebuild_result(
    values: list[Any], stats: list[tuple[Any, ...]], crashes: int, dirty: bool
) -> TaskResult:
    return TaskResult(values, [StageStats(*s) for s in stats], crashes, dirty)


class CriticalSection:
    """Count the threads inside code SIGTERM must not cut short: a journaled task and its commit.

    A worker process makes one (``papy.pools._worker.worker_main``) and passes it to
    :func:`run_task`; its SIGTERM handler calls :meth:`defer`: outside any section the
    worker exits at once, inside it exits as soon as the last section ends.
    """

    def __init__(self) -> None:
        self.depth = 0
        self.deferred = False
        self._lock = threading.Lock()

    def defer(self) -> bool:
        """Ask to exit when the open sections end; return False if none is open."""
        if not self.depth:
            return False
        self.deferred = True
        return True

    def __enter__(self) -> None:
        with self._lock:
            self.depth += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.depth -= 1
            leave = self.depth == 0 and self.deferred
        if leave:
            os._exit(128 + 15)


def run_task(
    spec: StepSpec,
    keys: Sequence[Key],
    values: list[Any],
    jkeys: Sequence[tuple[str, str]] | None = None,
    dirty: bool = True,
    tracker: Tracker | None = None,
    critical: CriticalSection | None = None,
) -> TaskResult:
    """Run a batch through every stage of ``spec``; failures become Failure values.

    On a journaled step (``spec.journal`` and ``jkeys`` set), a stage the journal holds an
    item's output for is not run for that item (nor the stages before it): the recorded
    output is used. The outputs of the step's recorded stages (terminals, ``cache=True``
    nodes) are committed before this returns, without letting SIGTERM cut in between; a
    sink's are committed item by item, so a crash re-runs at most the item it hit.

    The result holds exactly one value or Failure per key, in the order of ``keys``.
    ``tracker`` (see :class:`Tracker`) hears when each timed item starts; a task whose
    tracker was abandoned raises :class:`Abandoned` instead of committing anything more.
    A journaled task runs inside ``critical`` (a worker process's :class:`CriticalSection`).
    """
    if spec.journal is None or not jkeys:
        return _run(spec, keys, values, dirty, tracker)
    with critical or contextlib.nullcontext(), task_guard(spec.journal, tracker):
        return _run_journaled(spec, keys, values, jkeys, dirty, tracker)


def _check_abandoned(tracker: Tracker | None) -> None:
    if tracker is not None and tracker.abandoned:
        raise Abandoned()


def _run_journaled(
    spec: StepSpec,
    keys: Sequence[Key],
    values: list[Any],
    jkeys: Sequence[tuple[str, str]],
    dirty: bool,
    tracker: Tracker | None = None,
) -> TaskResult:
    journal = spec.journal
    assert journal is not None
    stages = spec.stages
    last = len(stages) - 1
    recorded_at = {idx: (name, fp) for idx, name, fp in journal.nodes}
    per_item_sink = journal.sink and last in recorded_at
    if per_item_sink and store_for(journal).closed:  # a re-run of a run that has ended
        failed = [(jk, v) for jk, v in zip(jkeys, values) if type(v) is Failure]
        keep_failures(journal, *recorded_at[last], failed)  # then lookup() raises
    hits = lookup(journal, jkeys)
    # Each item starts after the last stage that has its output recorded.
    start = [0] * len(keys)
    current = list(values)
    for idx in sorted(hits):
        for i, v in hits[idx].items():
            start[i] = idx + 1
            current[i] = at_position(v, position(keys[i]))  # recorded at another position?
    if not hits and not per_item_sink and set(recorded_at) <= {last}:
        result = _run(spec, keys, values, dirty, tracker)  # the common case: record the tail
        _check_abandoned(tracker)
        if recorded_at:
            name, fp = recorded_at[last]
            for f in record(journal, jkeys, result.values, name, fp, keys):
                result.stats[last].failed(f)  # an output that cannot be recorded
                result.dirty = True
        return result
    set_run_dir(spec.run_dir, spec.private)
    stats: list[StageStats] = []
    for j, stage in enumerate(stages):
        todo = [i for i in range(len(keys)) if start[i] <= j]
        st = StageStats()
        for i, v in hits.get(j, {}).items():
            if type(v) is Failure and start[i] == j + 1 and v.node == stage.name:
                st.failed(current[i], replayed=True)  # this node's, recorded by an earlier run
        if j == last and per_item_sink:
            name, fp = recorded_at[j]
            log = SinkLog(journal, name, fp, tracker)
            plain = not (stage.batched or stage.is_async)
            t0 = time.perf_counter()
            timed = tracker is not None and (tracker.every_item or stage.timeout is not None)
            try:
                for i in todo:  # each item's record is written as soon as its side effect is done
                    v = current[i]
                    if plain:
                        if type(v) is not Failure:
                            if timed:
                                tracker.begin(j, i)  # type: ignore[union-attr]
                            v = apply_one(stage, keys[i], v)
                            if timed:  # stops its clock: recorded, unless already given up on
                                tracker.begin(j, -1, 0)  # type: ignore[union-attr]
                            if type(v) is Failure:
                                st.failed(v)
                    else:
                        part = _run_slice(
                            [stage], [keys[i]], [v], True, tracker=tracker, offset=i, first=j
                        )
                        v = part.values[0]
                        st.add(part.stats[0])
                    _check_abandoned(tracker)
                    recorded = log.add(jkeys[i], v, lambda _, e: unrecordable(name, keys[i], v, e))
                    if recorded is not v:  # an output that cannot be recorded: it failed
                        st.failed(recorded)
                    current[i] = recorded
            except BaseException:
                log.close()  # cut short: the file stays for the next run to fold in
                raise
            if timed:
                tracker.begin(j, -1, 0)  # type: ignore[union-attr]
            if plain:
                st.n_in += len(todo)
                st.busy += time.perf_counter() - t0
            log.commit()
        elif todo:
            part = _run_slice(
                [stage],
                [keys[i] for i in todo],
                [current[i] for i in todo],
                True,
                tracker=tracker,
                first=j,
                indices=todo,
            )
            for i, v in zip(todo, part.values):
                current[i] = v
            _check_abandoned(tracker)
            st.add(part.stats[0])
            if j in recorded_at:
                name, fp = recorded_at[j]
                got = [keys[i] for i in todo]
                for f in record(journal, [jkeys[i] for i in todo], part.values, name, fp, got):
                    st.failed(f)  # an output that cannot be recorded
                for i, v in zip(todo, part.values):
                    current[i] = v
        stats.append(st)
    return TaskResult(current, stats, dirty=True)


# Intermediate values a fused task holds at once. Below the C allocator's trim threshold
# (glibc: twice the largest block it has mmapped, 2 MiB for 1 MiB arrays), so the memory
# freed after a slice is reused by the next one instead of being returned to the system
# and faulted in again page by page.
_SLICE_BYTES = 2**20


def _run(
    spec: StepSpec,
    keys: Sequence[Key],
    values: list[Any],
    dirty: bool,
    tracker: Tracker | None = None,
) -> TaskResult:
    """Run a batch through the stages, in slices when several stages are fused.

    Stage after stage over a slice keeps per-node timing cheap; slicing keeps the
    intermediate values of a fused chain small (a batch of 600 items whose first stage
    makes a 1 MB array each would otherwise hold 600 MB). Slices hold about
    ``_SLICE_BYTES`` of intermediate values, as measured on the first item of the last
    slice, and at most double from one slice to the next, so items that grow within a
    batch are caught after a few of them. Batched and async stages need the whole batch.
    """
    set_run_dir(spec.run_dir, spec.private)
    stages = spec.stages
    if spec.group is not None:
        return _run_group(spec, spec.group, keys, values, dirty, tracker)
    if len(stages) == 1 or any(s.batched or s.is_async for s in stages) or len(values) <= 1:
        return _run_slice(stages, keys, values, dirty, tracker=tracker)
    sizes: list[int] = []
    first = _run_slice(stages, keys[:1], values[:1], dirty, sizes, tracker)
    size = max(sizes, default=0)
    step = max(1, min(len(values), _SLICE_BYTES // max(1, size)))
    untracked = tracker is None or not (
        tracker.every_item or any(s.timeout is not None for s in stages)
    )
    if step == 1 and untracked and all(map(is_plain, stages)):  # large items: one at a time
        if chain_items(stages, keys[1:], values[1:], first.stats, first.values):
            first.dirty = True
        return first
    start, done = 1, 1
    while start < len(values):
        take = min(step, 2 * done)
        sizes = []
        _run_slice(
            stages,
            keys[start : start + take],
            values[start : start + take],
            dirty,
            sizes,
            tracker,
            offset=start,
            into=first,
        )
        start, done = start + take, take
        step = max(1, _SLICE_BYTES // max(1, max(sizes, default=0) // take))
    return first


def _run_group(
    spec: StepSpec,
    group: tuple[int, int],
    keys: Sequence[Key],
    values: list[Any],
    dirty: bool,
    tracker: Tracker | None,
) -> TaskResult:
    """Run a batch through a scatter, the 1:1 stages after it and the gather closing it.

    The stages up to the scatter run over the batch; the sub-items of every item then run
    through the middle stages as one batch (a sub-item is keyed and blamed as its item
    would be: ``(key, i)``, and the tracker hears its item's index); each item's sub-items
    are regrouped in order, the first Failure among them standing for the group as a
    gather does, and the gather and the stages after it run over the batch. The result
    holds one value per item, as any task's.
    """
    s_i, g_i = group
    stages = spec.stages
    head = _run_slice(stages[: s_i + 1], keys, values, dirty, tracker=tracker)
    sub_keys: list[Key] = []
    sub_values: list[Any] = []
    owner: list[int] = []
    counts = []
    for i, (key, v) in enumerate(zip(keys, head.values)):
        subs = [v] if type(v) is Failure else v
        counts.append(len(subs))
        sub_keys.extend(child_key(key, j) for j in range(len(subs)))
        sub_values.extend(subs)
        owner.extend([i] * len(subs))
    mid = _run_slice(
        stages[s_i + 1 : g_i],
        sub_keys,
        sub_values,
        True,
        tracker=tracker,
        first=s_i + 1,
        indices=owner,
    )
    grouped: list[Any] = []
    start = 0
    for c in counts:
        subs = mid.values[start : start + c]
        start += c
        grouped.append(next((x for x in subs if type(x) is Failure), subs))
    tail = _run_slice(stages[g_i:], keys, grouped, True, tracker=tracker, first=g_i)
    return TaskResult(tail.values, [*head.stats, *mid.stats, *tail.stats], dirty=True)


def _run_slice(
    stages: Sequence[Stage],
    keys: Sequence[Key],
    values: list[Any],
    dirty: bool,
    sizes: list[int] | None = None,
    tracker: Tracker | None = None,
    offset: int = 0,
    first: int = 0,
    indices: Sequence[int] | None = None,
    into: TaskResult | None = None,
) -> TaskResult:
    """Run a slice of a task through ``stages``, stage after stage.

    For the tracker, item ``i`` of the slice is item ``indices[i]`` (default ``offset + i``)
    of the task, and ``stages[k]`` is stage ``first + k`` of the step. ``into``: an earlier
    slice's result of the same stages, extended in place and returned (a task of 1 MiB
    items runs one slice per item, so no statistics are made and merged per slice).
    """
    stats = into.stats if into is not None else []
    perf = time.perf_counter
    n = len(values)
    # ``dirty``: the batch may hold Failure values to skip. The driver knows when it does
    # not (straight from the input, or from a task without failures), which spares a scan.
    dirty = dirty and Failure in set(map(type, values))
    for s, stage in enumerate(stages, first):
        t0 = perf()
        if into is None:
            st = StageStats(n_in=n)
            stats.append(st)
        else:
            st = stats[s - first]
            st.n_in += n
        failed_before = st.n_failed
        tracked = tracker is not None and (tracker.every_item or stage.timeout is not None)
        if tracker is not None and not tracked and into is None:
            tracker.begin(s, -1, n)  # once per task: a later slice has nothing new to say
        if stage.batched or stage.is_async:
            if tracker is not None and stage.batched:
                start = (indices[0] if indices else offset) if tracked else -1
                tracker.begin(s, start, n)
            values = (
                apply_batched(stage, keys, values)
                if stage.batched
                else run_async_stage(stage, keys, values)
            )
            _count_failures(stage, values, st)
        elif tracked:
            assert tracker is not None
            values = map_tracked(stage, s, keys, values, tracker, offset, indices)
            _count_failures(stage, values, st)
        elif stage.retries or stage.join or stage.scatter:
            values = [
                v if type(v) is Failure else apply_one(stage, k, v) for k, v in zip(keys, values)
            ]
            _count_failures(stage, values, st)
        elif not dirty:
            values = map_plain(stage, keys, values, st)
        else:
            call = getattr(stage.call, "fast", stage.call)
            out: list[Any] = []
            append = out.append
            for i, v in enumerate(values):
                if type(v) is Failure:
                    append(v)
                    continue
                try:
                    append(call(v))
                except BaseException as exc:
                    if reraise(exc):
                        raise
                    f = failure_from_exception(stage.name, keys[i], exc, v)
                    append(f)
                    st.failed(f)
            values = out
        if tracked:
            tracker.begin(s, -1, 0)  # type: ignore[union-attr]  # the stage's items are done
        if len(values) != n:  # every path above keeps one value per item; never trust it
            raise AssertionError(f"stage {stage.name!r} produced {len(values)} values for {n}")
        dirty = dirty or st.n_failed > failed_before
        st.busy += perf() - t0
        if sizes is not None and values:
            sizes.append(_size(values[0]) * len(values))
    if into is None:
        return TaskResult(values, stats, dirty=dirty)
    into.values.extend(values)
    into.dirty = into.dirty or dirty
    return into


def _size(value: Any) -> int:
    """Return ``sys.getsizeof(value)``, or 0 when the object cannot say (a broken
    ``__sizeof__`` is the object's own business, not a reason to fail its task)."""
    try:
        return sys.getsizeof(value)
    except Exception:
        return 0


def _count_failures(stage: Stage, values: list[Any], st: StageStats) -> None:
    for v in values:
        if type(v) is Failure and v.node == stage.name:
            st.failed(v)
