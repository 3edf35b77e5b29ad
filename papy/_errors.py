"""Exceptions raised by PaPy.

Every exception the library raises on purpose derives from :class:`PapyError`, so a caller
can catch them all at once::

    PapyError
     ├── GraphError            the pipeline's graph is wrong; raised before any work starts
     │    └── CycleError       the graph has a cycle (the message names it)
     ├── ItemFailed            an item failed and ``map(errors="raise")`` reached its turn
     ├── RunAborted            a node with ``on_error="raise"`` failed; the run was stopped
     ├── WorkerCrashed         a worker process died while running an item (exit code/signal)
     ├── PoolError             a pool is closed, broken or cannot be reached
     ├── ShellError            an external program (papy.shell) exited with an error
     └── JournalError          a journal is corrupt, foreign, tampered with, busy or unwritable

``WorkerCrashed`` and ``TimeoutError`` (the builtin) are mostly seen as the ``exception`` of a
:class:`papy.Failure`, not raised at the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from papy._items import Failure


class PapyError(Exception):
    """Base class of every error PaPy raises on purpose."""


class GraphError(PapyError, ValueError):
    """Say what is wrong with a pipeline's graph; raised before any item is processed."""


class CycleError(GraphError):
    """Report a cycle in the graph; ``cycle`` holds the node names along it."""

    def __init__(self, cycle: list[str]) -> None:
        self.cycle = cycle
        path = " -> ".join([*cycle, cycle[0]])
        super().__init__(f"the graph has a cycle: {path}; remove one of these edges")


class ItemFailed(PapyError):
    """Carry the :class:`papy.Failure` of an item whose turn came in ``map(errors="raise")``."""

    def __init__(self, failure: Failure) -> None:
        self.failure = failure
        super().__init__(failure.describe())


class RunAborted(PapyError):
    """Stop a run because a node with ``on_error="raise"`` produced a failure."""

    def __init__(self, failure: Failure) -> None:
        self.failure = failure
        super().__init__(f"run stopped (on_error='raise'): {failure.describe()}")


class WorkerCrashed(PapyError):
    """Report that the worker process running an item died (signal or exit code)."""

    def __init__(self, message: str, exitcode: int | None = None) -> None:
        self.exitcode = exitcode
        super().__init__(message)

    def __reduce__(self) -> tuple[type, tuple[str, int | None]]:
        return (type(self), (str(self), self.exitcode))


class PoolError(PapyError):
    """Report a pool that is closed, broken, or cannot be reached."""


class ShellError(PapyError):
    """Report an external program that exited with a non-zero code."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr_tail: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        tail = f"; stderr ends with:\n{stderr_tail}" if stderr_tail else " (no stderr)"
        super().__init__(f"{argv[0]} exited with code {returncode}{tail}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (ShellError, (self.argv, self.returncode, self.stderr_tail))


class JournalError(PapyError):
    """Report a journal that cannot be used: corrupt, not a journal, owned by another user,
    failing authentication, in use by another run, removed or replaced during the run, in
    a place that cannot be written; or a ``key=`` that gives two input items one key."""


# Show (and pickle) these under their public name, ``papy.WorkerCrashed``, not the module
# they happen to live in.
for _cls in (
    PapyError,
    GraphError,
    CycleError,
    ItemFailed,
    RunAborted,
    WorkerCrashed,
    PoolError,
    ShellError,
    JournalError,
):
    _cls.__module__ = "papy"
