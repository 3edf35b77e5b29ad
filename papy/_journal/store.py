"""Worker-side access to a run's journal: connections, write locks, the task guard.

A :class:`Store` is one run's access to its journal file from one process. In the
driver's process the run's :class:`~papy._journal.journal.Journal` makes it and closes it
when the run ends (every thread's connection with it); a thread or inline pool reaches it
through the :class:`JournalSpec` it runs (``spec.store``, never pickled). A worker process
opens its own, kept per thread in a ``ContextVar`` for the next tasks of the same run and
closed when a task of a later run on that journal arrives (or when it is garbage).

Locks are open-file-description locks (``F_OFD_SETLK``) where the system has them: they
belong to one descriptor, so closing a store's descriptor never drops a lock held through
another (POSIX ``lockf`` locks belong to the process, and closing any descriptor of the
file drops them all); and two runs in one process exclude each other like two processes.
Where the system lacks them, ``lockf`` is used: two runs in one process are then not told
apart, and a worker store closed in the driver's process would drop the run's lock.
"""

from __future__ import annotations

import fcntl
import functools
import os
import sqlite3
import struct
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from papy._errors import JournalError
from papy._journal import forks
from papy._journal.files import (
    INSERT_OUTPUT,
    TASK_BYTE,
    WRITE_BYTE,
    connect,
    file_ident,
    open_lock,
    replaced_error,
    sqlite_error,
)
from papy._journal.secret import Signer

_OFD = getattr(fcntl, "F_OFD_SETLK", None)
_OFD_WAIT = getattr(fcntl, "F_OFD_SETLKW", None)
_FLOCK = struct.Struct("hhqqi4x")  # struct flock: type, whence, start, len, pid (0 for OFD)
_KINDS = {fcntl.LOCK_EX: fcntl.F_WRLCK, fcntl.LOCK_SH: fcntl.F_RDLCK, fcntl.LOCK_UN: fcntl.F_UNLCK}


def ofd_locks() -> bool:
    """Tell whether this system has open-file-description locks (Linux does)."""
    return _OFD is not None and _OFD_WAIT is not None


def lock_byte(fd: int, kind: int, byte: int, wait: bool = True) -> None:
    """Lock (``LOCK_EX``/``LOCK_SH``) or unlock (``LOCK_UN``) one byte of the lock file.

    An open-file-description lock where the system has them, else a POSIX ``lockf``
    lock. Raises OSError when ``wait`` is False and someone else holds the byte.
    """
    if _OFD is None or _OFD_WAIT is None:
        fcntl.lockf(fd, kind | (0 if wait else fcntl.LOCK_NB), 1, byte)
        return
    fcntl.fcntl(fd, _OFD_WAIT if wait else _OFD, _FLOCK.pack(_KINDS[kind], os.SEEK_SET, byte, 1, 0))


@dataclass(frozen=True)
class JournalSpec:
    """What a worker needs to look up and record a step's outputs.

    ``nodes`` lists the recorded stages of the step as (stage index, node name,
    fingerprint); ``sink``: the last stage is a sink, recorded item by item.
    """

    path: str
    terminal: str
    retry_failed: bool = False
    #: the journal held records when the run began (kept for callers; lookups always run)
    resuming: bool = True
    nodes: tuple[tuple[int, str, str], ...] = ()
    sink: bool = False
    #: (device, inode) of the run's journal file: a worker refuses to write to another
    ident: tuple[int, int] = (0, 0)
    #: names the run (unique per run): a worker's store of an earlier run is closed
    run: str = ""
    #: the run's store, for workers in the driver's process; never pickled
    store: Store | None = field(default=None, compare=False, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "store": None}


