"""The run loop: lazy input, batches, backpressure, and routing of items by key.

One :class:`Scheduler` owns all the state of a run and is the only thing that changes it.
It runs in the caller's thread, inside the generator that ``Pipeline.map`` returns:

1. *admit*: pull input items lazily, only while fewer than ``buffer`` input items are in
   flight (an input item leaves the run when all its outputs reached every sink);
2. *dispatch*: cut each step's waiting items into batches and submit them to the step's
   pool, downstream steps first (to drain the pipeline and keep memory low), at most two
   tasks per worker in flight; a partial batch goes only to a pool with an idle worker;
3. *complete*: take finished tasks from one completion queue (pools call back from their
   own threads, never touching this state), record statistics, and route every output by
   key: straight to one-parent children, through a pairing table to joins, through a
   group table to gathers, and to the sinks;
4. *deliver*: put the output node's results back in input order (a reorder buffer keyed by
   input position) and yield them.

Pools, progress display and journal only observe; none of them reaches into this state.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import operator
import pickle
import queue
import shutil
import sys
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from papy._errors import ItemFailed, PapyError, PoolError, RunAborted
from papy._graph import Step, build_steps, scatter_stacks, topological_order
from papy._input import DirectInput, ThreadedInput, reader_for
from papy._interrupt import trap_signals
from papy._items import Failure, Key, child_key, parent_key
from papy._journal.journal import Journal
from papy._observe import Observer, Timeline
from papy._progress import Progress, progress_wanted
from papy._report import FailureLog, NodeStats, Report, build_report
from papy._rundir import check_workdir, make_run_dir
from papy._task import TaskResult
from papy.pools._base import Pool, Task

if TYPE_CHECKING:
    from papy._node import Node
    from papy._pipeline import Pipeline

log = logging.getLogger("papy")

_DEFAULT_BUFFER = 16_384  # input items in flight when the user sets no buffer...
_MEMORY_BUDGET = 256 * 2**20  # ...fewer when items are large: about this many bytes
_TASK_BYTES = 8 * 2**20  # and batches of large items stay about this size
_MAX_BATCH = 8_192


def _size_of(value: Any) -> int:
    """Return about how many bytes ``value`` holds: its pickle's length, or its shallow size.

    Pickling measures nested data (a list of arrays) that ``sys.getsizeof`` does not; it is
    done for one item per chunk, so its cost is a small share of the run.
    """
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int):
        return nbytes
    if isinstance(value, (bytes, bytearray, str)):
        return len(value)
    try:
        return len(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception:
        return sys.getsizeof(value)


def _join_keys(parts: list[Sequence[Key]]) -> Sequence[Key]:
    """Concatenate key sequences, keeping contiguous ranges one range (cheap to ship)."""
    if all(isinstance(p, range) for p in parts):
        ranges: list[range] = parts  # type: ignore[assignment]
        if all(a.stop == b.start for a, b in itertools.pairwise(ranges)):
            return range(ranges[0].start, ranges[-1].stop)
    return list(itertools.chain.from_iterable(parts))


class _StepState:
    """The scheduler's per-step bookkeeping: waiting items, tasks, batch size."""

    def __init__(self, step: Step, batch: int | None) -> None:
        self.step = step
        self.pool = step.pool
        self.inbox: deque[tuple[Sequence[Key], list[Any], bool]] = deque()
        self._offset = 0  # items of inbox[0] already taken
        self.ready = 0
        self.outstanding = 0
        self.in_tasks = 0  # items inside submitted, unfinished tasks
        self.fixed_batch = batch is not None
        if batch is None and step.head.is_async:
            batch = step.head.concurrency  # one event loop per task: fill it
        timed = any(n.timeout is not None and not n.is_async for n in step.nodes)
        if timed and not step.pool.item_timeouts:
            batch = 1  # the pool times tasks, not items: one item per task keeps it per item
            self.fixed_batch = True
        self.batch = batch or 1
        self.item_time: float | None = None
        n_parents = len(step.head.parents)
        self.join: dict[Key, list[Any]] | None = {} if n_parents > 1 else None
        self.join_missing: dict[Key, int] = {}
        self.n_parents = n_parents
        #: gather groups: parent key -> [expected count or -1, received, values by index]
        self.groups: dict[Key, list[Any]] | None = {} if step.head.gather else None

    def push(self, keys: Sequence[Key], values: list[Any], dirty: bool = True) -> None:
        """Queue items for this step; ``dirty`` says they may include Failure values."""
        if keys:
            self.inbox.append((keys, values, dirty))
            self.ready += len(keys)

    def oldest(self) -> int:
        """Return the input position of the first waiting item (the inbox must not be empty)."""
        key = self.inbox[0][0][self._offset]
        return key if isinstance(key, int) else key[0]

    def take(self, n: int) -> tuple[Sequence[Key], list[Any], bool]:
        """Cut the next ``n`` waiting items (fewer if fewer wait) off the inbox.

        The first chunk is consumed from an offset, so cutting a big chunk into batches
        copies each item once, not once per batch.
        """
        inbox = self.inbox
        keys, values, dirty = inbox[0]
        start = self._offset
        avail = len(keys) - start
        if avail > n:
            self._offset = start + n
            self.ready -= n
            return keys[start : start + n], values[start : start + n], dirty
        inbox.popleft()
        self._offset = 0
        if start:
            keys, values = keys[start:], values[start:]
        if len(keys) >= n or not inbox:
            self.ready -= len(keys)
            return keys, values, dirty
        # Gather several chunks; join them once at the end (joining as we go is quadratic).
        key_parts, value_parts, got = [keys], [values], len(keys)
        while got < n and inbox:
            k2, v2, d2 = inbox[0]
            want = n - got
            if len(k2) > want:
                self._offset = want
                k2, v2 = k2[:want], v2[:want]
            else:
                inbox.popleft()
            key_parts.append(k2)
            value_parts.append(v2)
            got += len(k2)
            dirty = dirty or d2
        self.ready -= got
        return _join_keys(key_parts), list(itertools.chain.from_iterable(value_parts)), dirty

    def learn(self, n: int, busy: float, target: float, cap: int) -> None:
        """Resize the batch so a task takes about ``target`` seconds of work."""
        if self.fixed_batch or n == 0:
            return
        per_item = busy / n
        self.item_time = (
            per_item if self.item_time is None else 0.7 * self.item_time + 0.3 * per_item
        )
        size = cap if self.item_time <= 0 else int(target / self.item_time)
        self.batch = max(1, min(cap, size))


