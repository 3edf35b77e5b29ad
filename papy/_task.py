"""What a worker runs: one task is a batch of items through a chain of fused nodes.

The scheduler groups consecutive 1:1 nodes that share a pool into one *step*; a task runs
one batch through every node of the step, node after node (stage-major), so the data does
not return to the driver in between and each node's time is measured once per batch, not
once per item. This module is imported by worker processes, so it stays small and pure.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from papy._interrupt import real_interrupt
from papy._items import Failure, Key, failure_from_exception
from papy._journal.records import lookup, record
from papy._journal.sinklog import SinkLog
from papy._journal.store import JournalSpec, task_guard
from papy._rundir import set_current as set_run_dir


class Tracker:
    """Tell a pool which item of which stage a task is running, and since when.

    A pool that enforces per-item timeouts or wants to name the item that killed its worker
    passes one to :func:`run_task`. ``begin(stage, index, count)`` is called when item
    ``index`` (its position in the task) enters stage ``stage`` (its position in the step),
    before the node's function is called on it; ``count`` items share that call (more than
    one for a ``batched=True`` node, whose function takes the batch at once). ``index`` is
    -1 while a stage runs in bulk with no single item to blame (a stage with no timeout, when
    :attr:`every_item` is False). The default does nothing, at no cost.

    ``abandoned`` is set by the pool when it gave up on the task (a thread past its
    deadline): the task then neither commits to the journal nor reports.
    """

    every_item = False
    abandoned = False

    def begin(self, stage: int, index: int, count: int = 1) -> None:
        """Record that item ``index`` entered stage ``stage`` (see the class docstring)."""


class Abandoned(BaseException):
    """Raised inside a task its pool gave up on, to unwind it without committing anything."""


def _reraise(exc: BaseException) -> bool:
    """Tell whether an exception from a node's function must stop the run, not one item.

    A user's function may raise anything, ``SystemExit``, ``GeneratorExit``,
    ``StopIteration`` and ``KeyboardInterrupt`` included: each becomes a Failure of its
    item. Only a real interrupt of the driver (Ctrl-C or SIGTERM, seen by the handler the
    scheduler installs) and the pool's own :class:`Abandoned` unwind the task.
    """
    if isinstance(exc, Abandoned):
        return True
    return isinstance(exc, KeyboardInterrupt) and real_interrupt()


class Call:
    """Apply a composed list of functions to one item, appending the node's arguments.

    ``Call([f, g], args=[(1,), ()])(x)`` is ``g(f(x, 1))``: the first function gets the node's
    inputs (one per parent), each later one the previous result.
    """

    __slots__ = ("fns", "args", "kwargs", "fast")

    def __init__(
        self,
        fns: Sequence[Callable[..., Any]],
        args: Sequence[tuple[Any, ...]],
        kwargs: Sequence[dict[str, Any]],
    ) -> None:
        self.fns = list(fns)
        self.args = list(args)
        self.kwargs = list(kwargs)
        self.fast = self._specialize()

    def _specialize(self) -> Callable[..., Any]:
        """Return the cheapest callable equivalent to this one (hot loops call it)."""
        if len(self.fns) == 1 and not self.args[0] and not self.kwargs[0]:
            return self.fns[0]
        return self._general

    def _general(self, *inputs: Any) -> Any:
        fns, args, kwargs = self.fns, self.args, self.kwargs
        value = fns[0](*inputs, *args[0], **kwargs[0])
        for i in range(1, len(fns)):
            value = fns[i](value, *args[i], **kwargs[i])
        return value

    def __call__(self, *inputs: Any) -> Any:
        return self.fast(*inputs)

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.fns, self.args, self.kwargs)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.fns, self.args, self.kwargs = state
        self.fast = self._specialize()


@dataclass
class Stage:
    """One node as a worker sees it: its function and how to apply it."""

    name: str
    call: Callable[..., Any]
    join: bool = False  # inputs are tuples, one value per parent
    scatter: bool = False  # output is an iterable: one sub-item each
    batched: bool = False  # the function takes the whole batch as a list
    is_async: bool = False  # the function is ``async def``: run on an event loop
    retries: int = 0
    retry_on: tuple[type[BaseException], ...] | None = None
    timeout: float | None = None
    concurrency: int = 64  # for async stages: coroutines in flight per task


@dataclass
class StepSpec:
    """The fused chain of stages a task runs, shipped to each worker once."""

    id: str
    stages: list[Stage]
    run_dir: str | None = None  # where file helpers write (papy.io.run_dir())
    journal: JournalSpec | None = None  # set on recording steps of a journaled run
    private: bool = True  # files written in run_dir are mode 0600 (False: a user's workdir)


@dataclass
class StageStats:
    """What one stage did in one task."""

    n_in: int = 0
    n_failed: int = 0
    busy: float = 0.0
    first_failure: Failure | None = None


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
        stats = [(s.n_in, s.n_failed, s.busy, s.first_failure) for s in self.stats]
        return (_rebuild_result, (self.values, stats, self.crashes, self.dirty))

    def extend(self, other: TaskResult) -> None:
        """Append another part of the same task (used when a crashed batch was split)."""
        self.values.extend(other.values)
        if not self.stats:
            self.stats = other.stats
        else:
            for mine, theirs in zip(self.stats, other.stats):
                mine.n_in += theirs.n_in
                mine.n_failed += theirs.n_failed
                mine.busy += theirs.busy
                if mine.first_failure is None:
                    mine.first_failure = theirs.first_failure
        self.crashes += other.crashes
        self.dirty = self.dirty or other.dirty


def _rebuild_result(
    values: list[Any], stats: list[tuple[Any, ...]], crashes: int, dirty: bool
) -> TaskResult:
    return TaskResult(values, [StageStats(*s) for s in stats], crashes, dirty)


def _retry(stage: Stage, exc: BaseException, attempts: int) -> bool:
    """Tell whether a failed attempt may be tried again (``retries``, ``retry_on``)."""
    return attempts <= stage.retries and (stage.retry_on is None or isinstance(exc, stage.retry_on))


def _timeout_error(stage: Stage) -> TimeoutError:
    return TimeoutError(f"item exceeded the node's timeout of {stage.timeout:g} s")


def _apply_one(stage: Stage, key: Key, value: Any) -> Any:
    """Run one item through one stage with retries and timeout; return value or Failure."""
    attempts = 0
    while True:
        attempts += 1
        try:
            out = stage.call(*value) if stage.join else stage.call(value)
            return list(out) if stage.scatter else out
        except BaseException as exc:
            if _reraise(exc):
                raise
            if isinstance(exc, Exception) and _retry(stage, exc, attempts):
                continue
            return failure_from_exception(stage.name, key, exc, value, attempts)


def _run_async_stage(stage: Stage, keys: Sequence[Key], values: list[Any]) -> list[Any]:
    """Run an ``async def`` stage over a batch with at most ``concurrency`` items at once.

    ``timeout`` is enforced per item with ``asyncio.wait_for``, from the item's own start.
    """
    import asyncio

    async def one(sem: asyncio.Semaphore, key: Key, value: Any) -> Any:
        if type(value) is Failure:
            return value
        attempts = 0
        async with sem:
            while True:
                attempts += 1
                try:
                    coro = stage.call(*value) if stage.join else stage.call(value)
                    if stage.timeout is not None:
                        out = await asyncio.wait_for(coro, stage.timeout)
                    else:
                        out = await coro
                    return list(out) if stage.scatter else out
                except BaseException as exc:
                    if _reraise(exc):
                        raise
                    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
                        exc = _timeout_error(stage)
                    if isinstance(exc, Exception) and _retry(stage, exc, attempts):
                        continue
                    return failure_from_exception(stage.name, key, exc, value, attempts)

    async def main() -> list[Any]:
        sem = asyncio.Semaphore(stage.concurrency)
        return list(await asyncio.gather(*(one(sem, k, v) for k, v in zip(keys, values))))

    return asyncio.run(main())


def _count_error(stage: Stage, got: int, want: int) -> ValueError:
    return ValueError(
        f"node {stage.name!r} returned {got} results for {want} items; a batched node must "
        "return exactly one output per input, in order"
    )


def _apply_batched(stage: Stage, keys: Sequence[Key], values: list[Any]) -> list[Any]:
    """Call a ``batched=True`` stage once on the batch's good items; map results back.

    The function must return exactly one output per input: fewer or more is an error of
    every item of the call (it cannot be known which output belongs to which input), found
    by re-running the items one by one, so one bad item does not fail the others.
    """
    good = [i for i, v in enumerate(values) if type(v) is not Failure]
    if not good:
        return values
    inputs = [values[i] for i in good]
    try:
        outs = list(stage.call(inputs))
        if len(outs) != len(inputs):
            raise _count_error(stage, len(outs), len(inputs))
    except BaseException as exc:
        if _reraise(exc):
            raise
        if len(good) == 1:
            i = good[0]
            result = list(values)
            result[i] = failure_from_exception(stage.name, keys[i], exc, values[i])
            return result
        # Find the culprits: run the good items one by one so one bad item does not fail
        # the whole batch.
        single = Stage(
            name=stage.name,
            call=lambda x: _single_batched(stage, x),
            join=False,
            scatter=stage.scatter,
            retries=stage.retries,
            retry_on=stage.retry_on,
        )
        return [v if type(v) is Failure else _apply_one(single, k, v) for k, v in zip(keys, values)]
    result = list(values)
    for i, out in zip(good, outs):
        result[i] = list(out) if stage.scatter else out
    return result


def _single_batched(stage: Stage, value: Any) -> Any:
    outs = list(stage.call([value]))
    if len(outs) != 1:
        raise _count_error(stage, len(outs), 1)
    return outs[0]


def _stop_iteration(stage: Stage) -> StopIteration:
    return StopIteration(
        f"node {stage.name!r} raised StopIteration (a next() on an exhausted iterator?)"
    )


def _map_plain(stage: Stage, keys: Sequence[Key], values: list[Any], st: StageStats) -> list[Any]:
    """Apply a plain 1:1 function to a batch with no failures in it, at C-loop speed.

    ``list.extend(map(...))`` keeps what it appended when the function raises, and the
    shared iterator has moved past the bad item, so a failure costs one ``except`` and the
    loop resumes: no item runs twice and the good path has no per-item bookkeeping.

    ``map`` takes a ``StopIteration`` raised by the function for its own end, so a short
    ``out`` after a normal return means the item at ``len(out)`` raised it: that item fails
    with ``StopIteration`` (its traceback is lost inside ``map``) and the loop goes on.
    """
    call = getattr(stage.call, "fast", stage.call)
    out: list[Any] = []
    n = len(values)
    it = iter(values)
    while True:
        try:
            out.extend(map(call, it))
            if len(out) == n:
                return out
            exc: BaseException = _stop_iteration(stage)
        except BaseException as raised:
            if _reraise(raised):
                raise
            exc = raised
        i = len(out)
        f = failure_from_exception(stage.name, keys[i], exc, values[i])
        out.append(f)
        st.n_failed += 1
        if st.first_failure is None:
            st.first_failure = f
        if len(out) == n:
            return out


def _map_tracked(
    stage: Stage,
    s: int,
    keys: Sequence[Key],
    values: list[Any],
    tracker: Tracker,
    offset: int,
    indices: Sequence[int] | None = None,
) -> list[Any]:
    """Apply a 1:1 stage item by item, telling ``tracker`` when each item starts."""
    begin = tracker.begin
    out: list[Any] = []
    for i, (k, v) in enumerate(zip(keys, values)):
        if type(v) is Failure:
            out.append(v)
            continue
        begin(s, indices[i] if indices else offset + i)
        out.append(_apply_one(stage, k, v))
    return out


class _Critical:
    """Mark code that must not be cut short by SIGTERM (a journaled task and its commit).

    A worker's SIGTERM handler checks ``depth``: outside, it exits at once; inside, it sets
    ``deferred`` and the worker exits as soon as the section ends.
    """

    depth = 0
    deferred = False

    def __enter__(self) -> None:
        type(self).depth += 1

    def __exit__(self, *exc: object) -> None:
        cls = type(self)
        cls.depth -= 1
        if cls.depth == 0 and cls.deferred:
            os._exit(128 + 15)


critical = _Critical()


def run_task(
    spec: StepSpec,
    keys: Sequence[Key],
    values: list[Any],
    jkeys: Sequence[tuple[str, str]] | None = None,
    dirty: bool = True,
    tracker: Tracker | None = None,
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
    """
    if spec.journal is None or not jkeys:
        return _run(spec, keys, values, dirty, tracker)
    with critical, task_guard(spec.journal):
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
    hits = lookup(journal, jkeys)
    # Each item starts after the last stage that has its output recorded.
    start = [0] * len(keys)
    current = list(values)
    for idx in sorted(hits):
        for i, v in hits[idx].items():
            start[i] = idx + 1
            current[i] = v
    per_item_sink = journal.sink and last in recorded_at
    if not hits and not per_item_sink and set(recorded_at) <= {last}:
        result = _run(spec, keys, values, dirty, tracker)  # the common case: record the tail
        _check_abandoned(tracker)
        if recorded_at:
            name, fp = recorded_at[last]
            record(journal, jkeys, result.values, name, fp)
        return result
    set_run_dir(spec.run_dir, spec.private)
    stats: list[StageStats] = []
    for j, stage in enumerate(stages):
        todo = [i for i in range(len(keys)) if start[i] <= j]
        st = StageStats()
        if j == last and per_item_sink:
            name, fp = recorded_at[j]
            log = SinkLog(journal, name, fp)
            plain = not (stage.batched or stage.is_async)
            t0 = time.perf_counter()
            timed = tracker is not None and (tracker.every_item or stage.timeout is not None)
            for i in todo:  # each item's record is written as soon as its side effect is done
                v = current[i]
                if plain:
                    if type(v) is not Failure:
                        if timed:
                            tracker.begin(j, i)  # type: ignore[union-attr]
                        v = _apply_one(stage, keys[i], v)
                        if type(v) is Failure:
                            st.n_failed += 1
                            if st.first_failure is None:
                                st.first_failure = v
                else:
                    part = _run_slice(
                        [stage], [keys[i]], [v], True, tracker=tracker, offset=i, first=j
                    )
                    v = part.values[0]
                    _add_stats(st, part.stats[0])
                current[i] = v
                _check_abandoned(tracker)
                log.add(jkeys[i], v)
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
            if j in recorded_at:
                name, fp = recorded_at[j]
                record(journal, [jkeys[i] for i in todo], part.values, name, fp)
            _add_stats(st, part.stats[0])
        stats.append(st)
    return TaskResult(current, stats, dirty=True)


