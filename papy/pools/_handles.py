"""The driver's handles on a ProcessPool's work: a job, a worker, a worker's output stream.

A :class:`Job` is a task in the pool with the callback that completes it; a :class:`Worker`
is one worker process with its pipe, its sender thread's queue, its slot and the jobs it
holds (one running, one queued), in the order it runs them.
"""

from __future__ import annotations

import _multiprocessing
import multiprocessing.resource_tracker
import multiprocessing.synchronize
import multiprocessing.util
import os
import queue
import select
import signal
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, InvalidStateError
from multiprocessing.connection import Connection
from typing import Any

from papy._errors import PoolError
from papy._interrupt import deferred
from papy._task import TaskResult
from papy.pools import _shm, _slot
from papy.pools._base import Task
from papy.pools._latch import Latch
from papy.pools._output import Output, finish_outputs
from papy.pools._worker import worker_main


class Job:
    """A task in the pool, with what to do when it is done."""

    __slots__ = (
        "task",
        "done",
        "fut",
        "crashes",
        "track",
        "late",
        "id",
        "withdrawn",
        "sent",
        "__weakref__",  # on_cancel holds its job weakly
    )

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
        self.withdrawn = False  # withdrawn from its worker by cancel(): it never runs
        #: set once the sender thread holds nothing of the task any more (see
        #: ``Manager.receive``); cleared while it is being sent
        self.sent = Latch()


#: seconds a worker may take to start (import, initializer) before the pool says so
SLOW_START_S = 30.0


class Worker:
    """One worker process, as the driver sees it."""

    __slots__ = (
        "process",
        "conn",
        "jobs",
        "specs",
        "send_lock",
        "dead",
        "outbox",
        "slot",
        "claim_lock",
        "did",
        "outputs",
        "sock",
        "pidfd",
        "eof",
        "hung_up_alive",
        "born_by",
        "_poller",
        "__weakref__",
    )

    def __init__(
        self,
        process: Any,
        conn: Connection,
        slot: Any,
        outputs: list[Output],
        sock: socket.socket | None = None,
        claim_lock: Any = None,
    ) -> None:
        self.process = process
        self.conn = conn
        self.sock = sock  # the socket under ``conn``: shared-memory descriptors travel on it
        self.slot = slot
        #: guards the slot's claim fields (see :func:`papy.pools._slot.withdraw`)
        self.claim_lock = claim_lock
        self.outputs = outputs
        self.jobs: deque[Job] = deque()
        self.specs: dict[str, None] = {}  # spec ids the worker holds, oldest first
        #: when (time.monotonic()) a worker still starting is reported slow, or None
        self.born_by: float | None = time.monotonic() + SLOW_START_S
        self.send_lock = threading.Lock()
        self.dead = False
        self.did = 0  # tasks completed
        self.outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._poller = select.poll()
        self._poller.register(conn.fileno(), select.POLLIN)
        #: readable once the process has exited (Linux), even while a process it forked
        #: holds its end of the pipe and of its sentinel open; None where there are none
        self.pidfd = open_pidfd(process.pid)
        self.eof = False  # a read met the end of the pipe
        self.hung_up_alive = False  # its pipe closed while it lived: the pool killed it

    def has_message(self) -> bool:
        """Tell whether a message (or the end of the pipe) waits, without blocking.

        One system call: ``Connection.poll()`` builds a selector per call, which cost
        more than the rest of receiving a small result. The manager thread's alone (a
        ``select.poll`` object refuses two threads polling it at once).
        """
        return not self.conn.closed and bool(self._poller.poll(0))

    def hung_up(self) -> bool:
        """Tell whether the worker's end of the pipe is closed (it is exiting or gone)."""
        if self.conn.closed or self.eof:
            return True
        return any(ev & (select.POLLHUP | select.POLLERR) for _, ev in self._poller.poll(0))

    def close_conn(self) -> None:
        """Close the driver's end of the worker's pipe (the socket under it, its pidfd)."""
        for end in (self.conn, self.sock):
            try:
                if end is not None:
                    end.close()
            except OSError:
                pass
        pidfd, self.pidfd = self.pidfd, None
        if pidfd is not None:
            os.close(pidfd)


