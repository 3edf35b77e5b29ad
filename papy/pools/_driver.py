"""The driver side of a ProcessPool: its workers, its queue, and the threads that serve them.

:class:`State` holds everything the pool's threads use, so they never keep the
:class:`~papy.ProcessPool` object alive. ``submit`` queues a job in the driver
(``pending``); :meth:`State.assign_locked` gives jobs to the least busy workers,
:data:`PER_WORKER` each at most (one running, one in its pipe); ``cancel`` withdraws a job
not started, in either place (the worker claims each job in its slot first). A
**sender thread per worker** ships its jobs in order, so a slow reader delays only its own
tasks; the **manager thread** receives results, copies worker output, replaces dead
workers (:mod:`papy.pools._recovery`) and enforces per-item deadlines.
"""

from __future__ import annotations

import functools
import itertools
import logging
import multiprocessing as mp
import selectors
import signal
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future
from typing import Any

from papy._errors import PoolError
from papy._items import qualified_type
from papy._task import TaskResult
from papy.pools import _recovery, _shm, _slot
from papy.pools._base import Task
from papy.pools._functions import dumps_code
from papy.pools._handles import (
    Job,
    Output,
    Worker,
    fail_closed,
    finish_outputs,
    free_note,
    give_back,
    on_cancel,
    signal_group,
    start_worker,
    stop_workers,
    wire_keys,
    withdraw_held,
)
from papy.pools._messages import dumps, encode_items, frame, loads, unframe
from papy.pools._recovery import describe_exit, has_timeout, late_workers, rerun

log = logging.getLogger("papy")

PER_WORKER = 2  # tasks a worker holds at once: one running, one queued in its pipe
#: seconds past an item's limit within which the pool notices it and kills the worker: the
#: slots are read every ``TICK`` and a limit is passed by a ``TICK`` of slack (an item is
#: never cut short before its limit); the rest is margin for a loaded machine
TIMEOUT_GRACE = 0.25
TICK = 0.05  # seconds between deadline checks while a timed node runs
START_FAILURES = 3  # workers in a row that die before any work: the pool gives up
#: node functions a worker (and the driver, pickled) keeps at most; older ones are dropped
#: and sent again if still needed, so a long-lived pool serving many runs stays small
SPEC_CACHE = 32


