"""Sizing: how many items a task carries (batch) and how many a run holds (buffer).

Both adapt to what a run measures, so users need not tune them:

- :class:`BatchSize` makes a step's tasks last about a pool's ``target_task_s`` seconds of
  work, from the time per item measured inside the workers;
- :class:`Buffer` bounds the input items in flight by an item count (the user's
  ``buffer=``, or 65,536) and, when the user gave none, by a memory budget of 256 MiB of
  inputs and outputs together, from the sizes of the items seen so far.
"""

from __future__ import annotations

import logging
import pickle
import random
import sys
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from papy._plan import Step
    from papy.pools._base import Pool

log = logging.getLogger("papy")

# Input items in flight when the user sets no buffer: enough that a pool of two holds two
# tasks of 8,192 trivial items each per worker (with 16,384, tasks of a few milliseconds
# left the workers waiting for the driver between them: W1 0.80x a fused Pool.imap, 0.91x
# with 65,536)...
DEFAULT_BUFFER = 65_536
MEMORY_BUDGET = 256 * 2**20  # ...fewer when items are large: about this many bytes
# and batches of large items stay about this size: each task costs the driver a few
# hundred microseconds, a 1 MiB copy about as much (W6 split over two process pools: 0.74 s
# with 8 MiB, 0.64 s with 16, peak RSS 246 and 263 MiB)
TASK_BYTES = 16 * 2**20
MAX_BATCH = 8_192
TAIL_SPLIT = 8  # the last tasks of a run take at least 1/TAIL_SPLIT of the target time


def _cheap_size(value: Any) -> int | None:
    """Return the bytes of an array, bytes or string without pickling it, else None."""
    try:
        nbytes = getattr(value, "nbytes", None)
    except Exception:  # a property that raises: the item's business, not the run's
        nbytes = None
    if isinstance(nbytes, int) and nbytes >= 0:
        return nbytes
    if isinstance(value, (bytes, bytearray, str)):
        return len(value)
    return None