def open_pidfd(pid: int | None) -> int | None:
    """Return a descriptor that becomes readable when process ``pid`` exits, or None."""
    if pid is None or not hasattr(os, "pidfd_open"):
        return None
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None  # gone already (its sentinel says so), or no pidfd in this kernel


def signal_group(pid: int | None, sig: int) -> None:
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


def exits_within(process: Any, seconds: float) -> bool:
    """Tell whether ``process`` has exited, waiting up to ``seconds`` (never in ``waitpid``)."""
    end = time.monotonic() + seconds
    while process.exitcode is None:
        if time.monotonic() >= end:
            return False
        time.sleep(0.001)
    return True


def kill_hung_up(w: Worker) -> None:
    """Kill a worker whose pipe to the driver closed: it cannot report any more, alive or
    not. Notes whether it was alive (a dying process closes its files a moment before it
    exits), so that its death is told as the pool's kill, not as the node's."""
    w.hung_up_alive = not exits_within(w.process, 0.05)
    signal_group(w.process.pid, signal.SIGKILL)


def reap_worker(w: Worker) -> tuple[int | None, bool]:
    """Reap a dead worker (see :func:`reap`); return its exit code as its slot explains
    it (see :func:`~papy.pools._slot.exit_code`) and whether the pool's kill ended it."""
    code, alive = reap(w.process, grace=0.5)
    killed = (alive or w.hung_up_alive) and code == -signal.SIGKILL and not w.slot[_slot.EXIT]
    return _slot.exit_code(w.slot, code), killed


def reap(process: Any, grace: float) -> tuple[int | None, bool]:
    """Kill a worker taken for dead and its process group; return its exit code, and
    whether it was still alive after ``grace`` (the kill is then the pool's).

    Waits up to ``grace`` seconds for the worker to exit by itself first (its own exit
    code is the one to report), without ever blocking on it: under ``fork`` and ``spawn``
    a sentinel that fires only says every copy of a pipe end is closed, which a live node
    can do (closing its descriptors), so ``Process.join`` would wait in ``waitpid`` for as
    long as the node runs, and the pool's manager with it. What the node started goes
    with the group.
    """
    code = process.exitcode  # waitpid(WNOHANG): never blocks
    end = time.monotonic() + grace
    while code is None and time.monotonic() < end:
        time.sleep(0.005)
        code = process.exitcode
    alive = code is None
    signal_group(process.pid, signal.SIGKILL)
    end = time.monotonic() + 5.0
    while code is None and time.monotonic() < end:
        time.sleep(0.005)
        code = process.exitcode
    if code is not None:
        process.join(timeout=0)  # reaped: multiprocessing forgets it
    return code, alive


def starts(fut: Future[TaskResult]) -> bool:
    """Mark a job's future running once its task is known to have started; False if it
    was cancelled.

    A future stays pending while its task waits in the driver or in a worker's pipe (so
    :func:`withdraw_held` can still cancel it); a task that started cannot be withdrawn.
    """
    if fut.running():
        return True
    try:
        return fut.set_running_or_notify_cancel()
    except RuntimeError:  # already done (the pool broke): nothing left to run
        return False


def fail_closed(jobs: list[Job]) -> PoolError:
    """Fail the futures of ``jobs`` (not done yet) because the pool closed; return the error."""
    error = PoolError("the pool was closed before the task finished")
    for job in jobs:
        fail(job.fut, error)
    return error


def stop_workers(workers: list[Worker]) -> None:
    """Stop ``workers`` and whatever they started: SIGTERM, 2 s at most, then SIGKILL."""
    for w in workers:
        w.close_conn()
        signal_group(w.process.pid, signal.SIGTERM)
    deadline = time.monotonic() + 2.0
    for w in workers:
        w.process.join(timeout=max(0.0, deadline - time.monotonic()))
    for w in workers:
        signal_group(w.process.pid, signal.SIGKILL)
        if w.process.is_alive():
            w.process.join(timeout=1.0)
        finish_outputs(w.outputs)


def fail(fut: Future[TaskResult], error: BaseException) -> None:
    """Fail ``fut`` with ``error`` unless it is done already (answered, failed, cancelled)."""
    try:
        if not fut.done():
            fut.set_exception(error)
    except InvalidStateError:
        pass  # answered meanwhile


