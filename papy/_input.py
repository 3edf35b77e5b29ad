"""Reading a run's input: in bounded chunks, with its errors kept, never blocking delivery.

The scheduler admits input items only while the buffer has room. Two readers give it the
same interface:

- :class:`DirectInput` reads in the scheduler's own thread. It is used for in-memory
  collections (lists, tuples, ranges, arrays: anything with a length), whose iteration
  cannot block, so reading costs nothing more than ``list.extend``.
- :class:`ThreadedInput` reads any other iterable (a generator, a file, a queue or socket
  reader) in a background thread, like ``multiprocessing.Pool.imap`` does, so an input that
  blocks for a minute does not hold back the outputs of the items already read. The thread
  reads only as many items as the scheduler granted (the buffer's room), hands them over
  through a deque and wakes the scheduler through its completion queue.

Either way an exception raised by the input is kept, not raised at once: the items read
before it are run and delivered first (as Python's own ``map`` does), then the scheduler
raises the input's own exception.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable, Collection, Iterable
from typing import Any


class DirectInput:
    """Read an in-memory collection in the caller's thread."""

    def __init__(self, items: Iterable[Any]) -> None:
        self._it = iter(items)
        self.done = False
        self.error: BaseException | None = None

    @property
    def ended(self) -> bool:
        """Tell whether the input is exhausted (or raised: see ``error``)."""
        return self.done

    def read(self, n: int) -> list[Any]:
        """Return the next ``n`` items; fewer means the input ended or raised."""
        if n <= 0:
            return []
        chunk: list[Any] = []
        try:
            chunk.extend(itertools.islice(self._it, n))  # keeps what was read before an error
        except BaseException as exc:
            self.error = exc
            self.done = True
            return chunk
        if len(chunk) < n:
            self.done = True
        return chunk

    @property
    def granted(self) -> int:
        """Items granted but not yet taken (always 0: this reader reads on demand)."""
        return 0

    def close(self) -> None:
        """Nothing to release."""


class ThreadedInput:
    """Read an iterable in a background thread, within the credit the scheduler grants.

    ``wake`` is called (from the reader thread) when items arrive or the input ends, at
    most once until the scheduler calls :meth:`read` again, so a fast input does not flood
    the scheduler with wake-ups.
    """

    def __init__(self, items: Iterable[Any], wake: Callable[[], None]) -> None:
        self._it = iter(items)
        self._wake = wake
        self._buf: deque[Any] = deque()
        self._lock = threading.Lock()  # ``with`` on a C lock: see papy.pools.thread
        self._cond = threading.Condition(self._lock)
        self._credit = 0  # items the thread may still read
        self._outstanding = 0  # granted and not yet taken by the scheduler
        self._woken = False
        self._closed = False
        self.done = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="papy-input", daemon=True)
        self._thread.start()

    @property
    def granted(self) -> int:
        """Items granted to the thread and not yet taken: they count as admitted room."""
        return self._outstanding

    @property
    def ended(self) -> bool:
        """Tell whether the input is exhausted (or raised) and every item read was taken."""
        with self._lock:
            return self.done and not self._buf

    def read(self, n: int) -> list[Any]:
        """Allow the thread ``n`` more items; return the items it has read so far.

        Never blocks: items still being read arrive with a later call (the scheduler is
        woken when they do).
        """
        with self._lock:
            if n > 0 and not self.done:
                self._credit += n
                self._outstanding += n
                self._cond.notify()
            self._woken = False
            buf = self._buf
            chunk = [buf.popleft() for _ in range(len(buf))]
            self._outstanding -= len(chunk)
            if self.done:
                self._outstanding = 0
        return chunk

    def close(self) -> None:
        """Stop the thread once it is not inside the input (a blocked read cannot be cut)."""
        with self._lock:
            self._closed = True
            self._cond.notify()

    def _loop(self) -> None:
        it = self._it
        while True:
            with self._lock:
                while self._credit == 0 and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                credit = self._credit
                self._credit = 0
            for _ in range(credit):
                try:
                    item = next(it)
                except StopIteration:
                    self._finish(None)
                    return
                except BaseException as exc:  # the input's own error, raised after the rest
                    self._finish(exc)
                    return
                if self._closed:
                    return
                # deque.append and the flag are atomic: the scheduler clears the flag
                # before it drains the deque, so an item appended after a drain always
                # finds the flag clear and wakes it.
                self._buf.append(item)
                if not self._woken:
                    self._woken = True
                    self._wake()

    def _finish(self, error: BaseException | None) -> None:
        with self._lock:
            self.error = error
            self.done = True
            self._woken = True
        self._wake()


def reader_for(items: Iterable[Any], wake: Callable[[], None]) -> DirectInput | ThreadedInput:
    """Return the reader that suits ``items``: direct for collections, threaded otherwise."""
    if isinstance(items, Collection):
        return DirectInput(items)
    return ThreadedInput(items, wake)