def size_of(value: Any) -> int:
    """Return about how many bytes ``value`` holds: its pickle's length, or its shallow size.

    Pickling measures nested data (a list of arrays) that ``sys.getsizeof`` does not; it is
    done for one item per chunk, so its cost is a small share of the run.
    """
    cheap = _cheap_size(value)
    if cheap is not None:
        return cheap
    try:
        return len(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
    except Exception:
        pass
    try:
        return sys.getsizeof(value)
    except Exception:
        return 0  # an object that cannot say (a broken __sizeof__): not counted


class BatchSize:
    """A step's batch size (items per task), fixed by the user or learned from timings."""

    def __init__(self, step: Step) -> None:
        batch = step.head.batch
        self.fixed = batch is not None
        if batch is None and step.head.is_async:
            batch = step.head.concurrency  # one event loop per task: fill it
        timed = any(n.timeout is not None and not n.is_async for n in step.nodes)
        if timed and not step.pool.item_timeouts:
            batch = 1  # the pool times tasks, not items: one item per task keeps it per item
            self.fixed = True
        #: items per task now
        self.value = batch or 1
        #: smoothed seconds of work per item, None until a task finished
        self.item_time: float | None = None
        #: the fewest items a task takes once the input is all in (see :meth:`tail`)
        self.floor = self.value

    def learn(self, n: int, busy: float, target: float, cap: int) -> None:
        """Resize so a task takes about ``target`` seconds, from ``n`` items in ``busy`` s."""
        if self.fixed or n == 0:
            return
        per_item = busy / n
        self.item_time = (
            per_item if self.item_time is None else 0.7 * self.item_time + 0.3 * per_item
        )
        size = cap if self.item_time <= 0 else int(target / self.item_time)
        self.value = max(1, min(cap, size))
        floor = cap if self.item_time <= 0 else int(target / TAIL_SPLIT / self.item_time)
        self.floor = max(1, min(self.value, floor))

    def tail(self, ready: int, workers: int) -> int:
        """Return the batch once the input is all in: ``ready`` items wait for a pool of
        ``workers``.

        Guided self-scheduling: a task takes half of an even share of what waits, so tasks
        shrink as the run ends and the workers finish together, but never below an
        eighth of the target time (a task costs the driver a few hundred microseconds),
        and never more than an even share: the last items, whose cost the times
        measured so far may not predict, are spread over every worker.
        """
        if self.fixed:
            return self.value
        even = -(-ready // workers)
        return min(self.value, max(min(self.floor, even), -(-ready // (2 * workers))))


class Buffer:
    """The bound on input items in flight, in items; see the module docstring.

    ``limit`` is what admission reads. ``item_bytes`` (the larger of input and output
    bytes per item, 0 until known) also caps batches of large items at about
    ``TASK_BYTES`` per task.
    """

    def __init__(self, given: int | None, pools: Sequence[Pool], nodes: Iterable[str] = ()) -> None:
        self.auto = given is None
        self.max = given or DEFAULT_BUFFER
        self.floor = max(4, sum(p.workers * p.prefetch for p in pools))
        # Small until every node's first results show how large items are: 16 tasks'
        # worth per worker slot is enough to start every worker without admitting in bulk.
        self.start = min(self.max, 16 * self.floor)
        self.limit = self.start if self.auto else self.max
        self._unreported = set(nodes)  # nodes to hear from before the buffer opens
        self.item_bytes = 0
        self._in_bytes = 0  # largest input item seen (bytes, as pickled)
        self._out_bytes = 0  # largest output per item seen (bytes)
        self._sized = False
        self._seen = {"inputs": 0, "outputs": 0}  # chunks and unpickled tasks seen
        self._measure_s = 0.0  # seconds spent pickling items to measure them
        self._started = time.perf_counter()

    def sample_input(self, item: Any) -> None:
        """Measure one input item of a chunk admitted (when :meth:`_due`)."""
        if self.auto and self._due("inputs"):
            self._take_input(self._measure(item))

    def sample_task(self, values: Sequence[Any], nbytes: int, nodes: Iterable[str] = ()) -> None:
        """Take the outputs of a finished task that ran ``nodes`` (names): ``nbytes``
        bytes pickled in all, or 0 when nothing was pickled (a thread pool's task).

        Then one output, drawn at random, is measured: its ``nbytes`` or length when it
        has one (an array, bytes, a string), or else by pickling it when :meth:`_due`.
        """
        if self._unreported:
            self._unreported.difference_update(nodes)
            if not self._unreported:
                self._fit()  # every node has reported: the buffer may open now
        if nbytes:
            self.sample_output(nbytes // len(values))
            return
        value = values[random.randrange(len(values))]
        cheap = _cheap_size(value)
        if cheap is not None:
            self.sample_output(cheap)
        elif self._due("outputs"):
            self.sample_output(self._measure(value))

    def _due(self, what: str) -> bool:
        """Tell whether to measure the next input chunk or task output by pickling an item.

        The first 4 of each, then one in 8 while measuring has taken under 1% of the run's
        time: a thread pool whose node returns a 100,000-entry dict spent 35 ms a task
        pickling outputs to measure them.
        """
        n = self._seen[what] = self._seen[what] + 1
        if n <= 4:
            return True
        return n % 8 == 0 and self._measure_s <= 0.01 * (time.perf_counter() - self._started)

    def _measure(self, item: Any) -> int:
        t0 = time.perf_counter()
        size = size_of(item)
        self._measure_s += time.perf_counter() - t0
        return size

    def _take_input(self, size: int) -> None:
        if size > self._in_bytes:
            self._in_bytes = size
            self._fit()

    def sample_output(self, per_item: int) -> None:
        """Take the bytes per output item of a finished task."""
        if per_item > self._out_bytes or not self._sized:
            self._out_bytes = max(self._out_bytes, per_item)
            self._fit()

    def task_cap(self, workers: int) -> int:
        """Return the largest batch for a pool of ``workers``: room for two tasks each."""
        cap = max(1, min(MAX_BATCH, self.limit // max(1, 2 * workers)))
        if self.item_bytes:  # large items: keep each task's message a few megabytes
            cap = max(1, min(cap, TASK_BYTES // self.item_bytes))
        return cap

    def _fit(self) -> None:
        """Size the automatic buffer from the measured bytes of inputs and outputs.

        The budget (``MEMORY_BUDGET``) covers both: an item in flight holds its input and
        its outputs, so the buffer is the budget over their sum, at least a few tasks per
        worker slot, at most the default item count. A buffer given by the user stays an
        item count.
        """
        self._sized = True
        self.item_bytes = max(self._in_bytes, self._out_bytes)
        if not self.auto:
            return
        per_item = max(1, self._in_bytes + self._out_bytes)
        limit = min(self.max, max(self.floor, MEMORY_BUDGET // per_item))
        if self._unreported:
            # A node not heard from yet may make large outputs of small inputs (file names
            # in, arrays out): stay at the cautious start until every node has reported.
            limit = min(limit, self.start)
        self.limit = limit
        log.debug("buffer set to %d items (%d bytes per item)", self.limit, per_item)