def withdraw_held(w: Worker, wanted: set[int]) -> int:
    """Withdraw the jobs of ``w`` whose futures' ids are in ``wanted`` and have not started.

    Called under the pool's lock. A withdrawn job stays in ``w.jobs`` (marked) until the
    worker answers it with a "withdrawn" message, so the jobs a worker holds, their order
    and crash recovery stay as they were; its future is cancelled now. A job the worker
    already took up is marked running and finishes as usual. Returns how many were withdrawn.
    """
    withdrawn = 0
    for job in w.jobs:
        fut = job.fut
        if id(fut) not in wanted or job.withdrawn:
            continue
        if fut.cancelled() and w.claim_lock is not None:  # by its holder: withdraw it too
            if not w.dead and _slot.withdraw(w.slot, w.claim_lock, job.id):
                husk(job)
            continue
        if fut.done() or fut.running():
            continue
        if w.dead or w.claim_lock is None or not _slot.withdraw(w.slot, w.claim_lock, job.id):
            starts(fut)
            continue
        husk(job)
        withdrawn += fut.cancel()
    return withdrawn


def steal(idle: Worker, workers: Iterable[Worker]) -> Job | None:
    """Take back a job queued in another worker's pipe, behind the job it runs, for ``idle``.

    Called under the pool's lock when ``idle`` has nothing to do and nothing waits in the
    driver: a job queued behind a long one (a slow item, the task of a run left early)
    would otherwise wait for it while a worker idles. So would any job of a worker that has
    not started yet (its initializer runs long, or never returns). The job is withdrawn
    from its worker through the claim protocol (it stays there, marked, until the worker
    answers it) and returned as a new job for the same task and future; None if no job
    can be taken.
    """
    for w in workers:
        if w is idle or w.dead or w.claim_lock is None:
            continue
        unborn = w.slot[_slot.INDEX] == _slot.UNBORN
        for job in w.jobs if unborn else (w.jobs[-1],) if len(w.jobs) > 1 else ():
            if job.withdrawn or job.fut.done():
                continue
            if not _slot.withdraw(w.slot, w.claim_lock, job.id):
                break  # started meanwhile
            moved = Job(job.task, job.done, job.fut, job.crashes, job.track)
            husk(job)
            return moved
    return None


def husk(job: Job) -> None:
    """Mark ``job`` withdrawn and let go of its items: it only waits for its worker's
    "withdrawn" answer now, which may come long after (a worker busy with a long task)."""
    job.withdrawn = True
    job.task = job.task.slice(0, 0)


def on_cancel(state: weakref.ref[Any], job: weakref.ref[Job], fut: Future[TaskResult]) -> None:
    """Done-callback of a job's future: a future its holder cancelled is withdrawn too.

    ``state`` is the pool's :class:`~papy.pools._driver.State`. A job queued in the driver
    is skipped when its turn comes; one in a worker's pipe is withdrawn through the claim
    protocol unless the worker took it up already (its result is then dropped).
    ``State.cancel`` marks its jobs withdrawn before cancelling them, so this never waits
    for the lock ``cancel`` holds.
    """
    s, j = state(), job()
    if s is None or j is None or j.withdrawn or not fut.cancelled():
        return
    with s.lock:
        for w in s.pool:
            withdraw_held(w, {id(fut)})


def wire_keys(keys: Any) -> Any:
    # A range pickles in a few bytes whatever its length; keep it one.
    return keys if isinstance(keys, range) else list(keys)


def warm_up(ctx: Any) -> None:
    """Start and join one process that does nothing, so the fork server has loaded its
    modules before the first worker's claim lock (a named semaphore) exists: the name
    then lives for the milliseconds a worker takes to start, not for the fork server's
    start-up (0.5-1 s on a loaded machine), in which a driver killed with its process
    group (a hangup) would leave it in ``/dev/shm`` for good."""
    if ctx.get_start_method() == "forkserver":
        proc = ctx.Process(target=int, name="papy-warm-up", daemon=True)
        with deferred():  # cut in half, the new process reads a truncated pipe
            proc.start()
        proc.join()


