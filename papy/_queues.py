"""A step's queue: the items waiting for it, cut into batches in admission order.

Items arrive in chunks (a batch of outputs of a parent step, a run of input items) and are
kept as those chunks, so cutting a large chunk into batches copies each item once, and a
contiguous run of keys stays a ``range`` (cheap to ship to a worker). Chunks wait in a heap
ordered by the input position of their first item, not by arrival: a parent's tasks may
finish out of order (a small batch behind a slow task in one worker, a large one done on
another), and the items admitted first must still go first, or an ordered output and a
join wait on them while the pool works on items thousands of positions later.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from papy._apply import StageStats
from papy._errors import RunAborted
from papy._items import Failure, ItemState
from papy._sizing import BatchSize
from papy._tables import GatherTable, JoinTable

if TYPE_CHECKING:
    from papy._items import Key
    from papy._plan import Step
    from papy._report import NodeStats
    from papy._task import TaskResult


def join_keys(parts: list[Sequence[Key]]) -> Sequence[Key]:
    """Concatenate key sequences, keeping contiguous ranges one range (cheap to ship)."""
    if all(isinstance(p, range) for p in parts):
        ranges: list[range] = parts  # type: ignore[assignment]
        if all(a.stop == b.start for a, b in itertools.pairwise(ranges)):
            return range(ranges[0].start, ranges[-1].stop)
    return list(itertools.chain.from_iterable(parts))


class StepQueue:
    """The scheduler's per-step state: waiting items, tasks in flight, batch size, tables.

    ``ready`` items wait (state WAITING), ``in_tasks`` items are inside ``outstanding``
    submitted tasks (state RUNNING). A join step pairs its parents' outputs in ``join``
    and a gather step regroups sub-items in ``gather`` before they wait here (state HELD).
    """

    def __init__(self, step: Step, group: Step | None = None) -> None:
        self.step = step
        #: the step running this scatter with its 1:1 nodes and gather as one task
        self.group = group
        self.group_batch = BatchSize(group) if group is not None else None
        self.pool = step.pool
        #: waiting chunks, a heap of [position of the first item, arrival number, keys,
        #: values, dirty, arrival time (monotonic s), items already taken]
        self.inbox: list[list[Any]] = []
        self._arrivals = itertools.count()
        self.ready = 0
        self.outstanding = 0
        self.in_tasks = 0
        self.batch = BatchSize(step)
        n_parents = len(step.head.parents)
        self.join = JoinTable(n_parents) if n_parents > 1 else None
        self.gather = GatherTable() if step.head.gather else None

    def lane(self) -> tuple[Step, BatchSize]:
        """Return the step the next batch runs as, and its batch size.

        A scatter with a group step runs as the group (its sub-items stay in the worker)
        while at least two items per worker wait, which keeps every worker busy; the last
        items go the plain way, so their sub-items spread over all the workers.
        """
        if self.group is not None and self.ready >= 2 * self.pool.workers:
            return self.group, self.group_batch  # type: ignore[return-value]
        return self.step, self.batch

    @property
    def held(self) -> int:
        """Return how many items wait in this step's join or gather table."""
        return len(self.join or ()) + len(self.gather or ())

    def task_done(
        self, step: Step, result: TaskResult, n: int, stats: dict[str, NodeStats]
    ) -> float:
        """Count a finished task of ``n`` items into each node's ``stats``; return busy seconds.

        Raises RunAborted with the first failure of a node that has ``on_error="raise"``;
        a task the pool failed as a whole (a crash, a timeout: no per-stage figures) counts
        against the step's first node.
        """
        self.in_tasks -= n
        values = result.values
        busy = 0.0
        # Failures a pool made outside the stages (an item or a result that could not
        # cross a process boundary) are in the values but not in the stages' figures.
        seen: dict[str, list[Failure]] = {}
        if result.dirty and result.stats:
            names = {node.name for node in step.nodes}
            for v in values:
                if type(v) is Failure and v.node in names:
                    seen.setdefault(v.node, []).append(v)
        for node, st in zip(step.nodes, result.stats):
            mine = seen.get(node.name, [])
            # some made outside the stage: count those instead
            c = st if len(mine) <= st.n_failed else _counted(mine)
            n_failed = c.n_failed
            stats[node.name].record(st.n_in, n_failed, st.busy, c.by_type, c.firsts)
            busy += st.busy
            made = n_failed - (st.replayed if c is st else 0)  # not replayed from a journal
            if made and node.on_error == "raise":
                first = st.first_failure or next(
                    (v for v in values if type(v) is Failure and v.node == node.name),
                    next((v for v in values if type(v) is Failure), None),
                )
                if first is not None:
                    raise RunAborted(first)
        if not result.stats:
            failed = [v for v in values if type(v) is Failure]
            c = _counted(failed)
            stats[step.head.name].record(n, c.n_failed, 0.0, c.by_type, c.firsts)
            if failed and any(node.on_error == "raise" for node in step.nodes):
                raise RunAborted(failed[0])
        return busy

    def push(self, keys: Sequence[Key], values: list[Any], dirty: bool = True) -> None:
        """Queue items for this step; ``dirty`` says they may include Failure values."""
        if keys:
            k = keys[0]
            position = k if isinstance(k, int) else k[0]
            chunk = [position, next(self._arrivals), keys, values, dirty, time.monotonic(), 0]
            heapq.heappush(self.inbox, chunk)
            self.ready += len(keys)

    def waiting_since(self) -> float:
        """Return when the first waiting chunk arrived (``time.monotonic()`` seconds).

        The inbox must not be empty. A partial batch whose first item has waited a task's
        target time goes to its pool like a full one, so a cheap step (a join, a sink's
        formatting) behind busy siblings never holds its items until a full batch of
        thousands has gathered.
        """
        return float(self.inbox[0][5])

    def oldest(self) -> int:
        """Return the input position of the first waiting item (the inbox must not be empty)."""
        chunk = self.inbox[0]
        key = chunk[2][chunk[6]]
        return key if isinstance(key, int) else key[0]

    def take(self, n: int) -> tuple[Sequence[Key], list[Any], bool]:
        """Cut the next ``n`` waiting items (fewer if fewer wait) off the inbox, oldest first.

        A chunk is consumed from an offset, so cutting a big chunk into batches copies each
        item once, not once per batch.
        """
        inbox = self.inbox
        key_parts: list[Sequence[Key]] = []
        value_parts: list[list[Any]] = []
        dirty = False
        got = 0
        while got < n and inbox:
            chunk = inbox[0]
            keys, values, start = chunk[2], chunk[3], chunk[6]
            dirty = dirty or chunk[4]
            want = n - got
            if len(keys) - start > want:
                chunk[6] = start + want
                keys, values = keys[start : start + want], values[start : start + want]
            else:
                heapq.heappop(inbox)
                if start:
                    keys, values = keys[start:], values[start:]
            key_parts.append(keys)
            value_parts.append(values)
            got += len(keys)
        self.ready -= got
        if len(key_parts) == 1:
            return key_parts[0], value_parts[0], dirty
        # Join several chunks once at the end (joining as we go is quadratic).
        return join_keys(key_parts), list(itertools.chain.from_iterable(value_parts)), dirty


