"""The run directory: where nodes put files that travel between them; private file creation.

The scheduler makes a directory per run (``tempfile.mkdtemp``: mode 0700, a fresh random
name that a symbolic link planted in advance cannot redirect) and ships its path with every
task; a worker on another host makes it there on first use, with the same checks. It is
removed when the run ends unless the pipeline has a ``workdir``.

Files PaPy writes in a run directory it made are created with mode 0600 whatever the umask
(:func:`open_private`). In a ``workdir`` the user owns, the user's umask decides, so results
can be shared on purpose.

The current directory and its privacy are a :class:`contextvars.ContextVar`, so two runs
whose tasks share a process (thread pools, the inline pool) each see their own: every
worker thread has its own context, and each task sets the variable before running.
"""

from __future__ import annotations

import os
import stat
import tempfile
from contextvars import ContextVar
from pathlib import Path
from typing import IO, Any

from papy._errors import PapyError

#: (run directory, whether its files are private, whether it was checked) for the tasks
#: of this thread: state of the run, set per task, never a process-wide cache
_state: ContextVar[tuple[str | None, bool, bool]] = ContextVar(
    "papy_run_dir", default=(None, True, False)
)

DIR_MODE = 0o700
FILE_MODE = 0o600


def set_current(path: str | None, private: bool = True) -> None:
    """Set the run directory for the tasks this thread runs next, and its privacy."""
    _state.set((path, private, False))


def make_run_dir() -> str:
    """Create a new private run directory (mode 0700) in the temporary directory."""
    return tempfile.mkdtemp(prefix="papy-run-")


def check_workdir(path: str | Path) -> tuple[str, bool]:
    """Return a workdir's real path and whether files in it must be private.

    Raises PapyError when ``path`` is a symbolic link that another user planted, or that
    leads to a directory of another user: PaPy will not write where someone else points it.
    Files are private (0600) unless the directory belongs to the user.
    """
    p = os.path.abspath(path)
    uid = os.getuid()
    try:
        lst = os.lstat(p)
    except FileNotFoundError:
        return p, False
    if stat.S_ISLNK(lst.st_mode):
        target = os.path.realpath(p)
        try:
            tst = os.stat(target)
        except FileNotFoundError:
            tst = None
        if lst.st_uid != uid or (tst is not None and tst.st_uid != uid):
            raise PapyError(
                f"workdir {p} is a symbolic link owned by uid {lst.st_uid} to {target}, "
                f"which belongs to uid {tst.st_uid if tst else '?'}: refused, not followed; "
                "give a directory of your own"
            )
        return target, False
    return p, lst.st_uid != uid


def ensure_private_dir(path: str | Path, private: bool = True) -> Path:
    """Create ``path`` (mode 0700 when private) or check the existing one; return it.

    Raises PapyError when ``path`` is a symbolic link or not a directory, or when a
    directory with a name PaPy chooses (``papy-run-*``, ``papy-files``) belongs to another
    user, rather than write through it. A user's own ``workdir`` keeps its mode.
    """
    p = str(path)
    current, private_now, checked = _state.get()
    if checked and p == current:
        return Path(p)
    parent = os.path.dirname(p)
    if parent and not os.path.isdir(parent):
        os.makedirs(parent, exist_ok=True)
    try:
        os.mkdir(p, DIR_MODE if private else 0o777)
    except FileExistsError:
        pass
    st = os.lstat(p)
    if stat.S_ISLNK(st.st_mode):
        raise PapyError(
            f"{p} is a symbolic link where PaPy keeps its files: refused, not followed "
            "(someone may be trying to redirect them); remove it or give another workdir"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise PapyError(f"{p} exists and is not a directory; remove it or give another workdir")
    ours = os.path.basename(p).startswith("papy-run-") or os.path.basename(p) == "papy-files"
    if ours and st.st_uid != os.getuid():  # a name PaPy chose, taken by someone else
        raise PapyError(
            f"{p} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}): refused; "
            "remove it or give another workdir"
        )
    if ours and st.st_mode & 0o077:
        os.chmod(p, DIR_MODE)
    if p == current:
        _state.set((current, private_now, True))
    return Path(p)


def run_dir() -> Path:
    """Return this run's directory (created on first use).

    Outside a run (calling a node function by hand) it is a private ``papy-files`` folder
    in the current directory, so functions stay testable on their own.
    """
    current, private, _ = _state.get()
    if current:
        return ensure_private_dir(current, private)
    return ensure_private_dir(Path(os.getcwd()) / "papy-files", True)


def files_private() -> bool:
    """Tell whether files written for this run must be mode 0600."""
    current, private, _ = _state.get()
    return private or not current


def open_private(path: str | Path, mode: str = "wb", private: bool | None = None) -> IO[Any]:
    """Create a new file for writing, mode 0600 when private, never through a symbolic link.

    ``private``: default :func:`files_private`. Raises FileExistsError when ``path``
    exists (names are fresh; an existing one means someone planted it).
    """
    if private is None:
        private = files_private()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(path, flags, FILE_MODE if private else 0o666)
    if private:
        os.fchmod(fd, FILE_MODE)
    return os.fdopen(fd, mode)
