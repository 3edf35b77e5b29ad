"""The run loop: lazy input, batches, backpressure, and routing of items by key.

One :class:`Scheduler` owns all the state of a run and is the only thing that changes it.
It runs in the caller's thread, inside the generator that ``Pipeline.map`` returns, and
reads an immutable :class:`~papy._plan.Plan`. Each turn of :meth:`Scheduler.iterate`:

1. *admit* (:meth:`~Scheduler._admit`): pull input items lazily, only while fewer than the
   buffer's limit are in flight (an input item leaves the run when all its outputs reached
   every terminal);
2. *dispatch* (:meth:`~Scheduler._dispatch`): cut waiting items into batches and submit
   them to the steps' pools, oldest admitted first across the steps sharing a pool, at
   most ``prefetch`` tasks per worker in flight;
3. *wait* (:meth:`~Scheduler._wait`) on one completion queue (pools call back from their
   own threads, never touching this state), then *complete* (:meth:`~Scheduler._complete`):
   check the task's count, record statistics, and *route* (:meth:`~Scheduler._route`)
   every output by key to one-parent children, join and gather tables, and terminals;
4. *deliver*: yield the output node's results in input order from the reorder buffer.

Sizing (``_sizing``), tables (``_tables``), step queues (``_queues``), set-up and tear-down
(``_lifecycle``) live in their own modules; :class:`papy._items.ItemState` names the states.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import queue
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from papy._errors import PapyError, PoolError, RunAborted
from papy._html import HtmlReport
from papy._input import DirectInput, ThreadedInput, reader_for
from papy._interrupt import check, signal_count, trap_signals
from papy._items import NO_INPUT, Failure, ItemState, Key, child_key
from papy._lifecycle import RunScope
from papy._node import Node
from papy._observe import Observer, RunLog, Timeline
from papy._plan import Graph, Step
from papy._progress import Progress, progress_wanted
from papy._queues import StepQueue, charge_wait, completed, counts, in_flight, pick_batch
from papy._report import FailureLog, NodeStats, Report, build_report, driver_time
from papy._resume import Resume
from papy._sizing import Buffer
from papy._task import TaskResult
from papy._terminals import Terminals, deliver
from papy.pools._base import Pool, Task

log = logging.getLogger("papy")

_Done = tuple[StepQueue | None, Step | None, Sequence[Key], Future[TaskResult] | None]


class Scheduler:
    """Own and drive one run of a graph; see the module docstring for the loop.

    ``graph`` is the pipeline; ``buffer`` its item limit (None: automatic), ``workdir``
    where file helpers write (None: a private temporary directory), ``on_report`` gets
    the run's Report when the run ends. The other options are ``Pipeline.map``'s.
    """

    def __init__(
        self,
        graph: Graph,
        *,
        output: Node | None,
        errors: str,
        buffer: int | None = None,
        workdir: str | Path | None = None,
        progress: bool | None = False,
        report: str | Path | None = None,
        journal: str | Path | None = None,
        key: Callable[[Any], Any] | None = None,
        retry_failed: bool = False,
        force: bool = False,
        profile: bool = False,
        observers: Sequence[Observer] = (),
        on_report: Callable[[Report], None] | None = None,
    ) -> None:
        self.graph = graph
        self.output = output
        self.errors = errors
        self.scope = RunScope(
            graph, output, workdir=workdir, journal=journal, force=force, retry_failed=retry_failed
        )
        self._buffer_given = buffer
        self._input: DirectInput | ThreadedInput = DirectInput(())
        self._input_error: BaseException | None = None
        self.timeline = Timeline()
        self.observers: list[Observer] = [self.timeline, RunLog(profile), *observers]
        if progress_wanted(progress):
            self.observers.append(Progress())
        if report is not None:
            self.observers.append(HtmlReport(graph, report))
        self._show_profile = profile
        self._key_fn = key
        self._on_report = on_report
        self.report: Report | None = None
        self._queue: queue.SimpleQueue[_Done] = queue.SimpleQueue()
        #: tasks submitted and not completed: future -> its pool (withdrawn if the run stops)
        self._running: dict[Future[TaskResult], Pool] = {}
        self.admitted = 0
        self.resume: Resume | None = None
        self.failure_log = FailureLog([n.call for n in graph.nodes])  # for the report
        self._exhausted = False
        self.stats: dict[str, NodeStats] = {}  # read by observers, written only here
        #: the driver's seconds per activity (deliver includes the caller's loop body)
        self.profile = dict.fromkeys(("admit", "dispatch", "wait", "route", "deliver"), 0.0)
        self._started = 0.0
        self._tick_s = 0.1
        self._next_due = math.inf  # when a held partial batch falls due (monotonic s)

    @property
    def name(self) -> str:
        """Return the pipeline's name."""
        return self.graph.name

    @property
    def retired(self) -> int:
        """Return how many input items left the run (all their outputs delivered)."""
        return self.terminals.retired if self._started else 0

    @property
    def failed(self) -> int:
        """Return how many Failures reached a terminal (or were replayed from the journal)."""
        return self.terminals.failed if self._started else 0

    @property
    def skipped(self) -> int:
        """Return how many input items an earlier run finished (from the journal)."""
        return self.resume.skipped if self.resume else 0

    # -- set up and tear down --------------------------------------------------------------

    def _setup(self) -> None:
        plan = self.plan = self.scope.open()
        self.journal = self.scope.journal
        if self.journal is not None:
            self.resume = Resume(self.journal, plan, self._key_fn)
        self.terminals = Terminals(
            plan,
            self.failure_log,
            on_finish=self.resume.finished if self.resume else None,
            on_retire=self.resume.retired if self.resume else None,
            on_failed=self.resume.failed if self.resume else None,
        )
        self.queues = [StepQueue(s, plan.groups.get(s.index)) for s in plan.steps]
        self._sources = [self.queues[i] for i in plan.sources]
        self._dispatch_order = list(reversed(self.queues))  # ties: downstream first
        self._pool_out: dict[int, int] = {id(p): 0 for p in plan.pools}
        self.buffer = Buffer(self._buffer_given, plan.pools, (n.name for n in plan.order))
        for s in plan.steps:
            label = s.pool.describe()
            for n in s.nodes:
                self.stats[n.name] = NodeStats(n.name, pool=label)
        self._started = time.perf_counter()
        log.debug(
            "run of %r started: %d steps on %d pools, buffer %d",
            plan.name,
            len(plan.steps),
            len(plan.pools),
            self.buffer.limit,
        )
        for obs in self.observers:
            obs.started(self)

    def _teardown(self, error: BaseException | None) -> None:
        """Stop the input reader, withdraw queued tasks, release the scope, then report.

        Each release runs whatever the others do (:class:`~papy._lifecycle.RunScope`); a
        failing one is logged, and raised only when the run itself did not fail.
        """
        try:
            self.scope.close(
                before=[
                    self._input.close,
                    lambda: self.scope.withdraw((p, f) for f, p in self._running.items()),
                ]
            )
        except Exception as exc:
            if error is None:
                raise
            log.error("cleaning up after the run of %r failed: %r", self.name, exc)
        finally:
            while not self._queue.empty():  # results of tasks the run no longer waits for
                self._queue.get_nowait()
            self._report_run(error)

    def _report_run(self, error: BaseException | None) -> None:
        if not self._started:
            return  # set-up failed: there is no run to report on
        wall = time.perf_counter() - self._started
        if isinstance(error, RunAborted):  # the failure that stopped the run is one of them
            self.failure_log.add([error.failure])
        report = build_report(
            self.name,
            wall,
            self.admitted,
            self.failed,
            self.stats,
            {n.name: s.pool.workers for s in self.plan.steps for n in s.nodes},  # as they ended
            timeline=self.timeline.samples,
            skipped=self.skipped,
            driver=driver_time(self.profile, self.plan.pools),
            show_driver=self._show_profile,
            failures=self.failure_log,
        )
        if self.journal is not None:
            report = self.journal.annotate(report)
        self.report = report
        if self._on_report is not None:
            self._on_report(report)
        with contextlib.ExitStack() as stack:  # each observer ends whatever the others do
            for obs in reversed(self.observers):
                stack.callback(obs.finished, self, error)

    # -- the loop --------------------------------------------------------------------------

    def iterate(self, items: Iterable[Any]) -> Generator[Any, None, None]:
        """Run the pipeline over ``items``; yield the output node's results.

        An exception raised by ``items`` itself is raised here after the outputs of every
        item read before it were delivered (to sinks, the journal and the caller).
        """
        error: BaseException | None = None
        restore = trap_signals()
        seen = signal_count()  # signals the caller took while it had the outputs are its own
        try:
            self._setup()
            q = self._queue
            self._input = reader_for(items, lambda: q.put((None, None, (), None)))
            prof = self.profile
            perf = time.perf_counter
            out = self.terminals.out
            while True:
                t0 = perf()
                self._admit()
                t1 = perf()
                self._dispatch()
                t2 = perf()
                check(seen)  # a signal taken since, whose KeyboardInterrupt was lost
                prof["admit"] += t1 - t0
                prof["dispatch"] += t2 - t1
                if out:
                    _, values, positions = out.pop()
                    if self.failed and Failure in set(map(type, values)):
                        yield from deliver(values, self.errors)
                    else:
                        yield from values
                    seen = signal_count()
                    self.terminals.delivered(positions)
                    prof["deliver"] += perf() - t2
                    continue
                if self._exhausted and self.admitted == self.retired:
                    if self._input_error is not None:
                        raise self._input_error
                    return
                self._wait()
        except BaseException as exc:
            error = exc
            raise
        finally:
            try:
                self._teardown(error)
                if error is None:
                    check(seen)  # taken during the teardown, and lost there
            finally:
                restore()
                error = None  # exception -> traceback -> this frame: a cycle holding the run

    def _admit(self) -> None:
        """Take input while the buffer has room and the sources want more.

        Room counts the items granted to a background reader too, so the buffer bounds
        what was read, not only what was admitted.
        """
        if self._exhausted:
            return
        sources = self._sources
        reader = self._input
        buffer = self.buffer
        while True:
            granted = reader.granted
            room = buffer.limit - (self.admitted - self.retired) - granted
            want = (
                max(q.batch.value * q.pool.workers * q.pool.prefetch - q.ready for q in sources)
                - granted
            )
            n = min(room, max(want, 1)) if room > 0 and want > 0 else 0
            chunk = reader.read(n)
            got = len(chunk)
            if chunk:
                buffer.sample_input(chunk[0])
                keys: Sequence[int] = range(self.admitted, self.admitted + len(chunk))
                self.admitted += len(chunk)
                if self.resume is not None:
                    keys, chunk, replays = self.resume.split(keys, chunk)
                    for p, keys_out, values, failures in replays:
                        self.terminals.replayed_failures(failures)
                        if self.output is None:
                            self.terminals.skip()  # run(): nothing to yield
                        else:
                            self.terminals.replay(p, keys_out, values)
                if chunk:
                    for q in sources:
                        q.push(keys, chunk, dirty=False)
                    for obs in self.observers:
                        obs.admitted(keys, chunk)
            if reader.ended:
                self._exhausted = True
                self._input_error = reader.error
                if reader.error is not None:
                    log.warning(
                        "input of %r raised %s after %d items; finishing those first",
                        self.name,
                        type(reader.error).__name__,
                        self.admitted,
                    )
                return
            if not got or n == 0:
                return

    def _dispatch(self) -> None:
        """Submit batches while pools have room, oldest items first across all steps.

        A pool shared by several steps serves the step whose oldest waiting item was
        admitted first (ties go downstream, which drains the pipeline and keeps memory
        low), so sibling branches advance together and a join or a sink sees a steady
        stream from the start. Full batches go first, and partial batches whose first item
        has waited the pool's ``target_task_s`` (a cheap join behind busy siblings would
        otherwise hold its items until thousands gather); other partial batches only to a
        pool with an idle worker. ``_next_due`` is when the next held partial batch falls
        due, so the wait wakes up for it.
        """
        now = time.monotonic()
        next_due = math.inf
        for partial in (False, True):
            while True:
                best, size, due = pick_batch(
                    self._dispatch_order, self._pool_out, partial, now, self._exhausted
                )
                next_due = min(next_due, due)
                if best is None:
                    break
                step = best.lane()[0]  # before take(): the lane depends on what waits
                keys, values, dirty = best.take(size)
                self._submit(best, step, keys, values, dirty)
        self._next_due = next_due

    def _submit(
        self, q: StepQueue, step: Step, keys: Sequence[Key], values: list[Any], dirty: bool
    ) -> None:
        jkeys = self.resume.jkeys(keys) if self.resume and step.spec.journal else None
        task = Task(step.spec, keys, values, step.timeout, jkeys, dirty)
        q.outstanding += 1
        self._pool_out[id(q.pool)] += 1
        q.in_tasks += len(keys)
        fut = q.pool.submit(task)
        self._running[fut] = q.pool
        inbox = weakref.ref(self._queue)  # weakly: queue, entry, future, callback: a cycle
        fut.add_done_callback(functools.partial(completed, inbox, q, step, keys))

    # -- what observers read ---------------------------------------------------------------

    def counts(self) -> dict[ItemState, int]:
        """Return how many items are in each state now (see :func:`papy._queues.counts`)."""
        qs = getattr(self, "queues", ())
        finishing = self.terminals.finishing if self._started else 0
        return counts(qs, self._input.granted, finishing, self.retired)

    def in_flight(self) -> dict[str, int]:
        """Return, per node, the items waiting for it, held for it or inside its tasks."""
        return in_flight(self.queues, self.stats)

    def pool_load(self) -> dict[str, tuple[int, int]]:
        """Return, per pool label, (tasks in flight, workers): how busy each pool is."""
        return {
            p.describe(): (min(self._pool_out[id(p)], p.workers), p.workers)
            for p in self.plan.pools
        }

    def _wait(self) -> None:
        for obs in self.observers:
            obs.tick(self)
        if not any(self._pool_out.values()):
            if any(q.ready for q in self.queues):
                return  # dispatch will take them
            if self._exhausted or not self._input.granted:
                counts = ", ".join(f"{s.value} {n}" for s, n in self.counts().items())
                raise RuntimeError(
                    "papy scheduler stalled with items in flight and no work queued; this is "
                    f"a bug, please report it (admitted={self.admitted}, {counts})"
                )
        t0 = time.perf_counter()
        timeout = min(self._tick_s, max(0.0, self._next_due - time.monotonic()))
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            item = None
        waited = time.perf_counter() - t0
        self.profile["wait"] += waited
        full = self.admitted - self.retired >= self.buffer.limit and not self._exhausted
        charge_wait(self.queues, self.stats, waited, full)
        if item is None:
            return
        t1 = time.perf_counter()
        try:
            while True:
                if item[0] is not None:  # (None, ...) is the input reader's wake-up
                    self._complete(*item)  # type: ignore[arg-type]
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    return
        finally:
            self.profile["route"] += time.perf_counter() - t1

    # -- completion and routing ------------------------------------------------------------

    def _complete(
        self, q: StepQueue, step: Step, keys: Sequence[Key], fut: Future[TaskResult]
    ) -> None:
        q.outstanding -= 1
        self._pool_out[id(q.pool)] -= 1
        del self._running[fut]
        try:
            result = fut.result()
        except BaseException as exc:
            if isinstance(exc, PapyError):
                raise
            raise PoolError(
                f"pool {q.pool!r} failed running node {step.head.name!r}: {exc}"
            ) from exc
        if len(result.values) != len(keys):
            result = Task(step.spec, keys, [NO_INPUT] * len(keys)).miscounted(q.pool, result.values)
            log.error("%s", result.values[0].message)
        busy = q.task_done(step, result, len(keys), self.stats)
        values, result.values = result.values, []  # the pool's thread may hold the result
        buffer = self.buffer
        if values and buffer.auto:
            buffer.sample_task(values, result.nbytes, (n.name for n in step.nodes))
        batch = q.group_batch if step is q.group else q.batch
        batch.learn(len(keys), busy, q.pool.target_task_s, buffer.task_cap(q.pool.workers))  # type: ignore[union-attr]
        n_in, st = len(keys), result.stats
        if step.tail.scatter:
            keys, values = self._expand(step.tail.name, keys, values)
        for i, n in enumerate(step.nodes[:-1]):  # a scatter inside (a group) feeds the next
            out = st[i + (n.scatter is True)].n_in if len(st) > i + 1 else n_in
            self.stats[n.name].items_out += out
        self.stats[step.tail.name].items_out += len(keys)
        self._route(step, keys, values, result.dirty)
        for obs in self.observers:
            obs.completed(step, keys, values)

    def _expand(
        self, name: str, keys: Sequence[Key], values: list[Any]
    ) -> tuple[list[Key], list[Any]]:
        """Turn each scattered output into sub-items and announce each item's count."""
        out_keys: list[Key] = []
        out_values: list[Any] = []
        gathers = [self.queues[i] for i in self.plan.gathers_of.get(name, ())]
        terms = self.plan.terminals_of.get(name, ())
        for key, value in zip(keys, values):
            subs = [value] if type(value) is Failure else value
            n = len(subs)
            for i, sub in enumerate(subs):
                out_keys.append(child_key(key, i))
                out_values.append(sub)
            for g in gathers:
                assert g.gather is not None
                done = g.gather.expect(key, n)
                if done is not None:
                    g.push([done[0]], [done[1]], done[2])
            p = key if isinstance(key, int) else key[0]
            for t in terms:
                self.terminals.expect(t, p, n)
        return out_keys, out_values

    def _route(self, step: Step, keys: Sequence[Key], values: list[Any], dirty: bool) -> None:
        """Send a task's outputs to the step's children and, if it is one, its terminal."""
        for child, slot in step.children:
            q = self.queues[child]
            if q.gather is not None:
                for pk, value, bad in q.gather.add(keys, values):
                    q.push([pk], [value], bad)
            elif q.join is not None:
                q.push(*q.join.add(slot, keys, values))
            else:
                q.push(keys, values, dirty)
        term = self.plan.terminal_of.get(step.index)
        if term is not None:
            self.terminals.arrive(term, keys, values, dirty)
