"""ProcessPool: run tasks in worker processes, surviving crashes and stuck items.

Each worker has a private pipe and holds at most two tasks (one running, one queued), so
the pool always knows what a worker was doing when it died:

- a worker that dies (SIGKILL, segfault, ``os._exit``, the OOM killer) is noticed through its
  process sentinel at once and replaced, so the pool keeps its size;
- the task it was running is re-run: a batch is split in halves so innocent items complete,
  and a single item that kills its worker twice is reported as a
  :class:`~papy.WorkerCrashed` failure with the exit code or signal;
- queued tasks the dead worker never started are re-sent unchanged;
- a task that overruns its node's ``timeout`` gets its worker killed and replaced; a
  one-item task then becomes a ``TimeoutError`` failure, a larger one is re-run item by item
  so only the slow item fails.

Functions are shipped once per worker with cloudpickle (lambdas, closures and functions
defined in ``__main__`` work); items and results use pickle, with cloudpickle as fallback.
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing as mp
import os
import pickle
import queue
import selectors
import signal
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

import cloudpickle

from papy._errors import PoolError, WorkerCrashed
from papy._items import qualified_type
from papy._pickling import dumps as dumps_code
from papy._task import TaskResult
from papy.pools._base import Pool, Task, merge_parts
from papy.pools._worker import dumps, fail_unpicklable, frame, unframe, worker_main

log = logging.getLogger("papy")

_PER_WORKER = 2  # tasks a worker holds at once: one running, one queued in its pipe
_TIMEOUT_GRACE = 0.25  # seconds past a deadline before the worker is killed


def _default_start_method() -> str:
    # fork starts (and restarts) workers in milliseconds and never re-imports __main__; it
    # is the platform default before Python 3.14, which moved to forkserver for safety
    # with threads. Follow the interpreter's own choice.
    return mp.get_start_method(allow_none=False)


class _Job:
    """A task in the pool, with what to do when it is done."""

    __slots__ = ("task", "done", "crashes", "started", "deadline", "timed_out", "id")

    def __init__(self, task: Task, done: Callable[[TaskResult], None], crashes: int = 0):
        self.task = task
        self.done = done
        self.crashes = crashes
        self.started = 0.0
        self.deadline: float | None = None
        self.timed_out = False
        self.id = 0


class _Worker:
    __slots__ = ("process", "conn", "jobs", "specs", "send_lock", "dead")

    def __init__(self, process: Any, conn: Connection) -> None:
        self.process = process
        self.conn = conn
        self.jobs: deque[_Job] = deque()
        self.specs: set[str] = set()
        self.send_lock = threading.Lock()
        self.dead = False


def _split(job: _Job, parts: list[Task], crashes: int) -> list[_Job]:
    """Replace a job by jobs for ``parts``; the original completes when all parts do."""
    return [
        _Job(part, on_done, crashes)
        for part, on_done in zip(parts, merge_parts(len(parts), job.done))
    ]


class ProcessPool(Pool):
    """Run tasks in ``workers`` processes (default: one per core)."""

    kind = "process"
    target_task_s = 0.05

    def __init__(
        self,
        workers: int | None = None,
        start_method: str | None = None,
        *,
        initializer: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__()
        if workers is not None and workers < 1:
            raise ValueError(f"ProcessPool needs at least one worker, got {workers}")
        self.workers = workers or os.cpu_count() or 1
        self.start_method = start_method or _default_start_method()
        self._ctx: Any = mp.get_context(self.start_method)
        self._initializer = initializer
        self._lock = threading.Lock()
        self._pool: list[_Worker] = []
        self._pending: deque[_Job] = deque()
        self._ids = itertools.count()
        self._spec_blobs: dict[str, bytes] = {}
        self._wake_r, self._wake_w = mp.Pipe(duplex=False)
        self._manager: threading.Thread | None = None
        self._selector: selectors.BaseSelector | None = None
        self._watched: set[_Worker] = set()
        self._sender: threading.Thread | None = None
        self._outbox: queue.SimpleQueue[tuple[_Worker, _Job] | None] = queue.SimpleQueue()
        self.restarts = 0  # workers replaced after a crash or a timeout
        self._pickle_s = 0.0
        self._unpickle_s = 0.0

    # -- lifecycle -------------------------------------------------------------------------

    def _start(self) -> None:
        for _ in range(self.workers):
            self._pool.append(self._spawn())
        self._sender = threading.Thread(
            target=self._send_loop, name="papy-process-pool-send", daemon=True
        )
        self._sender.start()
        self._manager = threading.Thread(target=self._manage, name="papy-process-pool", daemon=True)
        self._manager.start()
        weakref.finalize(self, _kill_all, list(self._pool))

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        initializer = cloudpickle.dumps(self._initializer) if self._initializer else None
        proc = self._ctx.Process(
            target=_worker_entry, args=(child, initializer), name="papy-worker", daemon=True
        )
        proc.start()
        child.close()
        return _Worker(proc, parent)

    def _close(self) -> None:
        self._outbox.put(None)
        self._wake()
        if self._manager is not None and self._manager is not threading.current_thread():
            self._manager.join(timeout=5)
        with self._lock:
            workers = list(self._pool)
            jobs = [j for w in workers for j in w.jobs] + list(self._pending)
            self._pending.clear()
            for w in workers:
                w.jobs.clear()
        # Workers hold no state worth saving: stop them at once. (Waiting for them to see
        # EOF is not enough: forked siblings inherit each other's pipe ends.)
        for w in workers:
            try:
                w.conn.close()
            except OSError:
                pass
            if w.process.is_alive():
                w.process.terminate()
        deadline = time.monotonic() + 2.0
        for w in workers:
            w.process.join(timeout=max(0.0, deadline - time.monotonic()))
        for w in workers:
            if w.process.is_alive():
                w.process.kill()
                w.process.join(timeout=1.0)
        error = PoolError("the pool was closed before the task finished")
        for job in jobs:
            job.done(job.task.fail_all(error))
        self._wake_r.close()
        self._wake_w.close()

    def codec_seconds(self) -> dict[str, float]:
        """Return seconds this pool's threads spent pickling tasks and unpickling results."""
        return {"pickle": self._pickle_s, "unpickle": self._unpickle_s}

    def pids(self) -> list[int]:
        """Return the process ids of the live workers (for monitoring and tests)."""
        with self._lock:
            return [w.process.pid for w in self._pool if not w.dead]

    # -- submitting ------------------------------------------------------------------------

    def _submit(self, task: Task) -> Future[TaskResult]:
        fut: Future[TaskResult] = Future()
        fut.set_running_or_notify_cancel()

        def done(result: TaskResult) -> None:
            if not fut.done():
                fut.set_result(result)

        spec = task.spec
        if spec.id not in self._spec_blobs:
            try:
                self._spec_blobs[spec.id] = dumps_code(spec, protocol=pickle.HIGHEST_PROTOCOL)
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
        self._enqueue([_Job(task, done)])
        return fut

    def _enqueue(self, jobs: list[_Job], front: bool = False) -> None:
        with self._lock:
            if front:
                self._pending.extendleft(reversed(jobs))
            else:
                self._pending.extend(jobs)
            self._assign_locked()

    def _assign_locked(self) -> None:
        """Give pending jobs to the least busy workers; the sender thread ships them.

        Queuing the sends here, under the lock, makes each worker receive its jobs in the
        order of ``worker.jobs``, which is how results are matched and crashes attributed.
        """
        while self._pending and not self._closed:
            worker = min(
                (w for w in self._pool if not w.dead), key=lambda w: len(w.jobs), default=None
            )
            if worker is None or len(worker.jobs) >= _PER_WORKER:
                break
            job = self._pending.popleft()
            job.id = next(self._ids)
            if not worker.jobs:
                self._mark_started(job)
            worker.jobs.append(job)
            self._outbox.put((worker, job))

    def _mark_started(self, job: _Job) -> None:
        job.started = time.monotonic()
        t = job.task.timeout
        if t is not None:
            job.deadline = job.started + t * max(1, len(job.task)) + _TIMEOUT_GRACE
            self._wake()  # the manager must wait for this deadline

    def _send_loop(self) -> None:
        """Ship jobs to workers, in order, so no other thread ever blocks on a full pipe.

        A worker that is busy writing a large result stops reading its pipe; if the manager
        (which reads results) or the scheduler wrote to it directly, both could wait on each
        other forever.
        """
        while True:
            entry = self._outbox.get()
            if entry is None:
                return
            worker, job = entry
            task = job.task
            spec_id = task.spec.id
            blob = None if spec_id in worker.specs else self._spec_blobs[spec_id]
            t0 = time.perf_counter()
            try:
                body = self._encode_items(job)
            except Exception as exc:  # pragma: no cover - encode isolates bad items itself
                body = dumps(job.task.fail_all(exc).values)
            with worker.send_lock:
                if worker.dead:
                    continue  # the manager re-queues the jobs of dead workers
                try:
                    worker.conn.send_bytes(
                        frame(
                            (job.id, spec_id, blob, _keys(task.keys), task.jkeys, task.dirty), body
                        )
                    )
                    worker.specs.add(spec_id)
                except (OSError, ValueError):
                    pass  # the worker died; its sentinel fires and the manager re-queues
            self._pickle_s += time.perf_counter() - t0

    def _encode_items(self, job: _Job) -> bytes:
        task = job.task
        try:
            return dumps(task.values)
        except Exception:
            pass
        values = fail_unpicklable(
            task.first_stage(),
            task.keys,
            task.values,
            lambda value, exc: (
                f"the item of type {qualified_type(value)} cannot be sent to a worker "
                f"process ({qualified_type(exc)}: {exc}); use a ThreadPool for this node"
            ),
        )
        task.values = values
        task.dirty = True  # the worker must skip the items that could not travel
        return dumps(values)

    # -- the manager thread ----------------------------------------------------------------

    def _wake(self) -> None:
        try:
            self._wake_w.send_bytes(b"")
        except OSError:
            pass

    def _manage(self) -> None:
        """Receive results, replace dead workers, and enforce deadlines until closed.

        One selector lives as long as the pool (registering every pipe on every wake-up
        would cost more than the wake-up itself on small tasks).
        """
        sel = self._selector = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        try:
            while not self._closed:
                with self._lock:
                    workers = [w for w in self._pool if not w.dead]
                    deadlines = [
                        w.jobs[0].deadline for w in workers if w.jobs and w.jobs[0].deadline
                    ]
                for w in workers:
                    if w not in self._watched:
                        self._watched.add(w)
                        sel.register(w.conn, selectors.EVENT_READ, (False, w))
                        sel.register(w.process.sentinel, selectors.EVENT_READ, (True, w))
                timeout = None
                if deadlines:
                    timeout = max(0.0, min(deadlines) - time.monotonic())  # type: ignore[type-var]
                try:
                    events = sel.select(timeout)
                except OSError:
                    events = []
                if self._closed:
                    return
                dead = []
                for key, _ in events:
                    if key.data is None:
                        try:
                            while self._wake_r.poll():
                                self._wake_r.recv_bytes()
                        except (EOFError, OSError):
                            return
                        continue
                    is_sentinel, w = key.data
                    if w.dead:
                        continue
                    if is_sentinel:
                        dead.append(w)
                    else:
                        self._drain(w)
                        if not w.process.is_alive():
                            dead.append(w)
                for w in dict.fromkeys(dead):
                    self._drain(w)
                    self._bury(w)
                self._enforce_deadlines()
        finally:
            sel.close()

    def _unwatch(self, w: _Worker) -> None:
        if w in self._watched and self._selector is not None:
            self._watched.discard(w)
            for obj in (w.conn, w.process.sentinel):
                try:
                    self._selector.unregister(obj)
                except (KeyError, ValueError, OSError):
                    pass

    def _drain(self, w: _Worker) -> None:
        """Read every result the worker has sent."""
        while True:
            try:
                if not w.conn.poll():
                    return
                data = w.conn.recv_bytes()
            except (EOFError, OSError):
                return
            job_id, body = unframe(data)
            with self._lock:
                if not w.jobs or w.jobs[0].id != job_id:
                    continue  # a result for a job already given up on (timed out)
                job = w.jobs.popleft()
                if w.jobs:
                    self._mark_started(w.jobs[0])
                self._assign_locked()
            t0 = time.perf_counter()
            try:
                result: TaskResult = pickle.loads(body)
            except Exception as exc:
                result = job.task.fail_all(
                    TypeError(
                        "a result could not be rebuilt in the driver "
                        f"({qualified_type(exc)}: {exc})"
                    ),
                    job.task.last_stage(),
                )
            result.crashes += job.crashes
            result.nbytes = len(body)
            self._unpickle_s += time.perf_counter() - t0
            job.done(result)

    def _bury(self, w: _Worker) -> None:
        """Replace a dead worker and re-run or fail what it held."""
        w.process.join(timeout=1.0)
        code = w.process.exitcode
        with self._lock:
            if w.dead:
                return
            with w.send_lock:
                w.dead = True
            lost = list(w.jobs)
            w.jobs.clear()
            self._unwatch(w)
            self._pool.remove(w)
            if not self._closed:
                self._pool.append(self._spawn())
                self.restarts += 1
        try:
            w.conn.close()
        except OSError:
            pass
        if not self._closed:
            log.warning(
                "worker %s: %s; replaced (%d task(s) to re-run)",
                w.process.pid,
                "was killed for a timeout" if lost and lost[0].timed_out else _describe_exit(code),
                len(lost),
            )
        retry: list[_Job] = []
        for i, job in enumerate(lost):
            if i > 0:
                retry.append(job)  # never started: not its fault
                continue
            retry.extend(self._after_death(job, code))
        self._enqueue(retry, front=True)

    def _after_death(self, job: _Job, code: int | None) -> list[_Job]:
        task = job.task
        n = len(task)
        if job.timed_out:
            if n == 1:
                limit = task.timeout or 0.0
                job.done(
                    task.fail_all(
                        TimeoutError(
                            f"item exceeded the node's timeout of {limit:g} s; "
                            "its worker was killed and replaced"
                        )
                    )
                )
                return []
            return _split(job, [task.slice(i, i + 1) for i in range(n)], 0)
        crashes = job.crashes + 1
        if n > 1:
            half = n // 2
            return _split(job, [task.slice(0, half), task.slice(half, n)], 0)
        if crashes < 2:
            job.crashes = crashes
            return [job]
        job.done(task.fail_all(WorkerCrashed(_describe_exit(code), code), attempts=crashes))
        return []

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        victims = []
        with self._lock:
            for w in self._pool:
                if w.jobs and w.jobs[0].deadline is not None and w.jobs[0].deadline <= now:
                    w.jobs[0].timed_out = True
                    victims.append(w)
        for w in victims:
            try:
                w.process.kill()
            except OSError:
                pass
            w.process.join(timeout=1.0)
            self._drain(w)
            self._bury(w)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "the worker process died while running this item"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the worker process was killed by {name} while running this item"
    return f"the worker process exited with code {code} while running this item"


def _worker_entry(conn: Connection, initializer: bytes | None) -> None:
    init = pickle.loads(initializer) if initializer else None
    worker_main(conn, init)


def _kill_all(workers: list[_Worker]) -> None:
    for w in workers:
        try:
            if w.process.is_alive():
                w.process.kill()
        except Exception:
            pass


if sys.platform == "win32":  # pragma: no cover
    raise ImportError("papy.pools.process needs a POSIX system")


def _keys(keys: Any) -> Any:
    # A range pickles in a few bytes whatever its length; keep it one.
    return keys if isinstance(keys, range) else list(keys)
