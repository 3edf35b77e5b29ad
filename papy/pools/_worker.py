"""The main loop of a ProcessPool worker process.

Messages are framed pickles on a private socket, one per task (see
:mod:`papy.pools._messages`), so the driver always knows which task each worker holds:
that is what lets the pool re-run exactly the batch a dead worker lost and pin down an item
that kills its worker. (This is why the engine keeps its own small process pool instead of
``multiprocessing.Pool``, which hangs when a worker dies, or ``ProcessPoolExecutor``, which
breaks the whole pool.) Large buffers travel beside the messages in shared memory
(:mod:`papy.pools._shm`).

A worker:

- leads its own process group, so the driver can kill it together with any processes its
  node functions started (a node may use ``multiprocessing`` or a nested PaPy pool);
- watches the driver's process from a thread and exits, with its whole group, within a
  fraction of a second of the driver's death, whatever it is running;
- publishes which item of which stage it is running in a small shared-memory *slot*
  (:class:`~papy.pools._slot.SlotTracker`), so the driver can enforce per-item timeouts and
  name the item that killed a worker;
- gives the processes its node functions fork a fresh Python process's signal handling
  (:func:`papy._interrupt.fork_defaults`), not its own;
- imports the user's file once (see :func:`papy.pools._functions.from_file`), so node
  functions, the initializer and module-level state share one namespace, as under
  ``python file.py``.
"""

from __future__ import annotations

import _multiprocessing
import functools
import io
import multiprocessing
import multiprocessing.resource_tracker
import os
import pickle
import select
import signal
import socket
import sqlite3
import stat
import sys
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from papy._errors import JournalError
from papy._interrupt import fork_defaults
from papy._items import qualified_type
from papy._journal import forks
from papy._journal.files import sqlite_error
from papy._task import CriticalSection, StepSpec, run_task
from papy.pools import _fds, _shm
from papy.pools._messages import dumps, encode_result, frame, loads, rebuild_each, unframe
from papy.pools._slot import EXIT, REBUILD, SEND, SlotTracker, semaphore_name


def _on_sigterm(critical: CriticalSection, slot: Any, signum: int, frame: Any) -> None:
    """Exit now, unless a journaled task is committing: then right after it (30 s at most).

    The exit kills the whole process group, this process included (SIGKILL), so the
    signal is written to the slot first: the driver reports SIGTERM, not SIGKILL.
    """
    if slot is not None:
        slot[EXIT] = signum
    if critical.defer():
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(30)
        return
    _exit_group(128 + signum)


def _ignore(signum: int, frame: Any) -> None:
    """SIGINT in a worker: nothing (a handler, not SIG_IGN, which programs a node runs
    would inherit across ``exec``)."""


def _exit_group(code: int) -> None:
    """Exit at once, taking along every process the node functions started.

    Called from the driver-watching thread too, where ``signal.signal`` is not allowed:
    then this process may get the polite SIGTERM as well, which ends it just the same.
    """
    try:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.killpg(os.getpid(), signal.SIGTERM)  # children first, politely...
    except (OSError, ValueError):
        pass
    try:
        os.killpg(os.getpid(), signal.SIGKILL)  # ...then for sure (this process included)
    except OSError:
        pass
    os._exit(code)


def _watch_driver(driver_pid: int, critical: CriticalSection) -> None:
    """Exit with the whole process group when the driver process dies.

    Linux's parent-death signal follows the *thread* that started a process, and a worker
    started by a fork server is not the driver's child at all, so the worker watches the
    driver itself: with a pidfd where the kernel has them, else by polling its pid.
    """
    try:
        _wait_for_exit(driver_pid)
    except Exception:  # whatever failed (no pidfds here), polling the pid still works
        while True:
            time.sleep(0.2)
            try:
                os.kill(driver_pid, 0)
            except ProcessLookupError:
                break
            except OSError:
                pass
    # A journaled task commits its outputs before the worker goes (30 s at most): the
    # journal then holds exactly what was done when the driver died.
    deadline = time.monotonic() + 30
    while critical.defer() and time.monotonic() < deadline:
        time.sleep(0.02)
    _exit_group(70)