class Store:
    """One run's access to its journal file from one process.

    Holds one SQLite connection per thread (thread pools run tasks at once), the lock
    file's descriptor and a thread lock that queue this process's writers, and the
    run's :class:`Signer`. ``owner``: the driver's store, whose process holds the run's
    lock (it borrows the Journal's descriptor and skips the task guard). :meth:`close`
    closes every thread's connection; a closed store refuses further use.
    """

    def __init__(
        self,
        path: str,
        ident: tuple[int, int],
        run: str = "",
        *,
        signer: Signer | None = None,
        lock_fd: int | None = None,
    ) -> None:
        self.path = path
        self.ident = ident
        self.run = run
        self.owner = lock_fd is not None
        self.pid = os.getpid()
        self._signer = signer
        self._conns: dict[int, sqlite3.Connection] = {}
        #: threads running a task of the run (their connection is closed when it ends), with
        #: the task's tracker (see :meth:`wait_for_tasks`)
        self._busy: dict[int, Any] = {}
        self._guard = threading.Lock()
        self._writing = threading.Lock()
        self._fd = lock_fd if lock_fd is not None else -1
        self._closed = False
        self._handles: list[Any] = [self._conns, -1 if self.owner else self._fd]
        # a worker's store dropped without close() (a task's copied context) closes at once
        self._final = weakref.finalize(self, _close_handles, self._handles, self.pid)
        forks.track(self)
        if self.owner:
            with _OWNED_GUARD:
                _OWNED[:] = [r for r in _OWNED if r() is not None]
                _OWNED.append(weakref.ref(self))

    @property
    def signer(self) -> Signer:
        """The run's record signer (reads the user's secret once)."""
        if self._signer is None:
            self._signer = Signer.for_user()
        return self._signer

    def conn(self) -> sqlite3.Connection:
        """Return this thread's connection to the journal; use it inside a
        :class:`~papy._journal.forks.section` entered before this call (a fork closes it).

        JournalError if the file was removed or replaced since the run began (so nothing
        is written to the wrong file), or the run has ended.
        """
        if self._closed:
            raise JournalError(f"the run on {self.path} has ended; its journal is closed")
        ident = file_ident(self.path)
        if self.ident != (0, 0) and ident != self.ident:
            raise replaced_error(self.path)
        tid = threading.get_ident()
        got = self._conns.get(tid)
        if got is not None:
            return got
        known = self.ident if self.ident != (0, 0) else None
        conn = forks.first_connection(self.path, functools.partial(connect, ident=known))
        conn.execute("PRAGMA synchronous = NORMAL")
        # the run's driver folds the log into the file (papy._journal.checkpoint), not a
        # worker holding the write lock
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        with self._guard:
            if self._closed:
                conn.close()
                raise JournalError(f"the run on {self.path} has ended; its journal is closed")
            self._conns[tid] = conn
        return conn

    def lock_fd(self) -> int:
        """Return the descriptor of the journal's lock file (opened once per store)."""
        if self._fd < 0:
            with self._guard:
                if self._fd < 0:
                    self._fd = open_lock(self.path)
                    self._handles[1] = self._fd
        return self._fd

    def write(
        self,
        sql: str,
        rows: Iterable[tuple[Any, ...]],
        conn: Callable[[], sqlite3.Connection] | None = None,
    ) -> None:
        """Write rows in one transaction (on this thread's connection, or ``conn()``'s).

        Never call it inside a :class:`~papy._journal.forks.section`: it waits for this
        store's other writers, which may be waiting for a fork that waits for the section.

        Writers from several processes take a lock first: SQLite's own busy handler backs
        off by sleeping up to 100 ms, which several workers committing at the same time
        turn into most of the run; a lock wakes the next writer at once. Raises
        JournalError naming the cause when the disk is full or the file is read-only.
        """
        with self._writing:  # close() waits for a commit under way
            if self._closed:
                raise JournalError(f"the run on {self.path} has ended; its journal is closed")
            fd = self.lock_fd()
            lock_byte(fd, fcntl.LOCK_EX, WRITE_BYTE)
            try:
                with forks.section():
                    write((conn or self.conn)(), sql, rows, self.path, self.ident)
            finally:
                lock_byte(fd, fcntl.LOCK_UN, WRITE_BYTE)

    def write_outputs(self, rows: list[Any]) -> None:
        """Commit recorded outputs in one transaction, in key order.

        In key order, consecutive rows land in neighbouring pages of the table's B-tree,
        which SQLite then reaches without a fresh descent from the root for each.
        """
        rows.sort(key=_row_key)
        self.write(INSERT_OUTPUT, rows)

    def enter(self, tracker: Any = None) -> None:
        """Note that this thread runs a task of the run (see :meth:`close`); ``tracker``:
        the task's, whose ``abandoned`` says its pool gave up on it."""
        with self._guard:
            self._busy[threading.get_ident()] = tracker

    def leave(self) -> None:
        """Note that this thread's task ended; after :meth:`close`, close its connection."""
        tid = threading.get_ident()
        with self._guard:
            self._busy.pop(tid, None)
            conn = self._conns.pop(tid, None) if self._closed else None
            last = self._closed and not self._busy
        if conn is not None:
            _close_all([conn])
        if last:
            self._final()

    def close(self) -> None:
        """Close every thread's connection (and the lock file, unless borrowed); idempotent.

        Waits for a commit under way. A thread still running a task of the run (a task a
        pool let run on after the run was stopped) keeps its connection until the task
        ends (:meth:`leave`): closing a connection another thread is using is unsafe.
        """
        with self._writing, self._guard:
            self._closed = True
            idle = [tid for tid in self._conns if tid not in self._busy]
            conns = [self._conns.pop(tid) for tid in idle]
            last = not self._busy
        _close_all(conns)
        if last:
            self._final()

    def wait_for_tasks(self, timeout: float) -> bool:
        """Wait until no thread runs a task of this run; False after ``timeout`` seconds.

        Tasks their pool gave up on (a thread past its node's timeout: it commits nothing,
        and its items are recorded as failed) are not waited for once the re-run of their
        other items, which records the late item's failure, has ended (``handing_on``).
        """
        deadline = time.monotonic() + timeout
        while True:
            with self._guard:
                running = [
                    t
                    for t in self._busy.values()
                    if not getattr(t, "abandoned", False) or getattr(t, "handing_on", False)
                ]
            if not running:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)

    def forked(self) -> None:
        """In a forked child: let go of the parent's lock descriptor (its locks stay)."""
        if not self.owner and self._fd >= 0:
            os.close(self._fd)
            self._fd = self._handles[1] = -1

    def drop_connections(self) -> None:
        """Close every thread's connection; each reopens on next use (see
        :mod:`papy._journal.forks`, which calls this before a fork)."""
        with self._guard:
            conns = list(self._conns.values())
            self._conns.clear()
        _close_all(conns)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed


