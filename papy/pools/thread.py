"""ThreadPool: run tasks on threads of the driver process.

Right for I/O-bound nodes (network, disk, external programs) and for code that releases the
GIL (numpy, compression). Items are not pickled.

Timeouts are per item: each task reports, through a :class:`~papy._task.Tracker`, which
item of which node it is running and since when, and a watchdog thread checks every
``_TICK_S`` seconds. A thread cannot be stopped from outside, so when an item overruns its
node's ``timeout`` the thread is *abandoned*: that item becomes a ``TimeoutError`` failure,
a new thread takes the abandoned one's place so the pool keeps its size, and the task's
other items are run again on the pool (they are not blamed). Whatever the abandoned thread
returns later is discarded, and it never commits to a journal. The abandoned call still
runs to its end in the background; use a ProcessPool when a stuck call must really be
stopped.

``close()`` fails every unfinished task with :class:`~papy.PoolError` before it returns:
queued tasks never run, and a running one is given up like a late item (its call goes on
in the background, its result is discarded, its thread ends when the call returns). A
``submit()`` that races ``close()`` raises ``PoolError``; it never queues a task that
nothing would run. The pool's threads hold no reference to the :class:`ThreadPool` object
itself, so a pool that is never closed is closed when it is garbage-collected, and at
interpreter exit.

``ThreadPool()`` with no worker count sizes itself: it starts with ``min(32, cores + 4)``
threads and adds one whenever a task waits for a thread while the pool's threads together
use less than half a core (they wait on I/O, sleeps, external programs: measured as their
CPU time over wall time), up to ``MAX_AUTO_WORKERS``; threads idle for ``IDLE_S`` seconds
leave again.
So an I/O node keeps a CPU node fed without a hand-tuned count, and CPU-bound Python code
(which holds the GIL) does not get threads that could only wait for it.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
import weakref
from concurrent.futures import Future, InvalidStateError
from typing import Any

from papy._errors import PoolError
from papy._items import NO_INPUT, Failure, failure_from_exception
from papy._task import Abandoned, TaskResult, Tracker, run_task
from papy.pools._base import Pool, Task

log = logging.getLogger("papy")

#: Seconds between two checks of the watchdog: a late item is found within its node's
#: timeout plus this.
_TICK_S = 0.05
#: Most threads a self-sizing ``ThreadPool()`` grows to.
MAX_AUTO_WORKERS = 128
#: Seconds a thread of a self-sizing pool stays idle before it leaves.
IDLE_S = 10.0
#: CPU the pool's threads use together (in cores) below which more threads help: above
#: it they compete for the GIL, and another thread would only wait for it.
_CPU_BOUND = 0.5


class _ItemClock(Tracker):
    """Where a thread's task is: ``(stage, index, count, since)``, read by the watchdog.

    The watchdog gives up on a task only while its clock still shows the item it judged
    late (:meth:`abandon`), and a thread moves on to its next item only while its task
    was not given up on (:meth:`begin` raises :class:`Abandoned`): under one lock, so a
    thread that finished the late item just in time never starts another item (a sink's
    side effect) that the pool has meanwhile handed to a re-run.
    """

    __slots__ = ("now", "abandoned", "handing_on", "lock")

    def __init__(self) -> None:
        self.now: tuple[int, int, int, float] = (0, -1, 0, 0.0)
        self.abandoned = False
        self.handing_on = False
        self.lock = threading.Lock()

    def begin(self, stage: int, index: int, count: int = 1) -> None:
        with self.lock:
            if self.abandoned:
                raise Abandoned()
            self.now = (stage, index, count, time.monotonic())

    def abandon(self, judged: tuple[int, int, int, float]) -> bool:
        """Mark the task abandoned if its thread is still on the ``judged`` item."""
        with self.lock:
            if self.now != judged:
                return False  # it moved on: judged again on the next tick
            self.abandoned = True
            return True


class _Running:
    """A task on its way through the pool, and whether the watchdog gave up on it."""

    __slots__ = ("task", "future", "rerun", "clock", "lock", "finished", "handed_from")

    def __init__(
        self, task: Task, future: Future[TaskResult], handed_from: _ItemClock | None = None
    ) -> None:
        self.task: Task | None = task  # None once finished: its inputs are not held after
        self.future = future
        #: the future is already running: a late item's batch-mates, re-run
        self.rerun = handed_from is not None
        #: the abandoned task's clock, ``handing_on`` until this re-run ended
        self.handed_from = handed_from
        self.clock = _ItemClock()
        self.lock = threading.Lock()
        self.finished = False  # the result was reported, or the task was abandoned


class _State:
    """Everything the pool's threads share; the threads never see the ThreadPool itself."""

    def __init__(self, name: str, floor: int | None = None) -> None:
        self.name = name
        #: self-sizing pools: fewest threads kept (None: a fixed-size pool)
        self.floor = floor
        self.size = 0  # threads that take tasks (abandoned ones excluded)
        self.idle = 0  # threads waiting for a task
        self.cpu_s = 0.0  # CPU seconds used by finished tasks, all threads together
        self.tasks_done = 0
        self.queue: queue.SimpleQueue[_Running | None] = queue.SimpleQueue()
        self.threads: list[threading.Thread] = []
        self.timed: set[_Running] = set()  # running tasks that have a timed stage
        self.running: set[_Running] = set()  # tasks a thread has started, not reported
        #: taken with ``with lock`` (a C lock: a KeyboardInterrupt cannot land between
        #: taking it and the block that releases it, as in Condition.__enter__)
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.closed = False
        self.counter = itertools.count()
        self.watchdog: threading.Thread | None = None

    def spawn(self, first: _Running | None = None) -> None:
        """Start a thread (under ``cond``); it runs ``first``, if given, before the queue."""
        self.size += 1
        t = threading.Thread(
            target=_work,
            args=(self, first),
            name=f"{self.name}-{next(self.counter)}",
            daemon=True,
        )
        self.threads.append(t)
        t.start()

    def put(self, running: _Running) -> None:
        """Queue a task; raise PoolError once the pool is closed (never queue it then).

        Under ``cond``, so a task is either queued before :meth:`close` drains the queue
        (and failed there) or refused: a submit racing ``close()`` never leaves a future
        that nothing will complete.
        """
        with self.lock:
            if self.closed:
                raise PoolError("the ThreadPool is closed; make a new pool")
            self.queue.put(running)

    def close(self) -> None:
        """Fail every unfinished task with PoolError and let the threads end.

        Queued tasks never run. A running task cannot be stopped: its future fails now,
        whatever its thread returns later is discarded, and the thread ends when the call
        returns (a journaled task still records the outputs it computed: they are right).
        """
        with self.lock:
            if self.closed:
                return
            self.closed = True
            self.cond.notify_all()
            started = list(self.running)
            self.running.clear()
        while True:  # fail what never started
            try:
                queued = self.queue.get_nowait()
            except queue.Empty:
                break
            if queued is None:
                continue
            # A re-run (the batch-mates of a late item) is already running for its future.
            if queued.rerun or queued.future.set_running_or_notify_cancel():
                _fail(queued.future, PoolError("the pool was closed before the task ran"))
        for running in started:
            with running.lock:
                if running.finished:
                    continue  # its thread is reporting it
                running.finished = True
            _fail(running.future, PoolError("the pool was closed before the task finished"))
        for _ in self.threads:
            self.queue.put(None)
        me = threading.current_thread()
        for t in self.threads:
            if t is not me:
                t.join(timeout=0.05)


