"""Tell a real interrupt of the driver from a ``KeyboardInterrupt`` a node raised itself.

A node's function may raise anything, ``KeyboardInterrupt`` included, and that is a failure
of its item. A Ctrl-C (SIGINT) or SIGTERM sent to the driver must still stop the run. While
a run is active in the main thread, :func:`trap_signals` installs handlers that note the
signal before raising ``KeyboardInterrupt``, so code that catches one can ask
:func:`real_interrupt` which it is. Handlers are installed by the first active run and
restored by the last one; an application's own handlers are left alone.

A process forked meanwhile (by a node: ``multiprocessing`` with "fork", ``os.fork``)
must not inherit those handlers: :func:`fork_defaults` gives it the application's (or a
worker's chosen) handlers instead, and closes a window in which CPython drops signals.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

_lock = threading.Lock()
_active = 0
_saved: dict[int, Any] = {}
_pending = threading.Event()  # a signal arrived and its KeyboardInterrupt is unwinding
#: signals trapped so far, and the last one's KeyboardInterrupt message (see ``check``)
_count = 0
_last = ""
#: signal -> (the handler installed here, the one a forked child gets instead), besides
#: those of a run (see :func:`fork_defaults`)
_child: dict[int, tuple[Any, Any]] = {}
_fork_mask = threading.local()
_fork_guarded = False


def real_interrupt() -> bool:
    """Tell whether the ``KeyboardInterrupt`` being handled came from a signal to the driver.

    Only the main thread receives signals, so in any other thread the answer is False: a
    ``KeyboardInterrupt`` there was raised by a node's own code.
    """
    return threading.current_thread() is threading.main_thread() and _pending.is_set()


def _handler(signum: int, frame: Any) -> None:
    global _count, _last
    _pending.set()
    _count += 1
    _last = "SIGTERM" if signum == signal.SIGTERM else ""
    raise KeyboardInterrupt(_last)


def signal_count() -> int:
    """Return how many signals the run's handlers took so far (see :func:`check`)."""
    return _count


def check(seen: int) -> None:
    """Raise the ``KeyboardInterrupt`` of a signal that came after ``seen`` and was lost.

    A handler raises wherever the main thread is, a garbage collector's callback
    included (a weakref finalizer, a ``__del__``), where Python prints "Exception
    ignored" and drops it; a run that is still going after a signal lost it.
    """
    if _count != seen:
        raise KeyboardInterrupt(_last)


def fork_defaults(handlers: dict[int, Any] | None = None) -> None:
    """Give processes forked from now on these signal handlers (signal -> handler) in
    place of the ones installed now, and the application's own in place of a run's.

    Only a handler still installed at the fork is replaced: one the code that forks set
    itself (``SIG_IGN`` around starting a ``multiprocessing.Pool``, say) is the child's.

    CPython drops a signal that reaches a child between ``fork()`` and its
    re-initialisation there; a child forked with a Python handler for SIGTERM could thus
    lose the SIGTERM of ``multiprocessing.Pool.terminate()``, whose ``join()`` then waits
    forever. SIGINT and SIGTERM are therefore blocked across the fork (in the forking
    thread), and the child sets its handlers before unblocking them: a signal sent
    meanwhile waits, then acts as the child's own handler says.
    """
    with _lock:
        for sig, handler in (handlers or {}).items():
            _child[sig] = (signal.getsignal(sig), handler)
        if not _fork_guarded:
            _guard_forks_locked()


def _guard_forks_locked() -> None:
    global _fork_guarded
    _fork_guarded = True
    os.register_at_fork(before=_before_fork, after_in_parent=_release, after_in_child=_in_child)


def _child_handlers() -> dict[int, tuple[Any, Any]]:
    """Return signal -> (handler to replace, handler the child gets)."""
    handlers = {sig: (_handler, saved) for sig, saved in _saved.items()} if _active else {}
    handlers.update(_child)
    return handlers


def _before_fork() -> None:
    if _child_handlers():
        _fork_mask.held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def _release() -> None:
    held = getattr(_fork_mask, "held", None)
    if held is not None:
        _fork_mask.held = None
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _in_child() -> None:
    global _lock, _active, _count, _last
    for sig, (installed, handler) in _child_handlers().items():
        try:
            if signal.getsignal(sig) is installed:
                signal.signal(sig, handler)
        except (ValueError, OSError):  # pragma: no cover - not the child's main thread
            pass
    # No run is active in the child; a lock another thread held at the fork stays held.
    _lock = threading.Lock()
    _active, _count, _last = 0, 0, ""
    _saved.clear()
    _child.clear()
    _pending.clear()
    _release()


def trap_signals() -> Callable[[], None]:
    """Route SIGINT and SIGTERM to ``KeyboardInterrupt`` for a run; return the undo.

    SIGTERM becomes ``KeyboardInterrupt("SIGTERM")`` so a terminated driver shuts its
    workers down as on Ctrl-C. A handler the application installed is kept as it is.
    """
    global _active
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    with _lock:
        # A run starting in the main thread: no interrupt is unwinding there any more (an
        # earlier one was caught, maybe outside a run whose iterator is still open).
        _pending.clear()
        if not _fork_guarded:
            _guard_forks_locked()
        if _active == 0:
            for sig, default in (
                (signal.SIGINT, signal.default_int_handler),
                (signal.SIGTERM, signal.SIG_DFL),
            ):
                try:
                    previous = signal.getsignal(sig)
                    if previous in (default, None):
                        signal.signal(sig, _handler)
                        _saved[sig] = previous
                except (ValueError, OSError):
                    pass
        _active += 1
    undone = False

    def restore() -> None:
        global _active
        nonlocal undone
        with _lock:
            if undone:
                return
            undone = True
            _active -= 1
            if _active:
                return
            for sig, previous in list(_saved.items()):
                try:
                    signal.signal(sig, previous)
                except (ValueError, OSError):
                    pass
            _saved.clear()

    return restore


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back while the block runs, then let their handlers act.

    For steps that must not be cut in half by a ``KeyboardInterrupt``: a worker process
    being started reads its arguments (a named semaphore among them) from a pipe, and an
    interrupt in the middle dropped the semaphore, and its name, while the new process
    was still reading (``FileNotFoundError`` from the forkserver). Only in the main thread
    (the others receive no signals), and only for handlers written in Python: a signal
    whose action is the system's default acts at once.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous: dict[int, Any] = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            handler = signal.getsignal(sig)
            if callable(handler):
                signal.signal(sig, lambda signum, frame: held.append(signum))
                previous[sig] = handler
        except (ValueError, OSError):
            pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in held:
            previous[signum](signum, None)  # raises as it would have (KeyboardInterrupt)