def _wait_for_exit(pid: int) -> None:
    """Return when process ``pid`` has exited, through a pidfd.

    ``poll``, not ``select``: a forked worker inherits its driver's descriptors, so the
    pidfd's number may be above 1023, which ``select`` cannot take. Raises OSError (or
    AttributeError) where the kernel or Python has no pidfds.
    """
    fd = os.pidfd_open(pid)
    try:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        while not poller.poll():
            pass  # poll() retries by itself on EINTR; an empty answer cannot happen
    finally:
        os.close(fd)


def _forget_inherited_fork_server() -> None:
    """Let a forked worker start its own ``multiprocessing`` fork server when a node asks.

    A worker started by ``fork`` inherits its driver's record of the driver's fork server:
    ``ensure_running`` then waits for a process that is not its child and raises
    ``ChildProcessError``, so every node using ``get_context("forkserver")`` failed (in a
    plain process it works). The worker's copy of the server's keep-alive descriptor is
    closed (that server ends with its driver, not with the last worker) and the lock,
    which another driver thread may have held at the fork, is a new one.
    """
    from multiprocessing import forkserver

    server = getattr(forkserver, "_forkserver", None)
    if server is None or getattr(server, "_forkserver_pid", None) is None:
        return
    alive = getattr(server, "_forkserver_alive_fd", None)
    server._lock = threading.Lock()
    server._forkserver_pid = None
    server._forkserver_address = None
    server._forkserver_alive_fd = None
    if hasattr(server, "_forkserver_authkey"):  # Python 3.12.9 and later
        server._forkserver_authkey = None
    if alive is not None:
        try:
            os.close(alive)
        except OSError:
            pass


def _drop_inherited_pipes(conn: Connection) -> None:
    """In a worker started by ``fork``: let go of the pipes the driver had open at the fork.

    Every descriptor of the driver's is this worker's too. The end of a pipe another
    driver thread had just made (``subprocess`` waiting to hear that its child started,
    a child's stdout, another worker's pipes while it started) then stays open as long
    as this worker lives, and whoever waits for that pipe's end waits for good. Pipes
    made close-on-exec (Python makes every descriptor so) that are not this worker's own
    (``conn``, its standard streams, its liveness pipes to the driver, the resource
    tracker's) are pointed at ``/dev/null``: the pipe is let go, and the number stays
    taken, so nothing that still holds it closes another file later. Files and sockets
    are kept (a log file, say). Nothing is done under ``forkserver`` and ``spawn``,
    whose workers inherit nothing.
    """
    from multiprocessing import popen_fork

    frame = sys._getframe()
    launch = popen_fork.Popen._launch.__code__  # type: ignore[attr-defined]
    while frame is not None and frame.f_code is not launch:
        frame = frame.f_back  # type: ignore[assignment]
    if frame is None:
        return
    forks.forked_from_threads()
    keep = {0, 1, 2, conn.fileno(), frame.f_locals.get("child_w"), frame.f_locals.get("child_r")}
    keep.add(getattr(multiprocessing.resource_tracker._resource_tracker, "_fd", None))
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd in keep or fd == null:
                continue
            try:
                if stat.S_ISFIFO(os.fstat(fd).st_mode) and not os.get_inheritable(fd):
                    os.dup2(null, fd, inheritable=False)
            except OSError:
                continue  # the listing's own descriptor, gone now
    finally:
        os.close(null)


def _untrack(name: str) -> None:
    """Tell the resource tracker the driver registered ``name`` with that it is gone.

    A nested pool's driver (a worker of an outer pool, killed by a timeout) shares the
    top driver's tracker, which otherwise warns at exit of "leaked semaphore objects" it
    then fails to remove. Written to the tracker's pipe directly: the public
    ``unregister`` would start a new tracker if this one died with the driver.
    """
    fd = getattr(multiprocessing.resource_tracker._resource_tracker, "_fd", None)
    if fd is None:
        return
    try:
        os.write(fd, f"UNREGISTER:{name}:semaphore\n".encode("ascii"))
    except OSError:
        pass  # the tracker is gone too


def _allow_children() -> None:
    """Let node functions start processes of their own.

    The driver starts workers as daemonic processes, so that multiprocessing's exit
    handler never waits for them; multiprocessing forbids children to daemonic processes,
    for the reason that they could be orphaned. A worker cleans up its own children (its
    process group dies with it), so it marks itself non-daemonic from the inside.
    """
    multiprocessing.current_process()._config["daemon"] = False  # type: ignore[attr-defined]