def _fail(future: Future[TaskResult], error: PoolError) -> None:
    try:
        future.set_exception(error)
    except InvalidStateError:
        pass  # done meanwhile (cancelled, or its result came first)


def _work(state: _State, first: _Running | None = None) -> None:
    if first is not None:
        if not _run_one(state, first):
            return
        del first
    while True:
        with state.lock:
            state.idle += 1
        try:
            running = state.queue.get(timeout=IDLE_S) if state.floor else state.queue.get()
        except queue.Empty:
            with state.lock:
                if state.size > state.floor:  # type: ignore[operator]
                    state.idle -= 1
                    state.size -= 1
                    return  # a self-sizing pool gives back a thread it no longer needs
                state.idle -= 1
            continue
        with state.lock:
            state.idle -= 1
        if running is None:
            return
        if not _run_one(state, running):
            return
        # Hold nothing of a finished task while idle: its future's callbacks reach the
        # run (and the pool), which must stay collectable.
        del running


def _run_one(state: _State, running: _Running) -> bool:
    """Run one task; return False when this thread was abandoned and must end."""
    if not running.rerun and not running.future.set_running_or_notify_cancel():
        return True
    with state.lock:
        if state.closed:
            # close() drained the queue before this thread took the task from it.
            if running.handed_from is not None:
                running.handed_from.handing_on = False
            _fail(running.future, PoolError("the pool was closed before the task ran"))
            return False
        state.running.add(running)
    task = running.task
    assert task is not None  # only a finished task has none
    timed = any(s.timeout is not None for s in task.spec.stages)
    if timed:
        _watch(state, running)
    cpu = time.thread_time()
    try:
        result: TaskResult | None = run_task(
            task.spec,
            task.keys,
            task.values,
            task.jkeys,
            task.dirty,
            running.clock if timed else None,
        )
        error: BaseException | None = None
    except BaseException as exc:  # keep the thread alive; the task reports it
        result, error = None, exc
    if state.floor:
        cpu = time.thread_time() - cpu
        with state.lock:
            state.cpu_s += cpu
            state.tasks_done += 1
    task = None
    if running.handed_from is not None:
        running.handed_from.handing_on = False  # its items are accounted for now
    with running.lock:
        if running.finished:
            return False  # abandoned: a replacement thread already took its place
        running.finished = True
        running.task = None  # the run has the result: nothing here holds the inputs any more
    with state.lock:
        state.running.discard(running)
        state.timed.discard(running)
    if error is not None:
        running.future.set_exception(error)
    else:
        running.future.set_result(result)  # type: ignore[arg-type]
    return True