def _row_key(row: tuple[Any, ...]) -> tuple[Any, ...]:
    return row[:3]


def _close_handles(handles: list[Any], pid: int) -> None:
    if os.getpid() != pid:
        return  # a forked child's copy: the connections are its parent's
    conns, fd = handles
    _close_all(list(conns.values()))
    conns.clear()
    if fd >= 0:
        os.close(fd)
        handles[1] = -1


def _close_all(conns: Iterable[sqlite3.Connection]) -> None:
    with forks.section():
        for conn in conns:
            try:
                conn.close()
            except sqlite3.Error:
                pass


def write(
    conn: sqlite3.Connection,
    sql: str,
    rows: Iterable[tuple[Any, ...]],
    path: str,
    ident: tuple[int, int] | None = None,
) -> None:
    """Run ``sql`` over ``rows`` in one transaction on ``conn``; JournalError naming the cause
    (``ident``: the file the run opened, see :func:`~papy._journal.files.sqlite_error`)."""
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(sql, rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    except sqlite3.OperationalError as exc:
        raise sqlite_error(path, exc, ident) from None


#: a worker thread's stores, by journal path (worker processes only; see the module doc)
_worker_stores: ContextVar[dict[str, Store] | None] = ContextVar(
    "papy_journal_stores", default=None
)


def store_for(spec: JournalSpec) -> Store:
    """Return the store a task of ``spec``'s run uses in this thread.

    The run's own in the driver's process; else this thread's store of that run, made on
    first use. A store of an earlier run on the same journal is closed (one run at a time
    uses a journal, so that run has ended), and so are those whose journal file is gone.
    """
    if spec.store is not None:
        return spec.store
    stores = _worker_stores.get()
    if stores is None:
        stores = {}
        _worker_stores.set(stores)
    got = stores.get(spec.path)
    if got is not None and got.pid == os.getpid() and got.run == spec.run and not got.closed:
        return got
    if got is not None and got.pid == os.getpid():
        got.close()
    for path, other in list(stores.items()):  # journals of runs that ended since, gone
        if other.pid != os.getpid() or not _same_file(path, other.ident):
            other.close()
            del stores[path]
    got = stores[spec.path] = Store(spec.path, spec.ident, spec.run)
    return got


def _same_file(path: str, ident: tuple[int, int]) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == ident


#: the driver stores of this process (one per run), to find the tasks of earlier runs
_OWNED: list[weakref.ref[Store]] = []
_OWNED_GUARD = threading.Lock()
#: seconds a run waits for the tasks of an earlier run on its journal in this process
EARLIER_S = 40.0


def wait_for_earlier_runs(path: str) -> None:
    """Wait until no thread of this process runs a task of an earlier run on the journal
    ``path`` (a thread pool lets a run left early finish the tasks it started).

    Those tasks still do their nodes' side effects, and record them only when they end:
    a run that began before would not know, and do them again. JournalError after
    :data:`EARLIER_S` seconds.
    """
    with _OWNED_GUARD:
        earlier = [s for r in _OWNED if (s := r()) is not None and s.path == path]
    deadline = time.monotonic() + EARLIER_S
    for store in earlier:
        if not store.wait_for_tasks(max(0.0, deadline - time.monotonic())):
            raise JournalError(
                f"tasks of an earlier run on the journal {path} still run on threads of this "
                f"process after {EARLIER_S:g} s (a run left early, whose nodes have not "
                "returned); wait for them, or use another journal"
            )


class task_guard:
    """Hold the lock file's task byte (shared) while a worker process runs a journaled task.

    A new run waits until no worker of an earlier (dead) run holds it. The driver's own
    process holds the run's lock already and skips this.
    """

    def __init__(self, spec: JournalSpec, tracker: Any = None) -> None:
        self.spec = spec
        self.tracker = tracker
        self.fd: int | None = None
        self.store: Store | None = None

    def __enter__(self) -> None:
        store = self.store = store_for(self.spec)
        store.enter(self.tracker)
        if store.owner:
            return
        fd = store.lock_fd()
        try:
            lock_byte(fd, fcntl.LOCK_SH, TASK_BYTE, wait=False)
            self.fd = fd
        except OSError:
            pass  # never block a worker on it

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            try:
                lock_byte(self.fd, fcntl.LOCK_UN, TASK_BYTE)
            except OSError:
                pass
            self.fd = None
        if self.store is not None:
            self.store.leave()
            self.store = None
