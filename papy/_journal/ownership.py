"""Owning a journal for a run: the run's lock, its owner's name, and private files.

``run.db.lock`` (next to the journal) holds a lock on its byte 0 for the run's whole life
and names its owner (pid, host, start time); a second run, in this process or another,
fails at once naming the first. Workers hold byte 2 shared while they run a journaled task,
so a new run waits for the last commits of a run that died.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from typing import Any

from papy._errors import JournalError
from papy._journal.files import FILE_MODE, OWNER_BYTE, TASK_BYTE, place_error
from papy._journal.store import lock_byte


def take_ownership(path: str, fd: int) -> None:
    """Hold the run's lock or fail at once naming the run that holds it.

    The caller closes ``fd`` when this raises (JournalError).
    """
    try:
        lock_byte(fd, fcntl.LOCK_EX, OWNER_BYTE, wait=False)
    except OSError:
        owner: dict[str, Any] = {}
        for _ in range(20):  # the owner writes its name right after locking
            try:
                owner = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                owner = {}
            if owner:
                break
            time.sleep(0.05)
        raise JournalError(
            f"{path} is in use by another run (pid {owner.get('pid', '?')} on host "
            f"{owner.get('host', '?')}, started {owner.get('started', '?')}); wait for it to "
            "end, or use another journal"
        ) from None
    # A run that died leaves workers finishing their last journaled task: wait for them.
    deadline = time.monotonic() + 40
    while True:
        try:
            lock_byte(fd, fcntl.LOCK_EX, TASK_BYTE, wait=False)
            lock_byte(fd, fcntl.LOCK_UN, TASK_BYTE)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise JournalError(
                    f"{path}: workers of an earlier run are still writing to it; try again"
                ) from None
            time.sleep(0.05)
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)


def create_file(path: str) -> None:
    """Create an empty journal file, mode 0600, never through a symbolic link."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
    except FileExistsError:
        return
    except OSError as exc:
        raise place_error(path, exc) from None
    os.fchmod(fd, FILE_MODE)
    os.close(fd)


def private(path: str) -> None:
    """Set a journal file (and its -wal/-shm) to mode 0600 if it is not."""
    for p in (path, path + "-wal", path + "-shm"):
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        if st.st_uid == os.getuid() and st.st_mode & 0o777 != FILE_MODE:
            os.chmod(p, FILE_MODE)


def release_ownership(fd: int) -> None:
    """Clear the owner's name from the lock file and close it (which drops the run's lock)."""
    try:
        os.ftruncate(fd, 0)
    except OSError:
        pass
    os.close(fd)
