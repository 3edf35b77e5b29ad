"""The run directory: where nodes put files that travel between them.

The scheduler picks a directory per run and ships its path with every task; workers create
it on first use. It is removed when the run ends unless the pipeline has a ``workdir``.

The current directory is a :class:`contextvars.ContextVar`, so two runs whose tasks share a
process (thread pools, the inline pool) each see their own: every worker thread has its own
context, and each task sets the variable before running.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path

_current: ContextVar[str | None] = ContextVar("papy_run_dir", default=None)


def set_current(path: str | None) -> None:
    """Set the run directory for the tasks this thread runs next."""
    _current.set(path)


def run_dir() -> Path:
    """Return this run's directory (created on first use).

    Outside a run (calling a node function by hand) it is a ``papy-files`` folder in the
    current directory, so functions stay testable on their own.
    """
    current = _current.get()
    path = Path(current) if current else Path(os.getcwd()) / "papy-files"
    path.mkdir(parents=True, exist_ok=True)
    return path
