"""Tell a real interrupt of the driver from a ``KeyboardInterrupt`` a node raised itself.

A node's function may raise anything, ``KeyboardInterrupt`` included, and that is a failure
of its item. A Ctrl-C (SIGINT) or SIGTERM sent to the driver must still stop the run. While
a run is active in the main thread, :func:`trap_signals` installs handlers that note the
signal before raising ``KeyboardInterrupt``, so code that catches one can ask
:func:`real_interrupt` which it is. Handlers are installed by the first active run and
restored by the last one; an application's own handlers are left alone.
"""

from __future__ import annotations

import contextlib
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