def _add_stats(mine: StageStats, theirs: StageStats) -> None:
    mine.n_in += theirs.n_in
    mine.n_failed += theirs.n_failed
    mine.busy += theirs.busy
    if mine.first_failure is None:
        mine.first_failure = theirs.first_failure


_SLICE_BYTES = 8 * 2**20  # intermediate values a fused task may hold at once


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
    makes a 1 MB array each would otherwise hold 600 MB). The slice size follows the size
    of the first intermediate value. Batched and async stages need the whole batch.
    """
    set_run_dir(spec.run_dir, spec.private)
    stages = spec.stages
    if len(stages) == 1 or any(s.batched or s.is_async for s in stages) or len(values) <= 8:
        return _run_slice(stages, keys, values, dirty, tracker=tracker)
    sizes: list[int] = []
    first = _run_slice(stages, keys[:8], values[:8], dirty, sizes, tracker)
    size = max(sizes, default=0)
    step = max(1, min(len(values), _SLICE_BYTES // max(1, size)))
    result = first
    for start in range(8, len(values), step):
        result.extend(
            _run_slice(
                stages,
                keys[start : start + step],
                values[start : start + step],
                dirty,
                tracker=tracker,
                offset=start,
            )
        )
    return result


def _run_slice(
    stages: list[Stage],
    keys: Sequence[Key],
    values: list[Any],
    dirty: bool,
    sizes: list[int] | None = None,
    tracker: Tracker | None = None,
    offset: int = 0,
    first: int = 0,
    indices: Sequence[int] | None = None,
) -> TaskResult:
    """Run a slice of a task through ``stages``, stage after stage.

    For the tracker, item ``i`` of the slice is item ``indices[i]`` (default ``offset + i``)
    of the task, and ``stages[k]`` is stage ``first + k`` of the step.
    """
    stats = []
    perf = time.perf_counter
    n = len(values)
    # ``dirty``: the batch may hold Failure values to skip. The driver knows when it does
    # not (straight from the input, or from a task without failures), which spares a scan.
    dirty = dirty and Failure in set(map(type, values))
    for s, stage in enumerate(stages, first):
        t0 = perf()
        st = StageStats(n_in=n)
        tracked = tracker is not None and (tracker.every_item or stage.timeout is not None)
        if tracker is not None and not tracked:
            tracker.begin(s, -1, n)
        if stage.batched or stage.is_async:
            if tracker is not None and stage.batched:
                start = (indices[0] if indices else offset) if tracked else -1
                tracker.begin(s, start, n)
            values = (
                _apply_batched(stage, keys, values)
                if stage.batched
                else _run_async_stage(stage, keys, values)
            )
            _count_failures(stage, values, st)
        elif tracked:
            assert tracker is not None
            values = _map_tracked(stage, s, keys, values, tracker, offset, indices)
            _count_failures(stage, values, st)
        elif stage.retries or stage.join or stage.scatter:
            values = [
                v if type(v) is Failure else _apply_one(stage, k, v) for k, v in zip(keys, values)
            ]
            _count_failures(stage, values, st)
        elif not dirty:
            values = _map_plain(stage, keys, values, st)
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
                    if _reraise(exc):
                        raise
                    f = failure_from_exception(stage.name, keys[i], exc, v)
                    append(f)
                    st.n_failed += 1
                    if st.first_failure is None:
                        st.first_failure = f
            values = out
        if tracked:
            tracker.begin(s, -1, 0)  # type: ignore[union-attr]  # the stage's items are done
        if len(values) != n:  # every path above keeps one value per item; never trust it
            raise AssertionError(f"stage {stage.name!r} produced {len(values)} values for {n}")
        dirty = dirty or st.n_failed > 0
        st.busy = perf() - t0
        if sizes is not None and values:
            sizes.append(sys.getsizeof(values[0]) * len(values))
        stats.append(st)
    return TaskResult(values, stats, dirty=dirty)


def _count_failures(stage: Stage, values: list[Any], st: StageStats) -> None:
    for v in values:
        if type(v) is Failure and v.node == stage.name:
            st.n_failed += 1
            if st.first_failure is None:
                st.first_failure = v
