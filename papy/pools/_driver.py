"""The driver side of a ProcessPool: its workers, its queue, and the threads that serve them.

:class:`State` holds everything the pool's threads use, so they never keep the
:class:`~papy.ProcessPool` object alive. ``submit`` queues a job in the driver
(``pending``); :meth:`State.assign_locked` gives jobs to the least busy workers,
:data:`PER_WORKER` each at most (one running, one in its pipe); ``cancel`` withdraws a job
not started, in either place (the worker claims each job in its slot first). A
**sender thread per worker** (:mod:`papy.pools._sender`) ships its jobs in order, so a
slow reader delays only its own tasks; the **manager thread** receives results, copies
worker output, replaces dead workers (:mod:`papy.pools._recovery`) and enforces per-item
deadlines. A result is delivered only once nothing in the pool holds its task any more.
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
from papy.pools import _fds, _recovery, _shm, _slot
from papy.pools._base import Task
from papy.pools._functions import dumps_code
from papy.pools._handles import (
    Job,
    Worker,
    fail,
    fail_closed,
    give_back,
    kill_hung_up,
    on_cancel,
    reap_worker,
    signal_group,
    start_worker,
    steal,
    stop_workers,
    withdraw_held,
)
from papy.pools._messages import loads, unframe
from papy.pools._output import Output, finish_outputs
from papy.pools._recovery import describe_exit, has_timeout, late_workers, rerun, split
from papy.pools._sender import SPEC_CACHE, send_loop

log = logging.getLogger("papy")

PER_WORKER = 2  # tasks a worker holds at once: one running, one queued in its pipe
#: seconds past an item's limit within which the pool kills the worker: slots are read every
#: ``TICK``, a limit passed by a ``TICK`` of slack (never cut short), the rest is margin
TIMEOUT_GRACE = 0.25
TICK = 0.05  # seconds between deadline checks while a timed node runs
#: seconds a result waits at most for its task's sender thread to drop the task (it has
#: sent it whole, so it needs only the GIL back); past it the result goes anyway
SENT_WAIT_S = 1.0


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
        self.start_failures = self.start_kills = 0
        self.restarts = 0
        self.holding: float | None = None  # since when jobs wait around a suspect
        self.pickle_s = 0.0
        self.unpickle_s = 0.0

    def start(self) -> None:
        """Start the workers and the manager; on any error (Ctrl-C included) stop those
        started (:meth:`close`) and raise it (PoolError when starts kept failing)."""
        try:
            _recovery.start_all(self)
        except BaseException:
            self.close()
            raise
        self.manager = threading.Thread(target=self.manage, name="papy-process-pool", daemon=True)
        self.manager.start()

    def spawn(self) -> Worker:
        """Start a worker and its sender and add it to the pool (called under the lock)."""
        w = start_worker(self.ctx, self.initializer, self.shm_threshold)
        self.pool.append(w)  # at once: close() stops what the pool holds
        threading.Thread(
            target=send_loop, args=(self, w), name="papy-process-pool-send", daemon=True
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
        job = Job(task, done, fut)
        self.watch_cancel(job)
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
            if _recovery.held(self):  # a job that killed a worker runs alone
                break
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
        if not self.pending:
            self.holding = None  # nothing waits: no reason to tick
        if timed:
            self.wake()  # the manager must start watching deadlines

    def steal_locked(self, idle: Worker) -> Job | None:
        """Give ``idle`` a job queued behind another worker's running one, if it has
        nothing to do and nothing is pending (see :func:`~papy.pools._handles.steal`)."""
        if idle.dead or idle.jobs or self.pending or self.closed:
            return None
        job = steal(idle, self.pool)
        if job is not None:  # first in line, and no worker holds fewer jobs than ``idle``
            self.pending.appendleft(job)
            self.assign_locked()
        return job

    def watch_cancel(self, job: Job | None) -> None:
        """Withdraw a job when its holder cancels its future (call unlocked: the callback
        runs at once, taking the lock, if the future is cancelled already)."""
        if job is not None:
            job.fut.add_done_callback(
                functools.partial(on_cancel, weakref.ref(self), weakref.ref(job))
            )

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

    # -- the manager thread ------------------------------------------------------------------

    def wake(self) -> None:
        try:
            self.wake_w.send_bytes(b"")
        except OSError:
            pass

    def manage(self) -> None:
        """Receive results, replace dead workers, and enforce deadlines until closed; an
        error here breaks the pool (its tasks fail with a PoolError naming it)."""
        try:
            self._serve()
        except BaseException as exc:
            self.break_pool(PoolError(f"the pool's manager failed: {qualified_type(exc)}: {exc}"))
            raise

    def _serve(self) -> None:
        sel = self.selector = selectors.DefaultSelector()
        sel.register(self.wake_r, selectors.EVENT_READ, None)
        try:
            while not self.closed:
                with self.lock:
                    workers = [w for w in self.pool if not w.dead]
                    timed = any(has_timeout(j.task) for w in workers for j in w.jobs)
                    timed = _recovery.tick(self, workers) or timed
                for w in workers:
                    if w not in self.watched:
                        self.watched.add(w)
                        sel.register(w.conn, selectors.EVENT_READ, (False, w))
                        sel.register(w.process.sentinel, selectors.EVENT_READ, (True, w))
                        if w.pidfd is not None:
                            sel.register(w.pidfd, selectors.EVENT_READ, (True, w))
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
                        if w.hung_up():  # it cannot report any more: lost, alive or not
                            kill_hung_up(w)
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
            objs = (w.conn, w.process.sentinel, w.pidfd, *(out.conn for out in w.outputs))
            for obj in (o for o in objs if o is not None):
                try:
                    self.selector.unregister(obj)
                except (KeyError, ValueError, OSError):
                    pass

    def drain(self, w: Worker) -> None:
        """Read every message the worker has sent."""
        while self.receive(w):
            pass

    def receive(self, w: Worker) -> bool:
        """Read and deliver one message; False when none waits (or the worker is gone).

        One message per call, so that nothing of it (the task, its inputs, its result)
        is still referenced here once its result is delivered: this thread next waits in
        ``poll()`` without the GIL, and the run may meanwhile finish and count what the
        driver still maps.
        """
        try:
            if not w.has_message():
                return False
            data = w.conn.recv_bytes()
            header, body = unframe(data)
            if header[0] == "init-failed":
                self.break_pool(_recovery.init_failure(header[1], body))
                return False
            job_id, unloadable, descs, nfds, segments, pinned = header
            lost: OSError | None = None
            try:
                fds = _fds.recv_fds(w.sock, nfds) if nfds and w.sock is not None else []
            except _fds.DescriptorsLost as exc:  # the items fail, naming the cause
                fds, lost = [], exc
        except EOFError:
            w.eof = True  # its end is closed (or shut down): it can never report again
            return False  # the worker died mid-message: its job runs again
        except OSError:
            return False
        if pinned and self.registry is not None:
            self.registry.pin(pinned)
        back = [functools.partial(give_back, weakref.ref(w), seg) for seg in segments]
        for give in back if lost is not None else []:
            give(False)  # never received: the producer frees them
        with self.lock:
            if not w.jobs or w.jobs[0].id != job_id:
                _fds.close_fds(fds)
                for give in back:
                    give(False)
                return True  # a result for a job already given up on (timed out)
            job = w.jobs.popleft()
            self.assign_locked()
            moved = self.steal_locked(w)
            if unloadable is None:  # withdrawn: the worker never ran it
                self.watch_cancel(moved)
                return True
            w.did += 1
            self.start_failures = self.start_kills = 0
        self.watch_cancel(moved)
        t0 = time.perf_counter()
        loaded: Any = None
        try:
            if lost is not None:
                raise lost
            loaded = loads(body, _shm.map_buffers(fds, descs, self.registry, back))
        except Exception as exc:
            result = job.task.fail_all(
                TypeError(
                    f"a result could not be rebuilt in the driver ({qualified_type(exc)}: {exc})"
                ),
                job.task.last_stage(),
            )
        else:
            if unloadable == "items" and len(job.task) > 1:  # which items? halve and see
                task, half = job.task, len(job.task) // 2
                halves = [(task.slice(0, half), job.crashes, job.track)]
                halves.append((task.slice(half, len(task)), job.crashes, job.track))
                try:
                    self.enqueue(split(job, halves), front=True)  # type: ignore[arg-type]
                except PoolError:
                    pass  # closed meanwhile: the halves failed with it
                return True
            if unloadable == "journal":  # the run's journal failed: the run stops with it
                fail(job.fut, loaded)
                return True
            result = job.task.fail_all(loaded) if unloadable else loaded
        result.crashes += job.crashes
        result.nbytes = len(body) + sum(n for _, _, n in descs)
        self.shared_bytes += result.nbytes - len(body)
        self.unpickle_s += time.perf_counter() - t0
        finish, sent = job.done, job.sent
        del job, loaded, data, body  # the task's inputs go before its result is delivered:
        sent.wait(SENT_WAIT_S)  # its sender may not have dropped them yet (no GIL since)
        finish(result)
        return True

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
        code, killed = reap_worker(w)  # and the processes its node started
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
                _recovery.note_start_death(self, code)
        # Another worker, after a pause if workers keep dying before any work (or give up)
        replace = _recovery.respawn(self, _recovery.death(code, running, lost))
        finish_outputs(w.outputs)
        w.close_conn()
        if not replace and self.broken is None and not self.closed:
            method = self.ctx.get_start_method()
            self.break_pool(_recovery.start_failure(code, self.start_failures, method))
        if self.closed:  # close() did not see these jobs: fail them here
            fail_closed(lost)
            return
        if self.broken is not None:  # no worker will come to run them
            for job in lost:
                fail(job.fut, self.broken)
            return
        how = describe_exit(code, None, killed)
        how = "was killed for a timeout" if lost and lost[0].late else how
        log.warning("worker %s: %s; replaced (%d task(s) to re-run)", w.process.pid, how, len(lost))
        try:
            self.enqueue(rerun(lost, code, unborn, running, seen, killed), front=True)
        except PoolError:
            pass  # closed meanwhile: enqueue failed the jobs
