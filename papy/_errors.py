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
    """Report a cycle in the graph; ``cycle`` holds the node names along it.

    The names are in data-flow order (each one feeds the next, the last feeds the first),
    so the message reads like the arrows ``to_mermaid()`` draws: ``load -> parse -> load``.
    """

    def __init__(self, cycle: list[str]) -> None:
        self.cycle = cycle
        path = " -> ".join([*cycle, cycle[0]])
        super().__init__(f"the graph has a cycle: {path}; remove one of these edges")


class RemoteTraceback(Exception):
    """Hold the text of a traceback recorded in a worker, shown as the cause of an error.

    An exception that crossed a process boundary lost its frames; this stands in for them,
    so Python's usual report of an uncaught error ends at the user's own line.
    """

    def __init__(self, tb: str) -> None:
        self.tb = tb
        super().__init__(tb)

    def __str__(self) -> str:
        return f'\n"""\n{self.tb.rstrip()}\n"""'


class ItemFailed(PapyError):
    """Carry the :class:`papy.Failure` of an item whose turn came in ``map(errors="raise")``.

    The message names the node, the item and the cause, and ends with the line of the
    user's code that raised (``at FILE:LINE in FUNCTION``). The original exception is the
    ``__cause__`` when it could travel from the worker; the worker's traceback text is
    attached below it, so an uncaught ItemFailed prints the whole story, innermost last.
    """

    def __init__(self, failure: Failure) -> None:
        self.failure = failure
        where = _last_frame(failure.traceback)
        super().__init__(failure.describe() + (f" (at {where})" if where else ""))
        _chain_worker_traceback(self, failure)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.failure,))


def _chain_worker_traceback(error: BaseException, failure: Failure) -> None:
    """Make the failure's exception (and the worker's traceback text) the cause of ``error``."""
    remote = RemoteTraceback(failure.traceback) if failure.traceback else None
    exc = failure.exception
    if exc is not None and exc is not error:
        if exc.__traceback__ is None and remote is not None and exc.__cause__ is None:
            exc.__cause__ = remote  # frames lost in transit: show the worker's text
        error.__cause__ = exc
    elif remote is not None:
        error.__cause__ = remote


def _last_frame(tb: str) -> str:
    """Return ``FILE:LINE in FUNCTION`` of the innermost frame of a traceback text."""
    last = ""
    for line in tb.splitlines():
        text = line.strip()
        if text.startswith('File "') and ", line " in text:
            last = text
    if not last:
        return ""
    try:
        file_part, rest = last[len('File "') :].split('", line ', 1)
        number, _, func = rest.partition(", in ")
        return f"{file_part}:{number.strip()}" + (f" in {func.strip()}" if func else "")
    except ValueError:
        return ""


class RunAborted(PapyError):
    """Stop a run because a node with ``on_error="raise"`` produced a failure."""

    def __init__(self, failure: Failure) -> None:
        self.failure = failure
        super().__init__(f"run stopped (on_error='raise'): {failure.describe()}")
        _chain_worker_traceback(self, failure)

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.failure,))


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
    """Report an external program that exited with a code it should not have.

    ``stderr_tail`` and ``stdout_tail`` hold the last lines of what it wrote (text), so the
    message shows why it failed even for programs that report errors on stdout.
    """

    def __init__(
        self, argv: Sequence[str], returncode: int, stderr_tail: str, stdout_tail: str = ""
    ) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr_tail = stderr_tail
        self.stdout_tail = stdout_tail
        tail = f"; stderr ends with:\n{stderr_tail}" if stderr_tail else " (no stderr)"
        if stdout_tail:
            tail += f"\nstdout ends with:\n{stdout_tail}"
        super().__init__(f"{argv[0]} exited with code {returncode}{tail}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (ShellError, (self.argv, self.returncode, self.stderr_tail, self.stdout_tail))


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
    RemoteTraceback,
):
    _cls.__module__ = "papy"
