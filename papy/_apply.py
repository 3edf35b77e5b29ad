"""Applying one node to a batch: retries, timeouts, async, batched calls, failures.

A *stage* is a node as a worker sees it (:class:`Stage`: its function and how to call
it). The functions here run a stage over the items of one task and turn every exception
of the user's function into a :class:`~papy.Failure` of its item, so a task always
returns one value per item. Imported by worker processes: small, and only low layers.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from papy._interrupt import real_interrupt
from papy._items import Failure, Key, failure_from_exception


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
    deadline): the task then neither commits to the journal nor reports. ``handing_on`` is
    true while the re-run of an abandoned task's other items (which records the late
    item's failure) has not ended: until then the task's items are not all accounted for.
    """

    every_item = False
    abandoned = False
    handing_on = False

    def begin(self, stage: int, index: int, count: int = 1) -> None:
        """Record that item ``index`` entered stage ``stage`` (see the class docstring)."""


class Abandoned(BaseException):
    """Raised inside a task its pool gave up on, to unwind it without committing anything."""


def reraise(exc: BaseException) -> bool:
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


@dataclass(frozen=True)
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
class StageStats:
    """What one stage did in one task.

    ``by_type`` counts the stage's failed items per exception type (``Failure.exc_type``);
    its counts add up to ``n_failed``; ``firsts`` keeps the first Failure of each type.
    ``replayed`` of ``n_failed`` are Failures a journal's records gave back (a ``cache=True``
    node's), not made by this run: they never stop a run (``on_error="raise"``), and
    ``first_failure`` is never one of them. Count a failure with :meth:`failed`.
    """

    n_in: int = 0
    n_failed: int = 0
    busy: float = 0.0
    first_failure: Failure | None = None
    by_type: dict[str, int] | None = None  # None until an item fails
    firsts: dict[str, Failure] | None = None
    replayed: int = 0

    def failed(self, f: Failure, n: int = 1, replayed: bool = False) -> None:
        """Count ``n`` failed items like ``f`` (the first one seen is kept)."""
        self.n_failed += n
        if replayed:
            self.replayed += n
        elif self.first_failure is None:
            self.first_failure = f
        if self.by_type is None or self.firsts is None:
            self.by_type, self.firsts = {}, {}
        self.by_type[f.exc_type] = self.by_type.get(f.exc_type, 0) + n
        self.firsts.setdefault(f.exc_type, f)

    def keep_firsts(self, sendable: Callable[[Failure], bool]) -> None:
        """Forget the kept Failures that cannot travel (their counts stay)."""
        if self.first_failure is not None and not sendable(self.first_failure):
            self.first_failure = None
        if self.firsts:
            self.firsts = {k: f for k, f in self.firsts.items() if sendable(f)}

    def add(self, other: StageStats) -> None:
        """Add the figures of another part of the same stage's work."""
        self.n_in += other.n_in
        self.n_failed += other.n_failed
        self.replayed += other.replayed
        self.busy += other.busy
        if self.first_failure is None:
            self.first_failure = other.first_failure
        if other.by_type:
            if self.by_type is None:
                self.by_type = {}
            for exc, n in other.by_type.items():
                self.by_type[exc] = self.by_type.get(exc, 0) + n
        if other.firsts:
            if self.firsts is None:
                self.firsts = {}
            for exc, f in other.firsts.items():
                self.firsts.setdefault(exc, f)


def _retry(stage: Stage, exc: BaseException, attempts: int) -> bool:
    """Tell whether a failed attempt may be tried again (``retries``, ``retry_on``)."""
    return attempts <= stage.retries and (stage.retry_on is None or isinstance(exc, stage.retry_on))


def _timeout_error(stage: Stage) -> TimeoutError:
    return TimeoutError(f"item exceeded the node's timeout of {stage.timeout:g} s")


def apply_one(stage: Stage, key: Key, value: Any, tried: int = 0) -> Any:
    """Run one item through one stage with retries and timeout; return value or Failure.

    ``tried``: attempts already made on the item (a ``batched=True`` call of it alone).
    """
    attempts = tried
    while True:
        attempts += 1
        try:
            out = stage.call(*value) if stage.join else stage.call(value)
            return list(out) if stage.scatter else out
        except BaseException as exc:
            if reraise(exc):
                raise
            if isinstance(exc, Exception) and _retry(stage, exc, attempts):
                continue
            return failure_from_exception(stage.name, key, exc, value, attempts)