def _watch(state: _State, running: _Running) -> None:
    with state.lock:
        state.timed.add(running)
        if state.watchdog is None:
            state.watchdog = threading.Thread(
                target=_watch_loop, args=(state,), name=f"{state.name}-watchdog", daemon=True
            )
            state.watchdog.start()
        state.cond.notify()


def _watch_loop(state: _State) -> None:
    """Abandon every task whose current item overran its node's timeout."""
    while True:
        with state.lock:
            while not state.timed and not state.closed:
                state.cond.wait()
            if state.closed:
                return
            running_now = list(state.timed)
        now = time.monotonic()
        for running in running_now:
            judged = running.clock.now
            stage, index, count, since = judged
            if index < 0:
                continue
            task = running.task
            if task is None:
                continue  # finished meanwhile
            limit = task.spec.stages[stage].timeout
            if limit is None or now - since <= limit * max(1, count):
                continue
            _abandon(state, running, judged)
        time.sleep(_TICK_S)


def _abandon(state: _State, running: _Running, judged: tuple[int, int, int, float]) -> None:
    """Give up on a task whose item (``judged``: its clock when seen late) overran: fail
    that item, re-run the others on the thread that replaces this one."""
    stage, index, count, _ = judged
    with running.lock:
        if running.finished:
            return  # finished in time after all
        running.clock.handing_on = True  # before it counts as abandoned (see Tracker)
        if not running.clock.abandon(judged):
            running.clock.handing_on = False
            return  # the item ended in time after all; its thread went on
        running.finished = True
        if running.handed_from is not None:
            running.handed_from.handing_on = False  # this task's own re-run carries on
    with state.lock:
        state.timed.discard(running)
        state.running.discard(running)
    task = running.task
    assert task is not None  # finished only here, or by its thread (which then returned)
    node = task.spec.stages[stage].name
    limit = task.spec.stages[stage].timeout or 0.0
    log.warning(
        "item %r of node %r exceeded its timeout of %g s; its thread is abandoned and replaced",
        task.keys[index],
        node,
        limit,
    )
    values = list(task.values)
    late = range(index, min(len(values), index + max(1, count)))
    for i in late:
        if type(values[i]) is Failure:
            continue
        error = TimeoutError(
            f"item exceeded the node's timeout of {limit:g} s "
            "(thread abandoned; it may still be running)"
        )
        given = values[i] if stage == 0 else NO_INPUT  # a later node's input is not held
        values[i] = failure_from_exception(node, task.keys[i], error, given)
    retry = Task(task.spec, task.keys, values, task.timeout, task.jkeys, dirty=True)
    # The same future completes when the re-run does: the scheduler sees one task. The
    # thread that replaces the abandoned one runs it first, ahead of every queued task:
    # the late item's failure is recorded (a journal) and its batch-mates go on at once.
    with state.lock:
        if not state.closed:
            state.size -= 1  # the abandoned thread no longer takes tasks
            state.spawn(_Running(retry, running.future, handed_from=running.clock))
            return
    running.clock.handing_on = False
    _fail(running.future, PoolError("the pool was closed before the task finished"))


class ThreadPool(Pool):
    """Run tasks on ``workers`` threads; with no count, size the pool from its load.

    ``workers=None`` starts ``min(32, cores + 4)`` threads and grows up to
    ``MAX_AUTO_WORKERS`` while tasks wait for a thread and mostly wait on I/O themselves
    (see the module docstring); ``workers`` then reads the current size.
    """

    kind = "thread"
    item_timeouts = True

    def __init__(self, workers: int | None = None, *, name: str = "papy-thread") -> None:
        super().__init__()
        if workers is not None and workers < 1:
            raise ValueError(f"ThreadPool needs at least one worker, got {workers}")
        floor = min(32, (os.cpu_count() or 1) + 4)
        self.workers = workers or floor
        self.autoscale = workers is None
        self._state = _State(name, floor if self.autoscale else None)
        self._sampled = time.perf_counter()
        self._cpu_seen = 0.0
        self._cpu_rate = 0.0

    def _start(self) -> None:
        for _ in range(self.workers):
            self._state.spawn()
        weakref.finalize(self, self._state.close)

    def _submit(self, task: Task) -> Future[TaskResult]:
        fut: Future[TaskResult] = Future()
        state = self._state
        state.put(_Running(task, fut))
        if self.autoscale:
            now = time.perf_counter()
            with state.lock:
                if now - self._sampled >= 0.05:  # the threads' CPU use, in cores
                    self._cpu_rate = (state.cpu_s - self._cpu_seen) / (now - self._sampled)
                    self._sampled, self._cpu_seen = now, state.cpu_s
                grow = (
                    state.idle == 0
                    and state.tasks_done > 0
                    and self._cpu_rate < _CPU_BOUND
                    and state.size < MAX_AUTO_WORKERS
                    and not state.closed
                )
                if grow:
                    state.spawn()
                self.workers = state.size
        return fut

    def _close(self) -> None:
        self._state.close()

    @property
    def alive_threads(self) -> int:
        """Count the threads still running (abandoned ones included)."""
        return sum(t.is_alive() for t in self._state.threads)

    def __getstate__(self) -> Any:
        raise TypeError("a ThreadPool cannot be pickled; make pools in the driver")