class _Terminal:
    """A node whose outputs leave the run: a sink, or the output ``map`` yields."""

    def __init__(self, node: Node, stack: tuple[str, ...], is_output: bool) -> None:
        self.node = node
        self.stack = stack
        self.top_level = not stack
        self.is_output = is_output
        self.need: dict[int, int] = {}
        self.groups: dict[int, list[tuple[Key, Any]]] = {}


class Scheduler:
    """Own and drive one run of a pipeline; see the module docstring for the loop."""

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        output: Node | None,
        errors: str,
        progress: bool | None = False,
        report: str | Path | None = None,
        journal: str | Path | None = None,
        key: Callable[[Any], Any] | None = None,
        retry_failed: bool = False,
        force: bool = False,
        profile: bool = False,
        observers: Sequence[Observer] = (),
    ) -> None:
        self.pipeline = pipeline
        self.output = output
        self.errors = errors
        self.progress = progress
        self.buffer = pipeline.buffer or _DEFAULT_BUFFER
        # With no buffer given, large items shrink it: about _MEMORY_BUDGET bytes of outputs
        # in flight, measured from the results as they arrive.
        self._auto_buffer = pipeline.buffer is None
        self._max_buffer = self.buffer
        self._item_bytes = 0  # the larger of input and output bytes per item
        self._in_bytes = 0  # largest input item seen (bytes, as pickled)
        self._out_bytes = 0  # largest output per item seen (bytes)
        self._sized = False  # the automatic buffer starts small until sizes are known
        self._input: DirectInput | ThreadedInput = DirectInput(())
        self._input_error: BaseException | None = None
        self.observers: list[Observer] = [Timeline(), *observers]
        if progress_wanted(progress):
            self.observers.append(Progress())
        self.report_path = report
        self._show_profile = profile
        self._journal_path = journal
        self._key_fn = key
        self._retry_failed = retry_failed
        self._force = force
        self.journal: Journal | None = None
        self.skipped = 0
        self._jkey_of: dict[int, str] = {}
        self.report: Report | None = None
        self._own_pools: list[Pool] = []
        self._queue: queue.SimpleQueue[tuple[_StepState, Sequence[Key], Future[TaskResult]]] = (
            queue.SimpleQueue()
        )
        self.admitted = 0
        self.retired = 0
        self.failed = 0
        self.failure_log = FailureLog([n.call for n in pipeline.nodes])  # for the report
        self._exhausted = False
        self.stats: dict[str, NodeStats] = {}  # read by observers, written only here
        #: where the driver's time went, in seconds: admitting input, dispatching
        #: batches, waiting for results, routing them, delivering outputs (this includes
        #: the caller's own loop body, which runs between two yields)
        self.profile: dict[str, float] = dict.fromkeys(
            ("admit", "dispatch", "wait", "route", "deliver"), 0.0
        )
        self._started = 0.0
        self.run_dir: str | None = None
        self._remove_run_dir = False
        self.timeline = next((o for o in self.observers if isinstance(o, Timeline)), None)
        self._tick_s = 0.1

    # -- set up and tear down --------------------------------------------------------------

    def _setup(self) -> None:
        pipe = self.pipeline
        order = topological_order(pipe.nodes)
        default: Pool | None = pipe.pool
        pools: dict[str, Pool] = {}
        for n in order:
            pool = n.pool or default
            if pool is None:
                from papy.pools.process import ProcessPool

                default = pool = ProcessPool()
                self._own_pools.append(pool)
            pools[n.name] = pool
        keep = {self.output.name} if self.output is not None else set()
        private = True
        if pipe.workdir is not None:
            self.run_dir, private = check_workdir(pipe.workdir)
        else:
            self.run_dir = make_run_dir()  # mode 0700, not redirectable by a planted link
            self._remove_run_dir = True
        self.steps = build_steps(order, pools, keep, self.run_dir)
        for s in self.steps:
            s.spec.private = private
        terminals = {n.name: n for n in order if n.is_sink or n is self.output}
        stacks_out = scatter_stacks(order)
        if self._journal_path is not None:
            self.journal = Journal(
                self._journal_path,
                pipe.nodes,
                pipe.name,
                force=self._force,
                retry_failed=self._retry_failed,
            )
            self.journal.specs(self.steps, terminals)
            self._journal_terms = {
                name: not stacks_out[name] and not t.scatter for name, t in terminals.items()
            }
        for p in {id(p): p for p in pools.values()}.values():
            if p.closed:
                raise PoolError(f"{p!r} is closed; make a new pool for this run")
            p.start()
        self.states = [_StepState(s, s.head.batch) for s in self.steps]
        self._state_of = {id(s): st for s, st in zip(self.steps, self.states)}
        self._pool_out: dict[int, int] = {id(p): 0 for p in pools.values()}
        self._pools = {id(p): p for p in pools.values()}
        self._sources = [st for st in self.states if not st.step.head.parents]
        self._dispatch_order = list(reversed(self.states))  # ties: downstream first
        stacks = {}
        for s in self.steps:
            for i, n in enumerate(s.nodes):
                stacks[n.name] = s.out_stack if i == len(s.nodes) - 1 else s.in_stack
        # Terminals: every sink, plus the requested output node.
        self.terminals: dict[str, _Terminal] = {}
        for n in order:
            if n.is_sink or n is self.output:
                self.terminals[n.name] = _Terminal(n, stacks[n.name], n is self.output)
        self._term_of_step = {
            id(s): self.terminals[s.tail.name] for s in self.steps if s.tail.name in self.terminals
        }
        self._done_count: dict[int, int] = {}
        # Who must hear about a scatter's size: gathers closing it, terminals below it.
        self._scatter_gathers: dict[str, list[_StepState]] = {}
        for st in self.states:
            if st.groups is not None:
                closes = st.step.in_stack[-1]
                self._scatter_gathers.setdefault(closes, []).append(st)
        self._scatter_terms: dict[str, list[_Terminal]] = {}
        for t in self.terminals.values():
            for scatter_name in t.stack:
                self._scatter_terms.setdefault(scatter_name, []).append(t)
        # Output ordering.
        self._ordered = self.output is None or self.output.ordered
        self._out_queue: deque[tuple[Sequence[Key], list[Any], Sequence[int]]] = deque()
        self._pending_out: dict[int, tuple[Sequence[Key], list[Any], Sequence[int]]] = {}
        self._next_out = 0
        for s in self.steps:
            label = s.pool.describe()
            for n in s.nodes:
                self.stats[n.name] = NodeStats(n.name, pool=label)
        self._workers = {n.name: s.pool.workers for s in self.steps for n in s.nodes}
        if self._auto_buffer:
            # Small until the first results show how large items are: 16 tasks' worth per
            # worker slot is enough to start every worker without admitting in bulk.
            self.buffer = min(self._max_buffer, 16 * self._buffer_floor())
        self._started = time.perf_counter()
        log.debug(
            "run of %r started: %d steps on %d pools, buffer %d",
            pipe.name,
            len(self.steps),
            len(self._pools),
            self.buffer,
        )
        for obs in self.observers:
            obs.started(self)

    def _teardown(self, error: BaseException | None) -> None:
        """Release everything the run holds; each step runs whatever the others do.

        One failing step (a pool that cannot be closed, a journal on a vanished disk) is
        logged and does not keep the others from running; the first such error is raised
        at the end when the run itself did not fail.
        """
        try:
            self._release(error)
        except Exception as exc:
            if error is None:
                raise
            log.error("cleaning up after the run of %r failed: %r", self.pipeline.name, exc)

    def _release(self, error: BaseException | None) -> None:
        with contextlib.ExitStack() as stack:
            stack.callback(self._report_run, error)
            if self._remove_run_dir and self.run_dir:
                stack.callback(shutil.rmtree, self.run_dir, ignore_errors=True)
            if self.journal is not None:
                stack.callback(self.journal.close)
            for pool in self._own_pools:
                stack.callback(pool.close)
            spec_ids = [s.spec.id for s in getattr(self, "steps", ())]
            for pool in {id(p): p for p in getattr(self, "_pools", {}).values()}.values():
                if pool not in self._own_pools:
                    stack.callback(pool.release, spec_ids)
            stack.callback(self._input.close)

    def _report_run(self, error: BaseException | None) -> None:
        if not self._started:
            return  # set-up failed: there is no run to report on
        wall = time.perf_counter() - self._started
        if isinstance(error, RunAborted):  # the failure that stopped the run is one of them
            self.failure_log.add([error.failure])
        self.report = build_report(
            self.pipeline.name,
            wall,
            self.admitted,
            self.failed,
            self.stats,
            {n.name: s.pool.workers for s in self.steps for n in s.nodes},  # as they ended
            timeline=self.timeline.samples if self.timeline else None,
            skipped=self.skipped,
            driver=self._driver_profile(),
            show_driver=self._show_profile,
            failures=self.failure_log,
        )
        if self.journal is not None:
            self.report = self.journal.annotate(self.report)
        if self._show_profile:
            log.info(
                "driver time of %r: %s",
                self.pipeline.name,
                ", ".join(f"{k} {v:.3f} s" for k, v in self.report.driver.items()),
            )
        self.pipeline.last_report = self.report
        if error is None:
            log.info(
                "run of %r finished: %d items, %d failed, %d from the journal, %.2f s",
                self.pipeline.name,
                self.admitted,
                self.failed,
                self.skipped,
                wall,
            )
        else:
            log.warning("run of %r stopped: %s", self.pipeline.name, type(error).__name__)
        for obs in self.observers:
            obs.finished(self, error)
        if self.report_path is not None:
            from papy._html import write_html

            write_html(self.pipeline, self.report, self.report_path)

    # -- the loop --------------------------------------------------------------------------

    def iterate(self, items: Iterable[Any]) -> Generator[Any, None, None]:
        """Run the pipeline over ``items``; yield the output node's results.

        An exception raised by ``items`` itself is raised here after the outputs of every
        item read before it were delivered (to sinks, the journal and the caller).
        """
        error: BaseException | None = None
        restore = trap_signals()
        try:
            self._setup()
            q = self._queue
            self._input = reader_for(items, lambda: q.put((None, (), None)))  # type: ignore[arg-type]
            prof = self.profile
            perf = time.perf_counter
            while True:
                t0 = perf()
                self._admit()
                t1 = perf()
                self._dispatch()
                t2 = perf()
                prof["admit"] += t1 - t0
                prof["dispatch"] += t2 - t1
                if self._out_queue:
                    _, values, positions = self._out_queue.popleft()
                    if self.failed and Failure in set(map(type, values)):
                        yield from self._deliver(values)
                    else:
                        yield from values
                    self._retire_output(positions)
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
            finally:
                restore()

    def _deliver(self, values: list[Any]) -> Iterator[Any]:
        errors = self.errors
        for v in values:
            if type(v) is Failure:
                if errors == "raise":
                    raise ItemFailed(v)
                if errors == "yield":
                    yield v
            else:
                yield v

    def _admit(self) -> None:
        """Take input while the buffer has room and the sources want more.

        Room counts the items granted to a background reader too, so the buffer bounds
        what was read, not only what was admitted.
        """
        if self._exhausted:
            return
        sources = self._sources
        reader = self._input
        while True:
            granted = reader.granted
            room = self.buffer - (self.admitted - self.retired) - granted
            want = (
                max(st.batch * st.pool.workers * st.pool.prefetch - st.ready for st in sources)
                - granted
            )
            n = min(room, max(want, 1)) if room > 0 and want > 0 else 0
            chunk = reader.read(n)
            got = len(chunk)
            if chunk:
                self._sample_input(chunk[0])
                keys: Sequence[int] = range(self.admitted, self.admitted + len(chunk))
                self.admitted += len(chunk)
                if self.journal is not None:
                    keys, chunk = self._resume(keys, chunk)
                if chunk:
                    for st in sources:
                        st.push(keys, chunk, dirty=False)
                    for obs in self.observers:
                        obs.admitted(keys, chunk)
            if reader.ended:
                self._exhausted = True
                self._input_error = reader.error
                if reader.error is not None:
                    log.warning(
                        "input of %r raised %s after %d items; finishing those first",
                        self.pipeline.name,
                        type(reader.error).__name__,
                        self.admitted,
                    )
                return
            if not got or n == 0:
                return

    def _sample_input(self, item: Any) -> None:
        """Measure the bytes of one input item of each chunk, for the automatic buffer."""
        if not self._auto_buffer:
            return
        size = _size_of(item)
        if size > self._in_bytes:
            self._in_bytes = size
            self._fit_buffer(self._out_bytes)

    def _resume(self, keys: Sequence[int], chunk: list[Any]) -> tuple[list[int], list[Any]]:
        """Skip the items an earlier run finished; replay their outputs; key the others."""
        assert self.journal is not None
        jkeys = self.journal.identify(chunk, self._key_fn)  # by content, or by key=
        done = self.journal.finished(jkeys, self._journal_terms)
        if not done:  # nothing to skip: keep the chunk as it is (a range stays a range)
            self._jkey_of.update(zip(keys, jkeys))
            return keys, chunk  # type: ignore[return-value]
        run_keys: list[int] = []
        run_values: list[Any] = []
        for p, jk, value in zip(keys, jkeys, chunk):
            if jk not in done:
                self._jkey_of[p] = jk
                run_keys.append(p)
                run_values.append(value)
                continue
            self.skipped += 1
            out = self.output
            if out is None:
                self._retire(1)
                continue
            values = self.journal.outputs(out.name, jk)
            self.failed += sum(1 for v in values if type(v) is Failure)
            self.failure_log.add(values)
            if out.scatter:
                values = [x for v in values for x in ([v] if type(v) is Failure else v)]
            if not self.terminals[out.name].top_level:
                keys_out: list[Key] = [(p, i) for i in range(len(values))]
            else:
                keys_out = [p]
            # The other terminals finished this item in the earlier run: count them done,
            # so the output's delivery retires it through the usual path.
            for t in self.terminals.values():
                if not t.is_output:
                    self._position_done(p)
            self._queue_output(keys_out, values, [p])
        return run_keys, run_values

    def _jkeys(self, keys: Sequence[Key]) -> list[tuple[str, str]]:
        assert self.journal is not None
        self.journal.check()  # stops the run if the journal was removed or replaced
        out = []
        jkey_of = self._jkey_of
        for k in keys:
            if isinstance(k, int):
                out.append((jkey_of[k], ""))
            else:
                out.append((jkey_of[k[0]], ".".join(str(i) for i in k[1:])))
        return out

    def _dispatch(self) -> None:
        """Submit batches while pools have room, oldest items first across all steps.

        A pool shared by several steps serves the step whose oldest waiting item was
        admitted first (ties go downstream, which drains the pipeline and keeps memory
        low), so sibling branches advance together and a join or a sink sees a steady
        stream from the start. Full batches go first; a partial batch only to a pool with
        an idle worker.
        """
        pool_out = self._pool_out
        states = self._dispatch_order
        for partial in (False, True):
            while True:
                best: _StepState | None = None
                best_age = 0
                for st in states:
                    if not st.ready:
                        continue
                    pool = st.pool
                    out = pool_out[id(pool)]
                    if out >= pool.workers * pool.prefetch:
                        continue
                    if st.ready < st.batch and (not partial or out >= pool.workers):
                        continue
                    age = st.oldest()
                    if best is None or age < best_age:
                        best, best_age = st, age
                if best is None:
                    break
                keys, values, dirty = best.take(min(best.batch, best.ready))
                self._submit(best, keys, values, dirty)

    def _submit(self, st: _StepState, keys: Sequence[Key], values: list[Any], dirty: bool) -> None:
        jkeys = self._jkeys(keys) if st.step.spec.journal is not None else None
        task = Task(st.step.spec, keys, values, st.step.timeout, jkeys, dirty)
        st.outstanding += 1
        self._pool_out[id(st.pool)] += 1
        st.in_tasks += len(keys)
        fut = st.pool.submit(task)
        q = self._queue
        fut.add_done_callback(lambda f: q.put((st, keys, f)))

    def _driver_profile(self) -> dict[str, float]:
        prof = dict(self.profile)
        for pool in {id(p): p for p in self._pools.values()}.values():
            for name, seconds in getattr(pool, "codec_seconds", dict)().items():
                prof[name] = prof.get(name, 0.0) + seconds
        return prof

    def in_flight(self) -> dict[str, int]:
        """Return, per node, the items waiting for it or inside its tasks right now.

        Items inside a task of fused nodes are spread over those nodes by their share of the
        step's busy time, which is where such items actually spend their time.
        """
        out: dict[str, int] = {}
        for st in self.states:
            nodes = st.step.nodes
            if len(nodes) == 1:
                out[nodes[0].name] = st.ready + st.in_tasks
                continue
            busy = [self.stats[n.name].busy_s for n in nodes]
            total = sum(busy)
            for i, n in enumerate(nodes):
                share = busy[i] / total if total > 0 else 1 / len(nodes)
                out[n.name] = round(st.in_tasks * share) + (st.ready if i == 0 else 0)
        for st in self.states:  # join and gather tables hold items too
            held = len(st.join or ()) + len(st.groups or ())
            if held:
                out[st.step.head.name] += held
        return out

    def pool_load(self) -> dict[str, tuple[int, int]]:
        """Return, per pool label, (tasks in flight, workers): how busy each pool is."""
        out: dict[str, tuple[int, int]] = {}
        for pid, pool in self._pools.items():
            out[pool.describe()] = (min(self._pool_out[pid], pool.workers), pool.workers)
        return out

    def _wait(self) -> None:
        for obs in self.observers:
            obs.tick(self)
        if not any(self._pool_out.values()):
            if any(st.ready for st in self.states):
                return  # dispatch will take them
            if not self._exhausted and self._input.granted:
                pass  # the input is being read: wait for it
            else:
                raise RuntimeError(
                    "papy scheduler stalled with items in flight and no work queued; this is "
                    f"a bug, please report it (admitted={self.admitted}, "
                    f"retired={self.retired})"
                )
        t0 = time.perf_counter()
        try:
            item = self._queue.get(timeout=self._tick_s)
        except queue.Empty:
            item = None
        waited = time.perf_counter() - t0
        self.profile["wait"] += waited
        full = self.admitted - self.retired >= self.buffer and not self._exhausted
        for st in self.states:
            if st.ready:
                # Items wait for a worker of their pool.
                self.stats[st.step.head.name].wait_pool_s += waited
            elif st.outstanding == 0:
                if full and st.step.head.is_source:
                    self.stats[st.step.head.name].wait_room_s += waited
                else:
                    self.stats[st.step.head.name].wait_input_s += waited
        if item is None:
            return
        t1 = time.perf_counter()
        try:
            if item[0] is not None:  # (None, ...) is the input reader's wake-up
                self._complete(*item)
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    return
                if item[0] is not None:
                    self._complete(*item)
        finally:
            self.profile["route"] += time.perf_counter() - t1

    # -- completion and routing ------------------------------------------------------------

    def _complete(self, st: _StepState, keys: Sequence[Key], fut: Future[TaskResult]) -> None:
        st.outstanding -= 1
        self._pool_out[id(st.pool)] -= 1
        step = st.step
        try:
            result = fut.result()
        except BaseException as exc:
            if isinstance(exc, PapyError):
                raise
            raise PoolError(
                f"pool {st.pool!r} failed running node {step.head.name!r}: {exc}"
            ) from exc
        values = result.values
        if len(values) != len(keys):
            result = self._miscounted(st, keys, values)
            values = result.values
        busy = 0.0
        for n, s in zip(step.nodes, result.stats):
            ns = self.stats[n.name]
            ns.record(s.n_in, s.n_failed, s.busy)
            busy += s.busy
            if s.n_failed and n.on_error == "raise":
                raise RunAborted(
                    s.first_failure
                    or next(v for v in values if type(v) is Failure and v.node == n.name)
                )
        st.in_tasks -= len(keys)
        if not result.stats:  # the pool failed the task as a whole (timeout, crash)
            failed = [v for v in values if type(v) is Failure]
            self.stats[step.head.name].record(len(keys), len(failed), 0.0)
            for n in step.nodes:
                if n.on_error == "raise" and failed:
                    raise RunAborted(failed[0])
        if values and self._auto_buffer:
            per_item = result.nbytes // len(values) if result.nbytes else _size_of(values[0])
            if per_item > self._out_bytes or not self._sized:
                self._out_bytes = max(self._out_bytes, per_item)
                self._fit_buffer(self._out_bytes)
        target = st.pool.target_task_s
        if self._exhausted:
            target /= 4  # the input is all in: smaller last tasks even out the workers' ends
        cap = max(1, min(_MAX_BATCH, self.buffer // max(1, 2 * st.pool.workers)))
        if self._item_bytes:  # large items: keep each task's message a few megabytes
            cap = max(1, min(cap, _TASK_BYTES // self._item_bytes))
        st.learn(len(keys), busy, target, cap)
        tail = step.tail
        n_in = len(keys)
        if tail.scatter:
            keys, values = self._expand(tail.name, keys, values)
        for n in step.nodes[:-1]:  # 1:1 nodes: a scatter always ends its step
            self.stats[n.name].items_out += n_in
        self.stats[tail.name].items_out += len(keys)
        for child, slot in step.children:
            self._route(self._state_of[id(child)], slot, keys, values, result.dirty)
        term = self._term_of_step.get(id(step))
        if term is not None:
            self._arrive(term, keys, values, result.dirty)
        for obs in self.observers:
            obs.completed(step, keys, values)

    def _miscounted(self, st: _StepState, keys: Sequence[Key], values: list[Any]) -> TaskResult:
        """Fail every item of a task whose pool did not return one value per item.

        Which output belongs to which item cannot be known then, so none is trusted.
        """
        node = st.step.head.name
        error = PoolError(
            f"pool {st.pool.describe()} returned {len(values)} results for {len(keys)} items "
            f"of node {node!r}; none of them can be trusted"
        )
        log.error("%s", error)
        task = Task(st.step.spec, keys, [None] * len(keys))
        return task.fail_all(error, node)

    def _buffer_floor(self) -> int:
        return max(4, sum(p.workers * p.prefetch for p in self._pools.values()))

    def _fit_buffer(self, out_bytes: int) -> None:
        """Size the automatic buffer from the measured bytes of inputs and outputs.

        The budget (``_MEMORY_BUDGET``, 256 MiB) covers both: an item in flight holds its
        input and its outputs, so the buffer is the budget over their sum. It starts at a
        few dozen items per worker (nothing is known yet), then follows the largest sizes
        seen, at most the default item count. A buffer given by the user stays an item
        count.
        """
        self._sized = True
        self._item_bytes = max(self._in_bytes, out_bytes)
        if not self._auto_buffer:
            return
        per_item = max(1, self._in_bytes + out_bytes)
        fitted = max(self._buffer_floor(), _MEMORY_BUDGET // per_item)
        self.buffer = min(self._max_buffer, fitted)
        log.debug("buffer set to %d items (%d bytes per item)", self.buffer, per_item)

    def _expand(
        self, name: str, keys: Sequence[Key], values: list[Any]
    ) -> tuple[list[Key], list[Any]]:
        """Turn each scattered output into sub-items and announce each item's count."""
        out_keys: list[Key] = []
        out_values: list[Any] = []
        gathers = self._scatter_gathers.get(name, ())
        terms = self._scatter_terms.get(name, ())
        for key, value in zip(keys, values):
            subs = [value] if type(value) is Failure else value
            n = len(subs)
            for i, sub in enumerate(subs):
                out_keys.append(child_key(key, i))
                out_values.append(sub)
            for g in gathers:
                self._expect(g, key, n)
            for t in terms:
                p = key if isinstance(key, int) else key[0]
                need = t.need.get(p, 1) + n - 1
                t.need[p] = need
                if need == 0:
                    self._finish_terminal(t, p)
        return out_keys, out_values

    def _expect(self, st: _StepState, key: Key, n: int) -> None:
        groups = st.groups
        assert groups is not None
        group = groups.get(key)
        if group is None:
            groups[key] = group = [n, 0, [None] * n]
        else:
            group[0] = n
            group[2].extend([None] * (n - len(group[2])))
        if group[1] == n:
            self._gathered(st, key, group)

    def _gathered(self, st: _StepState, key: Key, group: list[Any]) -> None:
        del st.groups[key]  # type: ignore[union-attr]
        subs = group[2]
        value = next((v for v in subs if type(v) is Failure), subs)
        st.push([key], [value], dirty=value is not subs)

    def _route(
        self, st: _StepState, slot: int, keys: Sequence[Key], values: list[Any], dirty: bool
    ) -> None:
        if st.groups is not None:
            groups = st.groups
            for key, value in zip(keys, values):
                pk = parent_key(key)  # type: ignore[arg-type]
                idx = key[-1]  # type: ignore[index]
                group = groups.get(pk)
                if group is None:  # the count is not known yet (cannot happen; be safe)
                    groups[pk] = group = [-1, 0, []]
                subs = group[2]
                if idx >= len(subs):
                    subs.extend([None] * (idx + 1 - len(subs)))
                subs[idx] = value
                group[1] += 1
                if group[1] == group[0]:
                    self._gathered(st, pk, group)
        elif st.join is not None:
            table, missing = st.join, st.join_missing
            out_keys: list[Key] = []
            out_values: list[Any] = []
            joined_dirty = False
            for key, value in zip(keys, values):
                slots = table.get(key)
                if slots is None:
                    table[key] = slots = [None] * st.n_parents
                    missing[key] = st.n_parents
                slots[slot] = value
                missing[key] -= 1
                if missing[key] == 0:
                    del table[key], missing[key]
                    out_keys.append(key)
                    bad = next((v for v in slots if type(v) is Failure), None)
                    out_values.append(bad or tuple(slots))
                    joined_dirty = joined_dirty or bad is not None
            if out_keys:
                st.push(out_keys, out_values, joined_dirty)
        else:
            st.push(keys, values, dirty)

    # -- terminals, output order, retirement -----------------------------------------------

    def _arrive(self, t: _Terminal, keys: Sequence[Key], values: list[Any], dirty: bool) -> None:
        if dirty and Failure in set(map(type, values)):
            self.failed += sum(1 for v in values if type(v) is Failure)
            self.failure_log.add(values)
        if t.top_level:
            if t.is_output:
                self._queue_output(keys, values, keys)  # type: ignore[arg-type]
            else:
                for p in keys:
                    self._position_done(p)  # type: ignore[arg-type]
            return
        for key, value in zip(keys, values):
            p = key if isinstance(key, int) else key[0]
            if t.is_output:
                t.groups.setdefault(p, []).append((key, value))
            need = t.need.get(p, 1) - 1
            t.need[p] = need
            if need == 0:
                self._finish_terminal(t, p)

    def _finish_terminal(self, t: _Terminal, p: int) -> None:
        del t.need[p]
        if self.journal is not None and p in self._jkey_of:
            self.journal.mark_complete(t.node.name, self._jkey_of[p])
        if t.is_output:
            group = sorted(t.groups.pop(p, []), key=lambda kv: kv[0])
            self._queue_output([k for k, _ in group], [v for _, v in group], [p])
        else:
            self._position_done(p)

    def _queue_output(
        self, keys: Sequence[Key], values: list[Any], positions: Sequence[int]
    ) -> None:
        if not self._ordered:
            self._out_queue.append((keys, values, positions))
            return
        pending = self._pending_out
        if isinstance(positions, range) or len(positions) == 1:
            # A contiguous run (straight from the source) or one position's group.
            pending[positions[0]] = (keys, values, positions)
        elif positions[-1] - positions[0] == len(positions) - 1 and all(
            map(operator.lt, positions, itertools.islice(positions, 1, None))
        ):
            # Ascending and contiguous (the usual case): file it as one run.
            run = range(positions[0], positions[-1] + 1)
            pending[positions[0]] = (keys, values, run)
        else:
            # Keys after a join or a gather come in any order: file each position alone.
            for k, v in zip(keys, values):
                pending[k] = ([k], [v], [k])  # type: ignore[index,list-item]
        self._flush_pending()

    def _flush_pending(self) -> None:
        pending = self._pending_out
        while self._next_out in pending:
            keys, values, positions = pending.pop(self._next_out)
            self._out_queue.append((keys, values, positions))
            self._next_out = positions[-1] + 1

    def _retire_output(self, positions: Sequence[int]) -> None:
        if len(self.terminals) == 1:
            self._retire(len(positions))
            if self._jkey_of:
                for p in positions:
                    self._jkey_of.pop(p, None)
        else:
            for p in positions:
                self._position_done(p)

    def _position_done(self, p: int) -> None:
        if len(self.terminals) == 1:
            self._retire(1)
            self._jkey_of.pop(p, None)
            return
        c = self._done_count.get(p, 0) + 1
        if c == len(self.terminals):
            del self._done_count[p]
            self._retire(1)
            self._jkey_of.pop(p, None)
        else:
            self._done_count[p] = c

    def _retire(self, n: int) -> None:
        self.retired += n


class RunIterator(Iterator[Any]):
    """The lazy outputs of a run, as returned by ``Pipeline.map``.

    Iterate it like any iterator. ``report`` holds the run's :class:`~papy.Report` once the
    run ended (exhausted, failed, or closed); ``close()`` stops the run early and frees the
    pools the pipeline made (also done when the iterator is garbage-collected).
    """

    def __init__(self, sched: Scheduler, items: Iterable[Any]) -> None:
        self._sched = sched
        self._gen = sched.iterate(items)

    def __iter__(self) -> RunIterator:
        return self

    def __next__(self) -> Any:
        return next(self._gen)

    def close(self) -> None:
        """Stop the run now; idempotent."""
        self._gen.close()

    @property
    def report(self) -> Report | None:
        """Return the run's Report, or None while it is still running."""
        return self._sched.report

    def __enter__(self) -> RunIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
