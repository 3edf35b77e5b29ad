"""A ProcessPool's sender threads: one per worker, shipping its jobs in order.

A worker busy writing a large result stops reading its pipe; with a sender per worker, a
slow reader delays only its own tasks, never another worker's. A sender encodes a job's
items (large buffers go through shared memory, :mod:`papy.pools._shm`), sends the node's
function the first time the worker needs it (each worker keeps the last
:data:`SPEC_CACHE`), and drops every reference to the job before it
sets ``job.sent``: the manager thread waits for that before it delivers the job's result,
so once a run has a result, nothing in the pool still holds that task's inputs.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from papy.pools import _fds, _shm
from papy.pools._functions import dumps_code
from papy.pools._handles import Job, Worker, free_note, wire_keys
from papy.pools._messages import dumps, encode_each, encode_items, frame

#: node functions a worker (and the driver, pickled) keeps at most; older ones are dropped
#: and sent again if still needed, so a long-lived pool serving many runs stays small
SPEC_CACHE = 32


class Shipper(Protocol):
    """What a sender reads and counts in its pool's driver state."""

    shm_threshold: int | None
    registry: _shm.Registry | None
    spec_blobs: dict[str, bytes]
    shared_bytes: int
    pickle_s: float


def send_loop(state: Shipper, w: Worker) -> None:
    """Ship ``w``'s outbox (jobs and notes) until it holds ``None`` or the worker is dead."""
    backlog: list[Any] = []  # an entry taken while gathering "free" notes
    while True:
        entry = backlog.pop() if backlog else w.outbox.get()
        if entry is None:
            return
        if isinstance(entry, tuple):  # ("release", spec ids) or ("free", segment, reuse)
            if entry[0] == "free":  # with those queued behind it: one message
                note, backlog = free_note(entry, w.outbox)
            else:
                note = (None, entry[1])
            try:
                w.conn.send_bytes(frame(note, b""))
            except (OSError, ValueError):
                return
            continue
        job: Job = entry
        sent = job.sent
        sent.clear()
        try:
            alive = send_job(state, w, job)
        finally:
            # Hold nothing while waiting (the run and its pool must be free to be
            # collected), and nothing of a task once its result can be delivered
            entry = job = None  # type: ignore[assignment]
            sent.set()
        if not alive:
            return


def send_job(state: Shipper, w: Worker, job: Job) -> bool:
    """Encode one job and send it to ``w``; False if the worker is dead."""
    task = job.task
    spec_id = task.spec.id
    t0 = time.perf_counter()
    # A task that killed a worker once goes item by item, in the message, so that a crash
    # while its worker rebuilds an item names that item.
    out = None
    if state.shm_threshold and not job.track:
        out = _shm.Outgoing(state.shm_threshold, state.registry)
    try:
        body = encode_each(task) if job.track else encode_items(task, out)
    except Exception as exc:  # pragma: no cover - encode isolates bad items itself
        task.values = task.fail_all(exc).values
        task.dirty = True
        body = encode_each(task) if job.track else dumps(task.values)
    with w.send_lock:
        if w.dead:
            if out is not None:
                out.close()
            return False  # the manager re-queues the jobs of dead workers
        drop = []
        if spec_id in w.specs:
            blob = None
            del w.specs[spec_id]  # most recently used goes last
        else:
            blob = state.spec_blobs.get(spec_id)
            if blob is None:  # dropped from the driver's cache meanwhile
                blob = dumps_code(task.spec)
            while len(w.specs) >= SPEC_CACHE:
                oldest = next(iter(w.specs))
                del w.specs[oldest]
                drop.append(oldest)
        w.specs[spec_id] = None
        keys = wire_keys(task.keys)
        descs, fds = (out.descs, out.fds) if out is not None else ([], [])
        header = (job.id, spec_id, blob, keys, task.jkeys, task.dirty, job.track, drop)
    try:
        w.conn.send_bytes(frame((*header, descs, len(fds)), body))
        if fds and w.sock is not None:
            _fds.send_fds(w.sock, fds)
    except (OSError, ValueError):
        return False  # the worker died; its sentinel fires and the manager re-queues
    finally:
        if out is not None:
            out.close()
            state.shared_bytes += out.nbytes
    state.pickle_s += time.perf_counter() - t0
    return True
