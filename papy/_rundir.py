"""The run directory: where nodes put files that travel between them.

The scheduler picks a directory per run and ships its path with every task; workers create
it on first use. It is removed when the run ends unless the pipeline has a ``workdir``.
"""

from __future__ import annotations

import os
from pathlib import Path

_current: str | None = None


def set_current(path: str | None) -> None:
    """Set the run directory for the tasks this process runs next."""
    global _current
    _current = path


def run_dir() -> Path:
    """Return this run's directory (created on first use).

    Outside a run (calling a node function by hand) it is a ``papy-files`` folder in the
    current directory, so functions stay testable on their own.
    """
    path = Path(_current) if _current else Path(os.getcwd()) / "papy-files"
    path.mkdir(parents=True, exist_ok=True)
    return path