class State:
    """Everything a process pool's threads use, so that they never keep the pool alive.

    The :class:`ProcessPool` object holds this; a ``weakref.finalize`` closes it when the
    pool is garbage-collected, and an exit handler closes it at interpreter exit.
    """

    def __init__(
        self, size: int, ctx: Any, initializer: bytes | None, shm_threshold: int | None
    ) -> None:
        self.size = size
        self.shm_threshold = shm_threshold if _shm.available() else None
        #: the segments of results this driver holds mapped, to pass them on without a copy
        self.registry = _shm.REGISTRY if self.shm_threshold is not None else None
        self.shared_bytes = 0  # bytes that crossed through shared memory, both ways
        self.ctx = ctx
        self.initializer = initializer
        self.lock = threading.Lock()
        self.pool: list[Worker] = []
        self.pending: deque[Job] = deque()
        self.ids = itertools.count()
        self.spec_blobs: dict[str, bytes] = {}
        self.wake_r, self.wake_w = mp.Pipe(duplex=False)
        self.manager: threading.Thread | None = None
        self.selector: selectors.BaseSelector | None = None
        self.watched: set[Worker] = set()
        self.closed = False
        self.broken: PoolError | None = None
        self.start_failures = 0
        self.restarts = 0
        self.pickle_s = 0.0
        self.unpickle_s = 0.0

    def start(self) -> None:
        with self.lock:
            for _ in range(self.size):
                self.pool.append(self.spawn())
        self.manager = threading.Thread(target=self.manage, name="papy-process-pool", daemon=True)
        self.manager.start()

    def spawn(self) -> Worker:
        w = start_worker(self.ctx, self.initializer, self.shm_threshold)
        threading.Thread(
            target=self.send_loop, args=(w,), name="papy-process-pool-send", daemon=True
        ).start()
        return w

    def close(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            workers = list(self.pool)
            jobs = [j for w in workers for j in w.jobs if not j.withdrawn] + list(self.pending)
            self.pending.clear()
            for w in workers:
                w.jobs.clear()
                w.outbox.put(None)
        self.wake()
        if self.manager is not None and self.manager is not threading.current_thread():
            self.manager.join(timeout=5)
        stop_workers(workers)  # they hold no state worth saving
        fail_closed(jobs)
        for conn in (self.wake_r, self.wake_w):
            try:
                conn.close()
            except OSError:
                pass

    def pids(self) -> list[int]:
        with self.lock:
            return [w.process.pid for w in self.pool if not w.dead]

    # -- submitting --------------------------------------------------------------------------

    def submit(self, task: Task) -> Future[TaskResult]:
        fut: Future[TaskResult] = Future()  # pending until answered (see cancel)
        if self.broken is not None:
            fut.set_exception(self.broken)
            return fut

        def done(result: TaskResult) -> None:
            if not fut.done():
                fut.set_result(result)

        spec = task.spec
        if spec.id not in self.spec_blobs:
            try:
                blob = dumps_code(spec)
            except Exception as exc:
                fut.set_result(
                    task.fail_all(
                        TypeError(
                            f"the node's function cannot be sent to a worker process "
                            f"({qualified_type(exc)}: {exc}); use a ThreadPool for it"
                        )
                    )
                )
                return fut
            with self.lock:
                self.spec_blobs[spec.id] = blob
                while len(self.spec_blobs) > SPEC_CACHE:
                    self.spec_blobs.pop(next(iter(self.spec_blobs)), None)
        job = Job(task, done, fut)  # a future its holder cancels is withdrawn too:
        fut.add_done_callback(functools.partial(on_cancel, weakref.ref(self), weakref.ref(job)))
        self.enqueue([job])
        return fut

    def enqueue(self, jobs: list[Job], front: bool = False) -> None:
        """Queue ``jobs`` for the workers; PoolError (and the jobs failed) once closed."""
        with self.lock:
            if self.closed:  # a submit or a re-run racing close(): never left pending
                raise fail_closed(jobs)
            self.pending.extendleft(reversed(jobs)) if front else self.pending.extend(jobs)
            self.assign_locked()

    def assign_locked(self) -> None:
        """Give pending jobs to the least busy workers; their sender threads ship them.

        Queuing the sends here, under the lock, makes each worker receive its jobs in the
        order of ``worker.jobs``, which is how results are matched and crashes attributed.
        """
        timed = False
        while self.pending and not self.closed:
            worker = min(
                (w for w in self.pool if not w.dead), key=lambda w: len(w.jobs), default=None
            )
            if worker is None or len(worker.jobs) >= PER_WORKER:
                break
            job = self.pending.popleft()
            if job.fut.done():
                continue  # cancelled while queued here: its items never run
            job.id = next(self.ids)
            worker.jobs.append(job)
            worker.outbox.put(job)
            timed = timed or job.task.timeout is not None or has_timeout(job.task)
        if timed:
            self.wake()  # the manager must start watching deadlines

    def cancel(self, futures: Iterable[Future[TaskResult]]) -> int:
        """Withdraw the jobs of ``futures`` that have not started, queued here or in a worker
        (through its slot's claim protocol, :func:`~papy.pools._handles.withdraw_held`)."""
        wanted = {id(f) for f in futures}
        withdrawn = 0
        with self.lock:
            for job in self.pending:
                if id(job.fut) in wanted and not job.fut.done():
                    job.withdrawn = True  # first: on_cancel then leaves it alone
                    job.withdrawn = job.fut.cancel()
                    withdrawn += job.withdrawn
            self.pending = deque(j for j in self.pending if not j.fut.cancelled())
            for w in self.pool:
                withdrawn += withdraw_held(w, wanted)
        return withdrawn

    def release(self, spec_ids: Iterable[str]) -> None:
        ids = list(spec_ids)
        with self.lock:
            for spec_id in ids:
                self.spec_blobs.pop(spec_id, None)
            for w in self.pool:
                with w.send_lock:
                    held = [i for i in ids if i in w.specs]
                    for i in held:
                        del w.specs[i]
                if held:
                    w.outbox.put(("release", held))

    def send_loop(self, w: Worker) -> None:
        """Ship jobs to one worker, in order, so no other thread blocks on its pipe.

        A worker busy writing a large result stops reading its pipe; a sender per worker
        means a slow reader delays only its own tasks, never another worker's.
        """
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
            task = job.task
            spec_id = task.spec.id
            t0 = time.perf_counter()
            out = _shm.Outgoing(self.shm_threshold, self.registry) if self.shm_threshold else None
            try:
                body = encode_items(task, out)
            except Exception as exc:  # pragma: no cover - encode isolates bad items itself
                body = dumps(job.task.fail_all(exc).values)
            with w.send_lock:
                if w.dead:
                    if out is not None:
                        out.close()
                    return  # the manager re-queues the jobs of dead workers
                drop = []
                if spec_id in w.specs:
                    blob = None
                    del w.specs[spec_id]  # most recently used goes last
                else:
                    blob = self.spec_blobs.get(spec_id)
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
                    _shm.send_fds(w.sock, fds)
            except (OSError, ValueError):
                return  # the worker died; its sentinel fires and the manager re-queues
            finally:
                if out is not None:
                    out.close()
                    self.shared_bytes += out.nbytes
            self.pickle_s += time.perf_counter() - t0
            # Hold nothing while waiting (the run and its pool must be free to be collected)
            entry = job = task = header = body = out = None  # type: ignore[assignment]

    # -- the manager thread ------------------------------------------------------------------

    def wake(self) -> None:
        try:
            self.wake_w.send_bytes(b"")
        except OSError:
            pass

    def manage(self) -> None:
        """Receive results, replace dead workers, and enforce deadlines until closed."""
        sel = self.selector = selectors.DefaultSelector()
        sel.register(self.wake_r, selectors.EVENT_READ, None)
        try:
            while not self.closed:
                with self.lock:
                    workers = [w for w in self.pool if not w.dead]
                    timed = any(has_timeout(j.task) for w in workers for j in w.jobs)
                for w in workers:
                    if w not in self.watched:
                        self.watched.add(w)
                        sel.register(w.conn, selectors.EVENT_READ, (False, w))
                        sel.register(w.process.sentinel, selectors.EVENT_READ, (True, w))
                        for out in w.outputs:
                            sel.register(out.conn, selectors.EVENT_READ, out)
                try:
                    events = sel.select(TICK if timed else None)
                except OSError:
                    events = []
                if self.closed:
                    return
                dead = []
                for key, _ in events:
                    if key.data is None:
                        try:
                            while self.wake_r.poll():
                                self.wake_r.recv_bytes()
                        except (EOFError, OSError):
                            return
                        continue
                    if isinstance(key.data, Output):
                        if not key.data.read():
                            sel.unregister(key.fileobj)
                        continue
                    is_sentinel, w = key.data
                    if w.dead:
                        continue
                    if is_sentinel:
                        dead.append(w)
                    else:
                        self.drain(w)
                        if not w.process.is_alive():
                            dead.append(w)
                for w in dict.fromkeys(dead):
                    self.drain(w)
                    self.bury(w)
                if timed:
                    self.enforce_deadlines()
        finally:
            sel.close()

    def unwatch(self, w: Worker) -> None:
        if w in self.watched and self.selector is not None:
            self.watched.discard(w)
            for obj in (w.conn, w.process.sentinel, *(out.conn for out in w.outputs)):
                try:
                    self.selector.unregister(obj)
                except (KeyError, ValueError, OSError):
                    pass

    def drain(self, w: Worker) -> None:
        """Read every message the worker has sent."""
        while True:
            try:
                if not w.conn.poll():
                    return
                data = w.conn.recv_bytes()
                header, body = unframe(data)
                if header[0] == "init-failed":
                    self.break_pool(_recovery.init_failure(header[1], body))
                    return
                job_id, unloadable, descs, nfds, segments, pinned = header
                lost: OSError | None = None
                try:
                    fds = _shm.recv_fds(w.sock, nfds) if nfds and w.sock is not None else []
                except _shm.DescriptorsLost as exc:  # the items fail, naming the cause
                    fds, lost = [], exc
            except (EOFError, OSError):
                return  # the worker died mid-message: its job runs again
            if pinned and self.registry is not None:
                self.registry.pin(pinned)
            back = [functools.partial(give_back, weakref.ref(w), seg) for seg in segments]
            for give in back if lost is not None else []:
                give(False)  # never received: the producer frees them
            with self.lock:
                if not w.jobs or w.jobs[0].id != job_id:
                    _shm.close_fds(fds)
                    for give in back:
                        give(False)
                    continue  # a result for a job already given up on (timed out)
                job = w.jobs.popleft()
                if unloadable is None:  # withdrawn: the worker never ran it
                    self.assign_locked()
                    continue
                w.did += 1
                self.start_failures = 0
                self.assign_locked()
            t0 = time.perf_counter()
            try:
                if lost is not None:
                    raise lost
                loaded = loads(body, _shm.map_buffers(fds, descs, self.registry, back))
            except Exception as exc:
                result = job.task.fail_all(
                    TypeError(
                        "a result could not be rebuilt in the driver "
                        f"({qualified_type(exc)}: {exc})"
                    ),
                    job.task.last_stage(),
                )
            else:
                result = job.task.fail_all(loaded) if unloadable else loaded
            result.crashes += job.crashes
            result.nbytes = len(body) + sum(n for _, _, n in descs)
            self.shared_bytes += result.nbytes - len(body)
            self.unpickle_s += time.perf_counter() - t0
            job.done(result)

    def break_pool(self, error: PoolError) -> None:
        with self.lock:
            if self.broken is not None:
                return
            self.broken = error
            jobs = [j for w in self.pool for j in w.jobs] + list(self.pending)
            self.pending.clear()
            for w in self.pool:
                w.jobs.clear()
        log.error("%s", error)
        for job in jobs:
            if not job.fut.done():
                job.fut.set_exception(error)

    def enforce_deadlines(self) -> None:
        """Kill the workers whose current item ran past its node's timeout."""
        with self.lock:
            victims = late_workers(self.pool, TICK)
        for w in victims:
            signal_group(w.process.pid, signal.SIGKILL)

    def bury(self, w: Worker) -> None:
        """Replace a dead worker and re-run or fail what it held."""
        w.process.join(timeout=1.0)
        code = w.process.exitcode
        signal_group(w.process.pid, signal.SIGKILL)  # processes its node started
        running = _slot.read_slot(w.slot)
        seen = int(w.slot[_slot.SEEN])
        unborn = w.slot[_slot.INDEX] == _slot.UNBORN
        with self.lock:
            if w.dead:
                return
            with w.send_lock:
                w.dead = True
            w.outbox.put(None)
            lost = [j for j in w.jobs if not j.withdrawn]  # withdrawn: cancelled, never run
            w.jobs.clear()
            self.unwatch(w)
            self.pool.remove(w)
            if unborn:  # died before it could run anything: no task is to blame
                self.start_failures += 1
            replace = not self.closed and self.broken is None
            if replace and self.start_failures >= START_FAILURES:
                replace = False
        if replace and unborn:
            # Back off before starting another worker that may die the same way (the
            # failures in a row are bounded: the pool gives up after a few).
            time.sleep(0.1 * 2 ** (self.start_failures - 1))
        with self.lock:
            replace = replace and not self.closed
            if replace:
                self.pool.append(self.spawn())
                self.restarts += 1
        finish_outputs(w)
        w.close_conn()
        if self.closed:  # close() did not see these jobs: fail them here
            fail_closed(lost)
        if self.closed or (self.broken is not None and not lost):
            return
        if not replace and self.broken is None:
            method = self.ctx.get_start_method()
            self.break_pool(_recovery.start_failure(code, self.start_failures, method))
            return
        log.warning(
            "worker %s: %s; replaced (%d task(s) to re-run)",
            w.process.pid,
            "was killed for a timeout" if lost and lost[0].late else describe_exit(code),
            len(lost),
        )
        try:
            self.enqueue(rerun(lost, code, unborn, running, seen), front=True)
        except PoolError:
            pass  # closed meanwhile: enqueue failed the jobs
