"""A worker's slot: which item of which stage it runs, and since when, in shared memory.

The worker writes it (:class:`SlotTracker`), the driver reads it without asking the worker
(:func:`read_slot`), to enforce per-item timeouts and to name the item that killed a worker.
"""

from __future__ import annotations

import signal
import time
from typing import Any

from papy._task import Tracker

#: layout of a worker's slot (doubles): sequence, job id, stage, index, count, start time;
#: then the claim protocol's fields: the last job the worker took up (``SEEN``) and two
#: jobs the driver withdrew (``WITHDRAWN``), written only under the slot's lock; then the
#: signal the worker ended itself on (``EXIT``: 0 while it lives)
SLOT_SIZE = 10
SEQ, JOB, STAGE, INDEX, COUNT, START, SEEN, W0, W1, EXIT = range(SLOT_SIZE)
WITHDRAWN = (W0, W1)
IDLE = -2.0  # INDEX when no task runs
UNBORN = -3.0  # INDEX until the worker has started (imported, initialized)
#: STAGE while a tracked task's item is rebuilt from its pickle, before any node sees it
REBUILD = -2
#: STAGE while a tracked task's item's result is pickled, after its last node
SEND = -3


class SlotTracker(Tracker):
    """Publish (job, stage, item, start time) to shared memory before each tracked item.

    The driver reads it without asking the worker: ``time.monotonic()`` is system-wide on
    Linux (CLOCK_MONOTONIC), so the start time means the same on both sides. A sequence
    number, odd while a write is in progress, lets the reader discard a torn read.
    Costs about a microsecond per call; the engine only calls it per item for stages with a
    ``timeout`` or for a batch that already killed a worker once.
    """

    def __init__(self, slot: Any, lock: Any = None) -> None:
        self.slot = slot
        self.lock = lock  # the slot's claim lock, shared with the driver

    def claim(self, job_id: int) -> bool:
        """Take up job ``job_id`` before starting it; False if the driver withdrew it.

        Under the slot's lock, so the driver's :func:`withdraw` and this never both win:
        a job either starts here or is withdrawn there.
        """
        s = self.slot
        if self.lock is None:
            s[SEEN] = job_id
            return True
        with self.lock:
            s[SEEN] = job_id
            return all(s[i] != job_id for i in WITHDRAWN)

    def begin(self, stage: int, index: int, count: int = 1) -> None:
        """Record that item ``index`` of the task entered stage ``stage`` now."""
        s = self.slot
        s[SEQ] += 1.0
        s[STAGE] = stage
        s[INDEX] = index
        s[COUNT] = count
        s[START] = time.monotonic()
        s[SEQ] += 1.0

    def start_job(self, job_id: int) -> None:
        """Record that a new task starts (no stage yet)."""
        s = self.slot
        s[SEQ] += 1.0
        s[JOB] = job_id
        s[STAGE] = -1
        s[INDEX] = -1
        s[COUNT] = 0
        s[START] = time.monotonic()
        s[SEQ] += 1.0

    def idle(self) -> None:
        """Record that no task is running."""
        s = self.slot
        s[SEQ] += 1.0
        s[INDEX] = IDLE
        s[SEQ] += 1.0


def read_slot(slot: Any) -> tuple[int, int, int, int, float] | None:
    """Return ``(job, stage, index, count, start)`` from a slot, or None if mid-write."""
    seq = slot[SEQ]
    if int(seq) % 2:
        return None
    values = (int(slot[JOB]), int(slot[STAGE]), int(slot[INDEX]), int(slot[COUNT]), slot[START])
    if slot[SEQ] != seq:
        return None
    return values


def unborn(slot: Any) -> bool:
    """Tell whether the slot's worker has not started yet (importing, initializing)."""
    return bool(slot[INDEX] == UNBORN)


def exit_code(slot: Any, code: int | None) -> int | None:
    """Return a dead worker's exit code as its slot explains it.

    A worker that ends itself on a signal (SIGTERM) kills its whole process group with
    SIGKILL, itself included, or exits with 128 + the signal after a journal commit; the
    signal it wrote to ``EXIT`` is then the cause to report (as ``-signal``).
    """
    signum = int(slot[EXIT])
    if signum > 0 and code in (-signal.SIGKILL, 128 + signum):
        return -signum
    return code


def semaphore_name(lock: Any) -> str | None:
    """Return the name of the claim lock's POSIX semaphore (None under ``fork``: unnamed)."""
    name = getattr(getattr(lock, "_semlock", None), "name", None)
    return name if isinstance(name, str) else None


def withdraw(slot: Any, lock: Any, job_id: int, wait: float = 1.0) -> bool:
    """Withdraw job ``job_id`` sent to the slot's worker; False if it started already.

    Jobs reach a worker in increasing ids and it takes them up in order, so ``job_id`` has
    not started while it is above ``SEEN``. An entry of ``WITHDRAWN`` at or below ``SEEN``
    is spent; a worker holds two jobs at most, so one entry is always free. A lock not
    had within ``wait`` seconds (a worker killed while holding it) withdraws nothing: the
    job then runs, or is run again, as usual.
    """
    if not lock.acquire(timeout=wait):
        return False
    try:
        seen = slot[SEEN]
        if seen >= job_id:
            return False
        free = next((i for i in WITHDRAWN if slot[i] <= seen), None)
        if free is None:  # pragma: no cover - more than two jobs held by one worker
            return False
        slot[free] = job_id
        return True
    finally:
        lock.release()
