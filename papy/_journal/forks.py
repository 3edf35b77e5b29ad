"""No SQLite connection crosses a ``fork()``: forking while a run's journal is open.

SQLite forbids carrying a connection over ``fork()``. The child inherits the library's
record of its parent's open database files, locks and mutexes, but not the locks: a
worker forked from a driver with the journal open (a ``ProcessPool(start_method="fork")``
the run starts, or a replacement after a crash) shares that record, writes believing it
holds locks it does not hold, and the driver can fold or delete the write-ahead log under
it ("file is not a database"); a worker forked while another driver thread was inside
SQLite waits forever on a mutex no thread of its own will release.

So every use of a journal connection in a process runs in a :class:`section`, and a
handler registered with :func:`os.register_at_fork` runs before each fork of the process:
it waits until no thread is inside a section and no other fork is under way (new sections
and forks wait meanwhile), closes every connection of the objects passed to :func:`track`
(the run's journal, its stores, the checkpointer), and lets the threads go on once the
fork is done; each reopens its connection on next use (about a millisecond). Forks from
two threads at once (a pool replacing a worker while a node forks) take turns: each
closing connections while the other forks left the child a mutex held for good. A fork
made from inside a section (never by papy; user code run by a thread pool is outside) is
let through without closing anything.
Processes started by ``forkserver``, ``spawn`` or :mod:`subprocess` do not run the
handler and need nothing of this: they never share the driver's SQLite state.
"""

from __future__ import annotations

import functools
import os
import threading
import weakref
from collections.abc import Callable
from typing import ParamSpec, Protocol, TypeVar

from papy._errors import JournalError

P = ParamSpec("P")
R = TypeVar("R")


class Holder(Protocol):
    """An object that holds journal connections it can close and later reopen."""

    def drop_connections(self) -> None:
        """Close every connection now (no thread is using one); reopen on next use."""

    def forked(self) -> None:
        """In the child of a fork: let go of what is the parent's (its lock descriptors)."""


_lock = threading.Lock()  # ``with`` on a C lock: see papy.pools.thread
_cond = threading.Condition(_lock)
_inside = 0  # threads inside a section (each counted once, however deeply nested)
_forking = False  # a fork is closing connections or under way: sections and forks wait
_local = threading.local()
_holders: weakref.WeakSet[Holder] = weakref.WeakSet()


def track(holder: Holder) -> None:
    """Have ``holder``'s connections closed before each fork of this process."""
    with _lock:
        _holders.add(holder)


class section:
    """Use journal connections inside: no fork happens in this process meanwhile.

    Re-entrant within a thread. Entering waits while a fork is under way (milliseconds).
    """

    __slots__ = ()

    def __enter__(self) -> None:
        global _inside
        depth = getattr(_local, "depth", 0)
        if depth == 0 and not getattr(_local, "forking", False):
            with _lock:
                while _forking:
                    _cond.wait()
                _inside += 1
        _local.depth = depth + 1

    def __exit__(self, *exc: object) -> None:
        global _inside
        _local.depth -= 1
        if _local.depth == 0 and not getattr(_local, "forking", False):
            with _lock:
                _inside -= 1
                if _inside == 0:
                    _cond.notify_all()


#: seconds a process forked from a driver waits for its first journal connection
PROBE_S = 10.0
_unchecked = False  # a process forked by a pool, before its first journal connection


def forked_from_threads() -> None:
    """Note that this process was forked (a ``fork`` pool's worker): its first journal
    connection is opened by :func:`first_connection`."""
    global _unchecked
    _unchecked = True


def first_connection(path: str, connect: Callable[[str], R]) -> R:
    """Return ``connect(path)``; in a process forked from a driver, the first time, raise
    JournalError if it does not return within :data:`PROBE_S` seconds.

    Another thread of the driver may have been inside SQLite, outside papy (a node or the
    program checking a database), when it forked: the child then holds SQLite's mutexes
    with no thread to release them, and its first SQLite call waits for good. The call
    runs on a thread of its own so that the run stops with an error naming the cause.
    """
    global _unchecked
    if not _unchecked:
        return connect(path)
    got: list[R] = []
    probe = threading.Thread(target=lambda: got.append(connect(path)), daemon=True)
    probe.start()
    probe.join(PROBE_S)
    if not got:
        raise JournalError(
            f"a worker forked from the driver cannot open the journal {path}: SQLite waits "
            "for good on a lock another thread of the driver held at the fork (it used "
            "SQLite outside papy meanwhile); use ProcessPool(start_method='forkserver') for "
            "journaled runs"
        )
    _unchecked = False
    return got[0]


def within(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorate a function that uses journal connections: it runs in a :class:`section`."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        with section():
            return fn(*args, **kwargs)

    return run


def _before_fork() -> None:
    global _forking
    if getattr(_local, "depth", 0):
        _local.skipped = True  # forked from inside a section: nothing can be closed
        return
    # One fork at a time: two threads forking at once would each close connections while
    # the other forks (SQLite holds a mutex while it closes one).
    with _lock:
        while _forking or _inside:
            _cond.wait()
        _forking = True
        holders = list(_holders)
    _local.forking = True  # a finalizer the closing runs here must not wait for us
    try:
        for holder in holders:
            holder.drop_connections()
    finally:
        _local.forking = False


def _after_fork_in_parent() -> None:
    global _forking
    if getattr(_local, "skipped", False):
        _local.skipped = False
        return
    with _lock:
        _forking = False
        _cond.notify_all()


def _after_fork_in_child() -> None:
    # One thread lives on, outside any section: start from a clean state. A lock file's
    # open-file-description lock is shared with every process that inherited the
    # descriptor: a child a node forked would hold the run's lock for as long as it lives.
    global _lock, _cond, _inside, _forking, _local
    _lock = threading.Lock()
    _cond = threading.Condition(_lock)
    _inside, _forking = 0, False
    _local = threading.local()
    for holder in list(_holders):
        holder.forked()
    _holders.clear()


os.register_at_fork(
    before=_before_fork,
    after_in_parent=_after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)