def start_worker(ctx: Any, initializer: bytes | None, shm_threshold: int | None) -> Worker:
    """Start one worker process (``ctx``: a multiprocessing context) and return its handle;
    on an error (no descriptors left, the fork server gone) close what was opened."""
    ends: list[Any] = []
    proc = None
    try:
        for duplex in (True, False, False):
            ends.extend(ctx.Pipe(duplex=duplex))
        parent, child, out_r, out_w, err_r, err_w = ends
        slot = ctx.RawArray("d", _slot.SLOT_SIZE)
        slot[_slot.INDEX] = _slot.UNBORN
        slot[_slot.SEEN] = slot[_slot.W0] = slot[_slot.W1] = -1.0  # job ids start at 0
        lock = ctx.Lock()  # the slot's claim lock, shared by the driver and this worker
        drop_name_when_collected(lock)
        proc = ctx.Process(
            target=worker_main,
            args=(
                child,
                initializer,
                slot,
                os.getpid(),
                (out_w, err_w),
                shm_threshold,
                lock,
                _shm.segment_limit(),  # from the driver's open-file limit, not the worker's
            ),
            name="papy-worker",
            daemon=True,  # multiprocessing's exit handler must never wait for a worker
        )
        with deferred():  # a Ctrl-C waits until the process has its arguments
            proc.start()
        for end in (child, out_w, err_w):
            end.close()
        sock = None
        if shm_threshold is not None:  # shared-memory descriptors travel on the pipe's socket
            sock = socket.socket(fileno=os.dup(parent.fileno()))
        outputs = [Output(out_r, "stdout"), Output(err_r, "stderr")]
        return Worker(proc, parent, slot, outputs, sock, lock)
    except BaseException:
        # Dropping the lock drops the semaphore's name, which the new process may still
        # have to open (a FileNotFoundError traceback): stop it first.
        if proc is not None and proc.pid is not None:
            proc.kill()
            proc.join()
        for end in ends:
            end.close()
        raise


def drop_name_when_collected(lock: Any) -> None:
    """Make the driver's removal of ``lock``'s semaphore name tolerate the worker's.

    Under ``forkserver`` and ``spawn`` a ``multiprocessing`` lock is a named semaphore
    (``/dev/shm/sem.mp-*``) that the worker opens by name. The worker removes the name as
    soon as it has it open (both processes keep the semaphore): a name left by a driver
    killed with its resource tracker (a hangup, ``kill -9 -PGID``) would stay for good.
    The driver's own removal, when the lock is collected (a worker that never started),
    must then accept that the name is gone already, which multiprocessing's does not.
    """
    name = _slot.semaphore_name(lock)
    if name is None:
        return  # fork: unnamed from the start
    cleanup = multiprocessing.synchronize.SemLock._cleanup  # type: ignore[attr-defined]
    for finalizer in list(multiprocessing.util._finalizer_registry.values()):  # type: ignore[attr-defined]
        if finalizer._callback is cleanup and finalizer._args == (name,):
            finalizer.cancel()
    weakref.finalize(lock, drop_name, name)


def drop_name(name: str) -> None:
    """Remove a semaphore's name unless it is gone already, and untrack it."""
    try:
        _multiprocessing.sem_unlink(name)  # type: ignore[attr-defined]
    except OSError:
        return  # removed by its worker, which untracked it
    multiprocessing.resource_tracker.unregister(name, "semaphore")  # type: ignore[attr-defined]


def give_back(ref: weakref.ref[Worker], segment: int, reuse: bool) -> None:
    """Tell a worker that no process maps its ``segment`` any more (or that it goes)."""
    w = ref()
    if w is not None and not w.dead:
        w.outbox.put(("free", segment, reuse))


def free_note(
    entry: tuple[str, int, bool], outbox: queue.SimpleQueue[Any]
) -> tuple[tuple[Any, ...], list[Any]]:
    """Gather a ``("free", segment, reuse)`` entry and the ones queued right behind it.

    Returns the worker's message ``(-1, segments to reuse, segments to free)`` (one
    message for a task's worth of segments, not one each) and the entry that ended the
    run, if one was taken off the outbox (a list of zero or one entry).
    """
    reuse: list[int] = []
    forget: list[int] = []
    while True:
        (reuse if entry[2] else forget).append(entry[1])
        try:
            nxt = outbox.get_nowait()
        except queue.Empty:
            return (-1, reuse, forget), []
        if not (isinstance(nxt, tuple) and nxt[0] == "free"):
            return (-1, reuse, forget), [nxt]
        entry = nxt