def _redirect_output(outputs: tuple[Connection, Connection] | None) -> None:
    """Send this process's stdout and stderr (file descriptors 1 and 2) to the driver.

    The driver prints what arrives line by line, above its live display, so output of
    node functions (and of anything they start) reaches the terminal whole.
    """
    if outputs is None:
        return
    for fd, conn, stream in ((1, outputs[0], sys.stdout), (2, outputs[1], sys.stderr)):
        try:
            if stream is not None:
                stream.flush()
            os.dup2(conn.fileno(), fd)
            conn.close()
            if isinstance(stream, io.TextIOWrapper):
                stream.reconfigure(line_buffering=True)
        except (OSError, ValueError):  # pragma: no cover - keep the inherited streams
            pass


def worker_main(
    conn: Connection,
    initializer: bytes | None = None,
    slot: Any = None,
    driver_pid: int | None = None,
    outputs: tuple[Connection, Connection] | None = None,
    shm_threshold: int | None = None,
    claim_lock: Any = None,
    shm_segments: int | None = None,
) -> None:
    """Receive tasks, run them, send results back, until the pipe closes.

    Before starting a task the worker claims it in its slot, under ``claim_lock`` (shared
    with the driver): a task the driver withdrew meanwhile is answered with an empty
    "withdrawn" message (``unloadable`` is None) and never runs. ``unloadable`` is True
    when the node's function cannot be loaded here, ``"items"`` when the task's items
    cannot be rebuilt (nothing ran: the driver halves the batch to find which), and the
    payload is then the error.

    A failing initializer is reported to the driver once, with its traceback, and the
    worker exits with code 1: the driver then fails the run with a PoolError instead of
    restarting workers that cannot start. Buffers of ``shm_threshold`` bytes or more in a
    result go back through shared memory (None: every byte through the pipe), at most
    ``shm_segments`` of them in flight (see :class:`~papy.pools._shm.Arena`).
    """
    signal.signal(signal.SIGINT, _ignore)  # Ctrl-C is the driver's to handle
    critical = CriticalSection()  # this process's journaled tasks, for SIGTERM
    signal.signal(signal.SIGTERM, functools.partial(_on_sigterm, critical, slot))
    # What a node forks gets a fresh process's handling, not this worker's exit code.
    fork_defaults({signal.SIGTERM: signal.SIG_DFL, signal.SIGINT: signal.default_int_handler})
    _forget_inherited_fork_server()
    try:
        os.setpgid(0, 0)
    except OSError:  # pragma: no cover - already a group leader
        pass
    name = semaphore_name(claim_lock)
    # Open here and in the driver: the name can go (see _handles.drop_name_when_collected).
    if name is not None:
        try:
            _multiprocessing.sem_unlink(name)  # type: ignore[attr-defined]
        except OSError:
            pass
        else:
            _untrack(name)
    _redirect_output(outputs)
    _drop_inherited_pipes(conn)
    _allow_children()
    if driver_pid is not None:
        threading.Thread(
            target=_watch_driver,
            args=(driver_pid, critical),
            name="papy-watch-driver",
            daemon=True,
        ).start()
    if initializer is not None:
        try:
            pickle.loads(initializer)()
        except BaseException as exc:
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            try:
                conn.send_bytes(frame(("init-failed", text), _pickled_error(exc)))
            except OSError:
                pass
            os._exit(1)
    tracker = SlotTracker(slot, claim_lock) if slot is not None else None
    if tracker is not None:
        tracker.idle()  # started: from now on a death is the fault of a task, if any
    # The socket under the pipe carries the descriptors of shared-memory segments.
    sock = socket.socket(fileno=os.dup(conn.fileno())) if shm_threshold is not None else None
    arena = _shm.Arena(shm_segments)
    _shm.REGISTRY.clear()  # inherited through ``fork``: the driver's, not this process's
    specs: dict[str, StepSpec | BaseException] = {}
    while True:
        try:
            data = conn.recv_bytes()
            header, body = unframe(data)
            if header[0] is None:  # ("release", spec ids): runs that ended
                for spec_id in header[1]:
                    specs.pop(spec_id, None)
                arena.drop_spares()
                continue
            if header[0] == -1:  # segments nobody maps any more: to reuse, or to free
                arena.release(header[1], reuse=True)
                arena.release(header[2], reuse=False)
                continue
            job_id, spec_id, spec_blob, keys, jkeys, dirty, every_item, drop, descs, nfds = header
            fds = _fds.recv_fds(sock, nfds) if nfds and sock is not None else []
        except (EOFError, OSError):
            return
        for old in drop:  # the driver's cache of this worker's functions is full
            specs.pop(old, None)
        if spec_blob is not None:
            try:
                specs[spec_id] = pickle.loads(spec_blob)
            except BaseException as exc:
                specs[spec_id] = exc
        spec = specs[spec_id]
        if tracker is not None and not tracker.claim(job_id):
            _fds.close_fds(fds)  # withdrawn by the driver: answer, never run it
            try:
                conn.send_bytes(frame((job_id, None, [], 0, [], []), b""))
            except OSError:
                return
            continue
        out = _shm.Outgoing(shm_threshold, None, arena) if shm_threshold is not None else None
        mapped = _shm.MAPPED  # (mapping, inode) of the task's inputs
        mapped.clear()
        if isinstance(spec, BaseException):
            # The node's function cannot be loaded here (an ImportError, say): the driver
            # fails the task's items with that error; the worker itself is fine.
            _fds.close_fds(fds)
            unloadable: bool | str = True
            payload = _pickled_error(spec)
        else:
            unloadable = False
            if tracker is not None:
                tracker.every_item = bool(every_item)
                tracker.start_job(job_id)
            try:
                if every_item and tracker is not None:
                    values = rebuild_each(body, functools.partial(tracker.begin, REBUILD))
                else:
                    values = loads(body, _shm.map_buffers(fds, descs, None, (), mapped))
            except Exception as exc:
                # Nothing ran. Alone, the item fails with this; in a batch, the driver
                # sends the halves again to find which items cannot be rebuilt.
                unloadable = "items"
                payload = _pickled_error(
                    TypeError(
                        f"the item could not be rebuilt in the worker process "
                        f"({qualified_type(exc)}: {exc}); is its type importable there?"
                    )
                )
                values = data = body = None  # type: ignore[assignment]
            else:
                try:
                    result = run_task(spec, keys, values, jkeys, dirty, tracker, critical)
                except (JournalError, sqlite3.Error) as exc:
                    # The run's journal failed, not the items: the driver stops the run with
                    # it (this worker lives on; dying would blame the items for a crash).
                    unloadable, payload = "journal", _pickled_error(_journal_error(spec, exc))
                    result = None  # type: ignore[assignment]
                # Free the task's inputs (and their shared-memory mappings) before waiting.
                values = data = body = None  # type: ignore[assignment]
                if result is not None and every_item and tracker is not None:
                    _pickle_each(result.values, tracker)
                if result is not None:
                    payload = encode_result(result, spec, keys, out)
                    result = None  # type: ignore[assignment]
            if tracker is not None:
                tracker.idle()
        # Inputs this process still maps (a node kept a reference): the producer must not
        # write into those segments again.
        pinned = [ino for ref, ino in mapped if ref() is not None or ino in _shm.FORKED]
        mapped.clear()
        _shm.FORKED.clear()
        try:
            sent = (out.descs, len(out.fds), out.segments) if out is not None else ([], 0, [])
            conn.send_bytes(frame((job_id, unloadable, *sent, pinned), payload))
            if out is not None and out.fds:
                _fds.send_fds(sock, out.fds)  # type: ignore[arg-type]
        except (BrokenPipeError, OSError):
            return
        finally:
            if out is not None:
                out.close()


def _pickle_each(values: list[Any], tracker: SlotTracker) -> None:
    """Pickle each result alone, announced in the slot, and drop the pickles: a result
    whose pickling kills the worker is then named (a task that killed a worker once)."""
    for i, value in enumerate(values):
        tracker.begin(SEND, i)
        try:
            dumps(value)
        except Exception:
            pass  # encode_result turns it into a Failure naming its type


def _journal_error(spec: StepSpec, exc: Exception) -> Exception:
    """Return a journal failure as a JournalError naming the file and the cause."""
    if isinstance(exc, sqlite3.Error) and spec.journal is not None:
        return sqlite_error(spec.journal.path, exc, spec.journal.ident)
    return exc


def _pickled_error(exc: BaseException) -> bytes:
    """Pickle an exception for the driver, as itself when it travels, else as text."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        body = dumps(exc)
        pickle.loads(body)
        return body
    except Exception:
        return dumps(RuntimeError(f"{qualified_type(exc)}: {exc}\n{text}"))