def run_async_stage(stage: Stage, keys: Sequence[Key], values: list[Any]) -> list[Any]:
    """Run an ``async def`` stage over a batch with at most ``concurrency`` items at once.

    ``timeout`` is enforced per item with ``asyncio.wait_for``, from the item's own start.
    A ``KeyboardInterrupt`` or ``SystemExit`` that asyncio lets out of the event loop (from
    a task or callback an item started) cannot be told apart by item: the items not done
    then run again one by one, and the one that raises it alone fails with it.
    """
    import asyncio

    done: dict[int, Any] = {}

    async def one(sem: asyncio.Semaphore, i: int, key: Key, value: Any) -> None:
        done[i] = await attempt(sem, key, value)

    async def attempt(sem: asyncio.Semaphore, key: Key, value: Any) -> Any:
        if type(value) is Failure:
            return value
        attempts = 0
        async with sem:
            while True:
                attempts += 1
                try:
                    coro = stage.call(*value) if stage.join else stage.call(value)
                    if stage.timeout is not None:
                        # wait_for runs it as a Task of its own, and asyncio re-raises a
                        # Task's KeyboardInterrupt or SystemExit out of the event loop:
                        # carried out as a value, it fails this item like any exception.
                        out = await asyncio.wait_for(_carried(coro), stage.timeout)
                        if type(out) is _Raised:
                            raise out.exc
                    else:
                        out = await coro
                    return list(out) if stage.scatter else out
                except BaseException as exc:
                    if reraise(exc) or _cancelled(asyncio, exc):
                        raise
                    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
                        exc = _timeout_error(stage)
                    elif _coroutine_stop(exc):  # what the node raised, as for a plain node
                        exc = exc.__cause__  # type: ignore[assignment]
                    if isinstance(exc, Exception) and _retry(stage, exc, attempts):
                        continue
                    return failure_from_exception(stage.name, key, exc, value, attempts)

    async def main() -> None:
        sem = asyncio.Semaphore(stage.concurrency)
        await asyncio.gather(*(one(sem, i, k, v) for i, (k, v) in enumerate(zip(keys, values))))

    try:
        asyncio.run(main())
    except (KeyboardInterrupt, SystemExit) as exc:
        if reraise(exc):
            raise
        left = [i for i in range(len(keys)) if i not in done]
        if len(keys) == 1:
            return [failure_from_exception(stage.name, keys[0], exc, values[0])]
        for i in left:  # alone, each item's own escape is its own
            done[i] = run_async_stage(stage, [keys[i]], [values[i]])[0]
    return [done[i] for i in range(len(keys))]


def _coroutine_stop(exc: BaseException) -> bool:
    """Tell whether ``exc`` is Python's RuntimeError for a ``StopIteration`` raised inside a
    coroutine (PEP 479), which carries the node's own exception as its ``__cause__``."""
    return (
        type(exc) is RuntimeError
        and isinstance(exc.__cause__, StopIteration)
        and str(exc) == "coroutine raised StopIteration"
    )


def _cancelled(asyncio: Any, exc: BaseException) -> bool:
    """Tell whether ``exc`` is the cancellation of this item's task (the event loop is
    being shut down after an escape), not a ``CancelledError`` the node raised itself."""
    if not isinstance(exc, asyncio.CancelledError):
        return False
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class _Raised:
    """What a coroutine raised that asyncio would not leave to its awaiter."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


async def _carried(coro: Any) -> Any:
    try:
        return await coro
    except (KeyboardInterrupt, SystemExit) as exc:
        return _Raised(exc)


def _count_error(stage: Stage, got: int, want: int) -> ValueError:
    return ValueError(
        f"node {stage.name!r} returned {got} results for {want} items; a batched node must "
        "return exactly one output per input, in order"
    )


def apply_batched(stage: Stage, keys: Sequence[Key], values: list[Any]) -> list[Any]:
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
        if reraise(exc):
            raise
        # A call of one item was its first attempt: retried if ``retries`` allows, as any
        # item is. Otherwise find the culprits: run the good items one by one, so one bad
        # item does not fail the whole batch.
        tried = 0
        if len(good) == 1:
            if not (isinstance(exc, Exception) and _retry(stage, exc, 1)):
                i = good[0]
                result = list(values)
                result[i] = failure_from_exception(stage.name, keys[i], exc, values[i])
                return result
            tried = 1
        single = Stage(
            name=stage.name,
            call=lambda x: _single_batched(stage, x),
            join=False,
            scatter=stage.scatter,
            retries=stage.retries,
            retry_on=stage.retry_on,
        )
        return [
            v if type(v) is Failure else apply_one(single, k, v, tried)
            for k, v in zip(keys, values)
        ]
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


def map_plain(stage: Stage, keys: Sequence[Key], values: list[Any], st: StageStats) -> list[Any]:
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
            if reraise(raised):
                raise
            exc = raised
        i = len(out)
        f = failure_from_exception(stage.name, keys[i], exc, values[i])
        out.append(f)
        st.failed(f)
        if len(out) == n:
            return out


def is_plain(stage: Stage) -> bool:
    """Tell whether ``stage`` is a plain 1:1 call (no retries, batch, loop, join, scatter)."""
    return not (stage.retries or stage.batched or stage.is_async or stage.join or stage.scatter)


def chain_items(
    stages: Sequence[Stage],
    keys: Sequence[Key],
    values: Sequence[Any],
    stats: Sequence[StageStats],
    out: list[Any],
) -> bool:
    """Run each item through all of ``stages`` (plain ones, see :func:`is_plain`) before
    the next item; append the outputs to ``out``, add counts and busy time to ``stats``
    (one per stage). Return whether an output is a Failure.

    The same results and statistics as running the stages one after the other over the
    batch, for items that are large: an item's intermediate values are freed before the
    next item starts, and no per-stage bookkeeping is paid per item. A Failure (given, or
    made by a stage) passes through the later stages untouched.
    """
    calls = [getattr(stage.call, "fast", stage.call) for stage in stages]
    busy = [0.0] * len(stages)
    perf = time.perf_counter
    dirty = False
    append = out.append
    for key, v in zip(keys, values):
        t0 = perf()
        for s, call in enumerate(calls):
            if type(v) is not Failure:
                try:
                    v = call(v)
                except BaseException as exc:
                    if reraise(exc):
                        raise
                    v = failure_from_exception(stages[s].name, key, exc, v)
                    stats[s].failed(v)
            t1 = perf()
            busy[s] += t1 - t0
            t0 = t1
        dirty = dirty or type(v) is Failure
        append(v)
    for st, b in zip(stats, busy):
        st.n_in += len(keys)
        st.busy += b
    return dirty


def map_tracked(
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
        out.append(apply_one(stage, k, v))
    return out
