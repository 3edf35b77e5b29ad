"""A flag one thread sets and another waits for, cheaper than ``threading.Event``.

A process pool makes one per task (``Job.sent``): the sender thread sets it once it holds
nothing of the task, and the manager thread waits for it before it delivers the result.
"""

from __future__ import annotations

import threading

__all__ = ["Latch"]


class Latch:
    """A flag one thread sets and another waits for: ``threading.Event``'s ``set``,
    ``clear`` and ``wait``, on one C-level lock (held while the flag is clear) instead of
    a Condition; a job makes one and uses it once or twice."""

    __slots__ = ("_clear",)

    def __init__(self) -> None:
        self._clear = threading.Lock()
        self._clear.acquire()

    def set(self) -> None:
        """Set the flag (again is fine)."""
        try:
            self._clear.release()
        except RuntimeError:
            pass  # already set

    def clear(self) -> None:
        """Clear the flag (again is fine)."""
        self._clear.acquire(blocking=False)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the flag; return whether it is set."""
        if not self._clear.acquire(timeout=timeout):
            return False
        self._clear.release()
        return True
