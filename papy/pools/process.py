"""ProcessPool: run tasks in worker processes, surviving crashes and stuck items.

Worker lifecycle:

- **Start.** Workers are started by ``forkserver`` on Linux (``spawn`` elsewhere), with the
  worker module preloaded in the fork server, so a new worker never inherits the driver's
  threads or the locks they hold, and starts in milliseconds. ``start_method="fork"`` is
  faster still but copies the driver's locks: a lock held by another driver thread (a
  logging handler, say) at that moment deadlocks the worker. Each worker leads its own
  process group and may start processes of its own (``multiprocessing``, a nested pool).
- **Run.** Each worker has a private pipe, its own sender thread (so a large task sent to
  one worker never waits on another), and holds at most two tasks (one running, one
  queued), so the pool always knows what a worker was doing when it died. A shared-memory
  slot per worker tells which item of which node it is running, and since when.
- **Timeouts.** An item of a node with ``timeout=T`` that runs longer than ``T`` seconds
  from its own start (``k*T`` for a call of a ``batched=True`` node on ``k`` items) fails
  with ``TimeoutError``; the driver notices within :data:`TIMEOUT_GRACE` seconds, kills the
  worker's process group and replaces the worker, and the item's batch-mates run again.
- **Crashes.** A worker that dies (SIGKILL, segfault, ``os._exit``, the OOM killer) is
  noticed through its process sentinel at once and replaced. The task it ran is run again
  with every item announced in its slot, so a second crash names the item; that item
  alone is run once more to confirm, then reported as a :class:`~papy.WorkerCrashed`
  failure; its batch-mates complete normally. Queued tasks are re-sent unchanged.
- **Failure to start.** A failing ``initializer`` stops the run with a
  :class:`~papy.PoolError` carrying its exception and traceback; workers that die before
  doing anything are replaced at most a few times, then the pool gives up the same way.
  A node function that cannot be loaded in a worker (an ``ImportError``) makes that node's
  items Failures carrying the error.
- **End.** ``close()``, garbage collection of the pool, and interpreter exit all stop the
  workers and their children. A worker whose driver dies (even by SIGKILL) kills its
  process group and exits within a fraction of a second.

Functions are shipped once per worker (cloudpickle, except that functions and classes of the
user's own file travel by reference and live in that file's module namespace in the
worker, as under ``python file.py``); items and results use pickle.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import multiprocessing as mp
import multiprocessing.spawn as mp_spawn
import multiprocessing.util  # its exit handler must be registered before ours
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
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any

from papy._errors import PoolError, WorkerCrashed
from papy._items import qualified_type
from papy._task import TaskResult
from papy.pools import _worker
from papy.pools._base import Pool, Task, merge_parts
from papy.pools._worker import dumps, dumps_code, fail_unpicklable, frame, read_slot, unframe

log = logging.getLogger("papy")

_PER_WORKER = 2  # tasks a worker holds at once: one running, one queued in its pipe
#: seconds past an item's limit within which the pool notices it and kills the worker: the
#: slots are read every ``_TICK`` and a limit is passed by a ``_TICK`` of slack (an item is
#: never cut short before its limit); the rest is margin for a loaded machine
TIMEOUT_GRACE = 0.25
_TICK = 0.05  # seconds between deadline checks while a timed node runs
_START_FAILURES = 3  # workers in a row that die before any work: the pool gives up
_PRELOAD = ["papy.pools._worker", "cloudpickle"]
#: node functions a worker (and the driver, pickled) keeps at most; older ones are dropped
#: and sent again if still needed, so a long-lived pool serving many runs stays small
_SPEC_CACHE = 32


def _prepare_without_unguarded_main(get: Callable[[str], dict[str, Any]]) -> Any:
    """Wrap multiprocessing's preparation data so workers skip an unguarded ``__main__``.

    See :func:`papy.pools._worker.main_is_guarded`: only processes named ``papy-worker``
    and only when the driver's script has no ``if __name__ == "__main__":`` block.
    """

    def get_preparation_data(name: str) -> dict[str, Any]:
        data = get(name)
        if name == "papy-worker" and not _worker.main_is_guarded():
            data.pop("init_main_from_path", None)
            data.pop("init_main_from_name", None)
        return data

    get_preparation_data.__wrapped__ = get  # type: ignore[attr-defined]
    return get_preparation_data


if not hasattr(mp_spawn.get_preparation_data, "__wrapped__"):
    mp_spawn.get_preparation_data = _prepare_without_unguarded_main(mp_spawn.get_preparation_data)


def _default_start_method() -> str:
    """Return ``forkserver`` where it exists (Linux and most POSIX systems), else ``spawn``.

    Neither copies the driver's threads or locks into a worker; with the worker module
    preloaded in the fork server, a worker starts in a few milliseconds.
    """
    if sys.platform.startswith("linux") and "forkserver" in mp.get_all_start_methods():
        return "forkserver"
    return "spawn"


class _Job:
    """A task in the pool, with what to do when it is done."""

    __slots__ = ("task", "done", "fut", "crashes", "track", "late", "id")

    def __init__(
        self,
        task: Task,
        done: Callable[[TaskResult], None],
        fut: Future[TaskResult],
        crashes: int = 0,
        track: bool = False,
    ) -> None:
        self.task = task
        self.done = done
        self.fut = fut  # the scheduler's future, failed if the pool breaks
        self.crashes = crashes
        self.track = track  # announce every item in the slot (to name a crash's item)
        self.late: tuple[int, int, int] | None = None  # (stage, index, count) past its limit
        self.id = 0


class _Worker:
    __slots__ = (
        "process",
        "conn",
        "jobs",
        "specs",
        "send_lock",
        "dead",
        "outbox",
        "slot",
        "did",
        "outputs",
    )

    def __init__(self, process: Any, conn: Connection, slot: Any, outputs: list[_Output]) -> None:
        self.process = process
        self.conn = conn
        self.slot = slot
        self.outputs = outputs
        self.jobs: deque[_Job] = deque()
        self.specs: dict[str, None] = {}  # spec ids the worker holds, oldest first
        self.send_lock = threading.Lock()
        self.dead = False
        self.did = 0  # tasks completed
        self.outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()


class _Output:
    """One of a worker's output streams, copied line by line to the driver's own stream.

    Complete lines only are written, each in one call, so output of workers never
    interleaves mid-line and a live display (which redirects the driver's ``sys.stdout``)
    prints them above itself.
    """

    __slots__ = ("conn", "name", "partial")

    def __init__(self, conn: Connection, name: str) -> None:
        self.conn = conn
        self.name = name  # "stdout" or "stderr"
        self.partial = b""

    def read(self) -> bool:
        """Copy what is available; return False at end of file."""
        try:
            data = os.read(self.conn.fileno(), 1 << 16)
        except (OSError, ValueError):
            data = b""
        if not data:
            self.flush()
            return False
        data = self.partial + data
        end = data.rfind(b"\n") + 1
        self.partial = data[end:]
        if end:
            self.write(data[:end])
        return True

    def flush(self) -> None:
        if self.partial:
            self.write(self.partial + b"\n")
            self.partial = b""

    def write(self, data: bytes) -> None:
        stream = getattr(sys, self.name)
        if self.name == "stderr" and type(sys.stdout).__name__ == "FileProxy":
            # A live display (rich) is drawn on the terminal and proxies stdout only:
            # route error lines through it too, so they print above the display.
            stream = sys.stdout
        if stream is None:
            return
        try:
            stream.write(data.decode("utf-8", errors="replace"))
            stream.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        try:
            self.conn.close()
        except OSError:
            pass


def _parts(job: _Job, parts: list[tuple[Task, int, bool] | TaskResult]) -> list[_Job]:
    """Replace ``job`` by jobs for ``parts`` (tasks, or results already known), in order.

    The original job completes when every part has; finished parts complete at once.
    """
    callbacks = merge_parts(len(parts), job.done)
    jobs = []
    finished = []
    for part, on_done in zip(parts, callbacks):
        if isinstance(part, TaskResult):
            finished.append((on_done, part))
        else:
            task, crashes, track = part
            jobs.append(_Job(task, on_done, job.fut, crashes, track))
    for on_done, result in finished:
        on_done(result)
    return jobs


_OPEN: weakref.WeakSet[_State] = weakref.WeakSet()


def _close_all_at_exit() -> None:
    """Close every open process pool before multiprocessing's own exit handler runs.

    That handler joins child processes; closing first means it finds none, and no pool
    thread is left to start a replacement worker while it waits.
    """
    for state in list(_OPEN):
        state.close()


atexit.register(_close_all_at_exit)


class _State:
    """Everything a process pool's threads use, so that they never keep the pool alive.

    The :class:`ProcessPool` object holds this; a ``weakref.finalize`` closes it when the
    pool is garbage-collected, and an exit handler closes it at interpreter exit.
    """

    def __init__(self, size: int, ctx: Any, initializer: bytes | None) -> None:
        self.size = size
        self.ctx = ctx
        self.initializer = initializer
        self.lock = threading.Lock()
        self.pool: list[_Worker] = []
        self.pending: deque[_Job] = deque()
        self.ids = itertools.count()
        self.spec_blobs: dict[str, bytes] = {}
        self.wake_r, self.wake_w = mp.Pipe(duplex=False)
        self.manager: threading.Thread | None = None
        self.selector: selectors.BaseSelector | None = None
        self.watched: set[_Worker] = set()
        self.closed = False
        self.broken: PoolError | None = None
        self.start_failures = 0
        self.restarts = 0
        self.pickle_s = 0.0
        self.unpickle_s = 0.0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        with self.lock:
            for _ in range(self.size):
                self.pool.append(self.spawn())
        self.manager = threading.Thread(target=self.manage, name="papy-process-pool", daemon=True)
        self.manager.start()
        _OPEN.add(self)

    def spawn(self) -> _Worker:
        parent, child = self.ctx.Pipe(duplex=True)
        out_r, out_w = self.ctx.Pipe(duplex=False)
        err_r, err_w = self.ctx.Pipe(duplex=False)
        slot = self.ctx.RawArray("d", _worker.SLOT_SIZE)
        slot[_worker.INDEX] = _worker.UNBORN
        proc = self.ctx.Process(
            target=_worker.worker_main,
            args=(child, self.initializer, slot, os.getpid(), (out_w, err_w)),
            name="papy-worker",
            daemon=True,  # multiprocessing's exit handler must never wait for a worker
        )
        proc.start()
        for end in (child, out_w, err_w):
            end.close()
        w = _Worker(proc, parent, slot, [_Output(out_r, "stdout"), _Output(err_r, "stderr")])
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
            jobs = [j for w in workers for j in w.jobs] + list(self.pending)
            self.pending.clear()
            for w in workers:
                w.jobs.clear()
                w.outbox.put(None)
        _OPEN.discard(self)
        self.wake()
        if self.manager is not None and self.manager is not threading.current_thread():
            self.manager.join(timeout=5)
        # Workers hold no state worth saving: stop them (and whatever they started) now.
        for w in workers:
            try:
                w.conn.close()
            except OSError:
                pass
            _signal_group(w.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 2.0
        for w in workers:
            w.process.join(timeout=max(0.0, deadline - time.monotonic()))
        for w in workers:
            _signal_group(w.process.pid, signal.SIGKILL)
            if w.process.is_alive():
                w.process.join(timeout=1.0)
            _finish_outputs(w)
        error = PoolError("the pool was closed before the task finished")
        for job in jobs:
            job.done(job.task.fail_all(error))
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
        fut: Future[TaskResult] = Future()
        fut.set_running_or_notify_cancel()
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
                while len(self.spec_blobs) > _SPEC_CACHE:
                    self.spec_blobs.pop(next(iter(self.spec_blobs)), None)
        self.enqueue([_Job(task, done, fut)])
        return fut

    def enqueue(self, jobs: list[_Job], front: bool = False) -> None:
        with self.lock:
            if front:
                self.pending.extendleft(reversed(jobs))
            else:
                self.pending.extend(jobs)
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
            if worker is None or len(worker.jobs) >= _PER_WORKER:
                break
            job = self.pending.popleft()
            job.id = next(self.ids)
            worker.jobs.append(job)
            worker.outbox.put(job)
            timed = timed or job.task.timeout is not None or _has_timeout(job.task)
        if timed:
            self.wake()  # the manager must start watching deadlines

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

    def send_loop(self, w: _Worker) -> None:
        """Ship jobs to one worker, in order, so no other thread blocks on its pipe.

        A worker busy writing a large result stops reading its pipe; a sender per worker
        means a slow reader delays only its own tasks, never another worker's.
        """
        while True:
            entry = w.outbox.get()
            if entry is None:
                return
            if isinstance(entry, tuple):  # ("release", spec ids)
                try:
                    w.conn.send_bytes(frame((None, entry[1]), b""))
                except (OSError, ValueError):
                    return
                continue
            job: _Job = entry
            task = job.task
            spec_id = task.spec.id
            t0 = time.perf_counter()
            try:
                body = self.encode_items(job)
            except Exception as exc:  # pragma: no cover - encode isolates bad items itself
                body = dumps(job.task.fail_all(exc).values)
            with w.send_lock:
                if w.dead:
                    return  # the manager re-queues the jobs of dead workers
                drop = []
                if spec_id in w.specs:
                    blob = None
                    del w.specs[spec_id]  # most recently used goes last
                else:
                    blob = self.spec_blobs.get(spec_id)
                    if blob is None:  # dropped from the driver's cache meanwhile
                        blob = dumps_code(task.spec)
                    while len(w.specs) >= _SPEC_CACHE:
                        oldest = next(iter(w.specs))
                        del w.specs[oldest]
                        drop.append(oldest)
                w.specs[spec_id] = None
                keys = _keys(task.keys)
                header = (job.id, spec_id, blob, keys, task.jkeys, task.dirty, job.track, drop)
            try:
                w.conn.send_bytes(frame(header, body))
            except (OSError, ValueError):
                return  # the worker died; its sentinel fires and the manager re-queues
            self.pickle_s += time.perf_counter() - t0
            # Hold nothing while waiting: a task's callbacks reach the scheduler's run and
            # its pool, which must be free to be collected once the run is over.
            entry = job = task = header = body = None  # type: ignore[assignment]

    def encode_items(self, job: _Job) -> bytes:
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
                    timed = any(_has_timeout(j.task) for w in workers for j in w.jobs)
                for w in workers:
                    if w not in self.watched:
                        self.watched.add(w)
                        sel.register(w.conn, selectors.EVENT_READ, (False, w))
                        sel.register(w.process.sentinel, selectors.EVENT_READ, (True, w))
                        for out in w.outputs:
                            sel.register(out.conn, selectors.EVENT_READ, out)
                try:
                    events = sel.select(_TICK if timed else None)
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
                    if isinstance(key.data, _Output):
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

    def unwatch(self, w: _Worker) -> None:
        if w in self.watched and self.selector is not None:
            self.watched.discard(w)
            for obj in (w.conn, w.process.sentinel, *(out.conn for out in w.outputs)):
                try:
                    self.selector.unregister(obj)
                except (KeyError, ValueError, OSError):
                    pass

    def drain(self, w: _Worker) -> None:
        """Read every message the worker has sent."""
        while True:
            try:
                if not w.conn.poll():
                    return
                data = w.conn.recv_bytes()
            except (EOFError, OSError):
                return
            header, body = unframe(data)
            if isinstance(header, tuple) and header[0] == "init-failed":
                self.fail_to_start(header[1], body)
                return
            unloadable = isinstance(header, tuple)
            job_id = header[0] if unloadable else header
            with self.lock:
                if not w.jobs or w.jobs[0].id != job_id:
                    continue  # a result for a job already given up on (timed out)
                job = w.jobs.popleft()
                w.did += 1
                self.start_failures = 0
                self.assign_locked()
            t0 = time.perf_counter()
            try:
                loaded = pickle.loads(body)
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
            result.nbytes = len(body)
            self.unpickle_s += time.perf_counter() - t0
            job.done(result)

    def fail_to_start(self, text: str, body: memoryview) -> None:
        """Break the pool: its initializer fails, so no worker can ever run a task."""
        try:
            cause: BaseException | None = pickle.loads(body)
        except Exception:
            cause = None
        error = PoolError(f"the ProcessPool's initializer failed in a worker:\n{text}".rstrip())
        error.__cause__ = cause
        self.break_pool(error)

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

    def bury(self, w: _Worker) -> None:
        """Replace a dead worker and re-run or fail what it held."""
        w.process.join(timeout=1.0)
        code = w.process.exitcode
        _signal_group(w.process.pid, signal.SIGKILL)  # processes its node started
        running = read_slot(w.slot)
        unborn = w.slot[_worker.INDEX] == _worker.UNBORN
        with self.lock:
            if w.dead:
                return
            with w.send_lock:
                w.dead = True
            w.outbox.put(None)
            lost = list(w.jobs)
            w.jobs.clear()
            self.unwatch(w)
            self.pool.remove(w)
            if unborn:  # died before it could run anything: no task is to blame
                self.start_failures += 1
            replace = not self.closed and self.broken is None
            if replace and self.start_failures >= _START_FAILURES:
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
        _finish_outputs(w)
        try:
            w.conn.close()
        except OSError:
            pass
        if self.closed or (self.broken is not None and not lost):
            return
        if not replace and self.broken is None:
            self.break_pool(
                PoolError(
                    f"ProcessPool workers exit before they can start "
                    f"({_describe_exit(code).replace(' while running this item', '')}, "
                    f"{self.start_failures} times in a row); see the worker's stderr. With "
                    f"the {self.ctx.get_start_method()!r} start method a worker first "
                    "imports the main script (one with an 'if __name__ == \"__main__\":' "
                    "block): its top-level code must run without error there"
                )
            )
            return
        log.warning(
            "worker %s: %s; replaced (%d task(s) to re-run)",
            w.process.pid,
            "was killed for a timeout" if lost and lost[0].late else _describe_exit(code),
            len(lost),
        )
        retry: list[_Job] = []
        for i, job in enumerate(lost):
            if i > 0 or unborn:
                retry.append(job)  # never started: not its fault
                continue
            where = None
            if running is not None and running[0] == job.id and running[2] >= 0:
                where = (running[1], running[2], max(1, running[3]))
            retry.extend(self.after_death(job, code, where))
        self.enqueue(retry, front=True)

    def after_death(
        self, job: _Job, code: int | None, where: tuple[int, int, int] | None
    ) -> list[_Job]:
        """Return the jobs to run again after ``job``'s worker died; report what is known.

        ``where`` is (stage, item index, item count) from the worker's slot when it was
        running a tracked item. A late item fails with ``TimeoutError`` and its batch-mates
        run again; a crash re-runs the batch with every item tracked, then the named item
        alone to confirm, then reports it.
        """
        task = job.task
        n = len(task)
        stages = task.spec.stages
        if job.late is not None:
            s, i, c = job.late
            c = min(c, n - i)
            limit = stages[s].timeout or task.timeout or 0.0
            error = TimeoutError(
                f"item exceeded the node's timeout of {limit:g} s; "
                "its worker was killed and replaced"
            )
            failed = _fail_in(task.slice(i, i + c), error, s)
            parts: list[tuple[Task, int, bool] | TaskResult] = []
            if i > 0:
                parts.append((task.slice(0, i), 0, False))
            parts.append(failed)
            if i + c < n:
                parts.append((task.slice(i + c, n), 0, False))
            return _parts(job, parts)
        crashes = job.crashes + 1
        if where is not None and where[1] < n:
            s, i, c = where
            c = min(c, n - i)
            if c > 1:
                # A batched call of c items died: one of them is the culprit, but which is
                # unknown. Halve the call (its batch-mates outside it re-run as they are)
                # until the call holds one item, which is then confirmed as usual.
                half = c // 2
                parts = []
                if i > 0:
                    parts.append((task.slice(0, i), 0, False))
                parts.append((task.slice(i, i + half), 0, True))
                parts.append((task.slice(i + half, i + c), 0, True))
                if i + c < n:
                    parts.append((task.slice(i + c, n), 0, False))
                return _parts(job, parts)
            if c >= n:
                if crashes >= 2:
                    job.done(_fail_in(task, WorkerCrashed(_describe_exit(code), code), s, crashes))
                    return []
                job.crashes, job.track = crashes, True
                return [job]
            parts = []
            if i > 0:
                parts.append((task.slice(0, i), 0, False))
            parts.append((task.slice(i, i + c), crashes, True))
            if i + c < n:
                parts.append((task.slice(i + c, n), 0, False))
            return _parts(job, parts)
        if n == 1:
            if crashes >= 2:
                job.done(_fail_in(task, WorkerCrashed(_describe_exit(code), code), 0, crashes))
                return []
            job.crashes, job.track = crashes, True
            return [job]
        if not job.track:
            job.track = True  # run it again, every item announced: the next crash names it
            return [job]
        half = n // 2  # died outside any tracked item: fall back to halving
        return _parts(job, [(task.slice(0, half), 0, True), (task.slice(half, n), 0, True)])

    def enforce_deadlines(self) -> None:
        """Kill the workers whose current item ran past its node's timeout."""
        now = time.monotonic()
        victims = []
        with self.lock:
            for w in self.pool:
                if w.dead or not w.jobs:
                    continue
                running = read_slot(w.slot)
                if running is None:
                    continue
                job_id, s, i, c, start = running
                if i < 0 or s < 0:
                    continue
                job = next((j for j in w.jobs if j.id == job_id), None)
                if job is None or job.late is not None:
                    continue
                stages = job.task.spec.stages
                limit = stages[s].timeout if s < len(stages) else None
                if limit is None or stages[s].is_async:
                    continue  # no limit, or asyncio enforces it inside the task
                if now > start + max(1, c) * limit + _TICK:
                    job.late = (s, i, max(1, c))
                    victims.append(w)
        for w in victims:
            _signal_group(w.process.pid, signal.SIGKILL)


def _finish_outputs(w: _Worker) -> None:
    """Copy what a dead worker still had in its output pipes, then close them."""
    for out in w.outputs:
        try:
            while out.conn.poll(0) and out.read():
                pass
        except (OSError, ValueError):
            pass
        out.flush()
        out.close()


def _fail_in(task: Task, exc: BaseException, stage: int, attempts: int = 1) -> TaskResult:
    """Return ``task`` failed with ``exc`` in stage ``stage``, counted as a run counts it.

    Every stage of the step counts the items in (a Failure passes through the stages
    after the one it failed in, as it would in the worker), and stage ``stage`` counts
    them failed, so the report and ``on_error="raise"`` see the crash or the timeout.
    """
    result = task.fail_all(exc, task.spec.stages[stage].name, attempts)
    for st in result.stats:
        st.n_in = len(task)
    return result


def _has_timeout(task: Task) -> bool:
    return any(s.timeout is not None for s in task.spec.stages)


def _signal_group(pid: int | None, sig: int) -> None:
    """Send ``sig`` to a worker's process group (the worker and what it started)."""
    if pid is None:
        return
    try:
        os.killpg(pid, sig)
    except OSError:
        try:
            os.kill(pid, sig)  # not yet its own group leader
        except OSError:
            pass


class ProcessPool(Pool):
    """Run tasks in ``workers`` processes (default: one per core).

    ``start_method`` is ``"forkserver"`` on Linux by default (``"spawn"`` elsewhere): a
    worker does not inherit the driver's threads or locks. ``"fork"`` starts workers a
    little faster, but a lock held by any other thread of the driver when a worker is
    forked (a logging handler, a database driver) stays locked forever in that worker.
    ``initializer`` runs once in each worker before any task; if it raises, the run stops
    with a :class:`~papy.PoolError` carrying its exception and traceback.
    """

    kind = "process"
    target_task_s = 0.05
    item_timeouts = True  # the worker's slot times every item from its own start

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
        if self.start_method == "forkserver":
            self._ctx.set_forkserver_preload(_PRELOAD)
        self._initializer = initializer
        self._state: _State | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def restarts(self) -> int:
        """Return how many workers were replaced after a crash or a timeout."""
        return self._state.restarts if self._state is not None else 0

    def _start(self) -> None:
        init = dumps_code(self._initializer) if self._initializer is not None else None
        state = _State(self.workers, self._ctx, init)
        state.start()
        self._state = state
        # The pool's threads only know the state, so an unclosed pool is collected, and
        # closing the state then stops its workers.
        self._finalizer = weakref.finalize(self, state.close)

    def _submit(self, task: Task) -> Future[TaskResult]:
        assert self._state is not None
        return self._state.submit(task)

    def _close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()

    def release(self, spec_ids: Iterable[str]) -> None:
        """Forget the functions of steps whose run ended, here and in every worker."""
        if self._state is not None and not self._closed:
            self._state.release(spec_ids)

    def codec_seconds(self) -> dict[str, float]:
        """Return seconds this pool's threads spent pickling tasks and unpickling results."""
        s = self._state
        return {"pickle": s.pickle_s if s else 0.0, "unpickle": s.unpickle_s if s else 0.0}

    def pids(self) -> list[int]:
        """Return the process ids of the live workers (for monitoring and tests)."""
        return self._state.pids() if self._state is not None else []


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


if sys.platform == "win32":  # pragma: no cover
    raise ImportError("papy.pools.process needs a POSIX system")


def _keys(keys: Any) -> Any:
    # A range pickles in a few bytes whatever its length; keep it one.
    return keys if isinstance(keys, range) else list(keys)