def pick_batch(
    queues: Sequence[StepQueue],
    pool_out: dict[int, int],
    partial: bool,
    now: float,
    tail: bool = False,
) -> tuple[StepQueue | None, int, float]:
    """Choose the queue whose batch goes to its pool next; return it, the batch's size in
    items, and when the next batch held back falls due (``time.monotonic()`` seconds).

    ``queues`` in dispatch order (downstream first, so ties drain the pipeline);
    ``pool_out``: tasks in flight per ``id(pool)``; ``tail``: the input is all in (batches
    shrink toward the end, :meth:`~papy._sizing.BatchSize.tail`). A queue is eligible when
    its pool has room (``workers * prefetch`` tasks) and it holds a full batch, or
    ``partial`` is set and its pool has an idle worker, or its first item has waited the pool's
    ``target_task_s``; among those, the one whose oldest item was admitted first wins.
    """
    best: StepQueue | None = None
    best_age = best_size = 0
    next_due = math.inf
    for q in queues:
        if not q.ready:
            continue
        pool = q.pool
        out = pool_out[id(pool)]
        if out >= pool.workers * pool.prefetch:
            continue
        batch = q.lane()[1]
        size = batch.tail(q.ready, pool.workers) if tail else batch.value
        if q.ready < size and (not partial or out >= pool.workers):
            due = q.waiting_since() + pool.target_task_s
            if due > now:
                next_due = min(next_due, due)
                continue
        size = min(size, q.ready)
        age = q.oldest()
        if best is None or age < best_age:
            best, best_age, best_size = q, age, size
    return best, best_size, next_due


def in_flight(queues: Sequence[StepQueue], stats: dict[str, NodeStats]) -> dict[str, int]:
    """Return, per node, the items waiting for it, held for it or inside its tasks.

    Items inside a task of fused nodes are spread over those nodes by their share of the
    step's busy time, which is where such items actually spend their time.
    """
    out: dict[str, int] = {}
    for q in queues:
        nodes = q.step.nodes
        if len(nodes) == 1:
            out[nodes[0].name] = q.ready + q.in_tasks + q.held
            continue
        busy = [stats[n.name].busy_s for n in nodes]
        total = sum(busy)
        for i, n in enumerate(nodes):
            share = busy[i] / total if total > 0 else 1 / len(nodes)
            out[n.name] = round(q.in_tasks * share) + (q.ready + q.held if i == 0 else 0)
    return out


def charge_wait(
    queues: Sequence[StepQueue], stats: dict[str, NodeStats], waited: float, full: bool
) -> None:
    """Charge ``waited`` seconds of the driver's wait to what each step was waiting for.

    Items waiting for a worker of their pool (``wait_pool_s``); a source held back by a
    full buffer (``wait_room_s``, when ``full``); a step with nothing to do
    (``wait_input_s``).
    """
    for q in queues:
        s = stats[q.step.head.name]
        if q.ready:
            s.wait_pool_s += waited
        elif q.outstanding == 0:
            if full and q.step.head.is_source:
                s.wait_room_s += waited
            else:
                s.wait_input_s += waited


def counts(
    queues: Sequence[StepQueue], read: int, finishing: int, retired: int
) -> dict[ItemState, int]:
    """Return how many items are in each :class:`~papy._items.ItemState`.

    ``read``: items the input reader holds; ``finishing``: positions some terminals
    finished; ``retired``: input items that left. Items inside the run count once per
    sub-item and once per branch.
    """
    return {
        ItemState.READ: read,
        ItemState.WAITING: sum(q.ready for q in queues),
        ItemState.RUNNING: sum(q.in_tasks for q in queues),
        ItemState.HELD: sum(q.held for q in queues),
        ItemState.FINISHED: finishing,
        ItemState.RETIRED: retired,
    }


def completed(inbox: weakref.ref[Any], *entry: Any) -> None:
    """Queue a finished task's ``(step queue, step, keys, future)`` in ``inbox``, the
    scheduler's queue, if the run still has it (a run that ended drops late results)."""
    q = inbox()
    if q is not None:
        q.put(entry)


def _counted(failures: list[Failure]) -> StageStats:
    """Return the figures of ``failures`` made outside any stage, counted as a stage's."""
    st = StageStats()
    for f in failures:
        st.failed(f)
    return st
