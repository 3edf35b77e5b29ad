"""Owning a journal for a run: the run's lock, its owner's name, and private files.

``run.db.lock`` (next to the journal) holds a lock on its byte 0 for the run's whole life
and names its owner (pid, host, start time); a second run, in this process or another,
fails at once naming the first. The run locks a byte of the journal file itself as well,
so a lock file removed during a run does not let a second run in. Workers hold byte 2
shared while they run a journaled task, so a new run waits for the last commits of a run
that died.

It also names the file (device, inode) the last run wrote to, which outlives the run: a
journal replaced or deleted during a run leaves that file's write-ahead log
(``run.db-wal``) next to the new one, and SQLite would apply it to whatever file has the
name now (another journal's records lost). :func:`set_aside_stale_log` moves such a log
aside before anything opens the journal.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from typing import Any

from papy._errors import JournalError
from papy._journal.files import FILE_MODE, OWNER_BYTE, TASK_BYTE, place_error
from papy._journal.store import lock_byte, ofd_locks

_log = logging.getLogger("papy")
#: the byte of the journal file a run holds (see :func:`hold_file`)
FILE_BYTE = 2**62


def take_ownership(path: str, fd: int) -> None:
    """Hold the run's lock or fail at once naming the run that holds it.

    The caller closes ``fd`` when this raises (JournalError).
    """
    try:
        lock_byte(fd, fcntl.LOCK_EX, OWNER_BYTE, wait=False)
    except OSError:
        owner: dict[str, Any] = {}
        for _ in range(20):  # the owner writes its name right after locking
            owner = _read(fd)
            if "pid" in owner:
                break
            time.sleep(0.05)
        if "pid" not in owner:
            raise JournalError(
                f"{path} is in use: its lock is held, but by no run that names itself (a "
                "process that inherited it from a run); wait for it to end, or use another "
                "journal"
            ) from None
        raise JournalError(
            f"{path} is in use by another run (pid {owner['pid']} on host "
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
    _write(fd, {**info, **_file_entry(fd)})


def note_file(fd: int, ident: tuple[int, int]) -> None:
    """Record in the lock file (``fd``) the (device, inode) of the file the run writes to."""
    _write(fd, {**_read(fd), "file": list(ident)})


def hold_file(path: str, fd: int, ident: tuple[int, int]) -> int:
    """Lock the journal file itself for the run too, and record it in the lock file
    (``fd``); return the descriptor that holds the lock (-1 without OFD locks).

    The lock file alone can be removed during a run (by hand, by a clean-up job): a
    second run would then make a new one and run beside the first on the same journal.
    The byte locked, :data:`FILE_BYTE`, lies far past SQLite's own lock bytes (at 1 GiB),
    and only open-file-description locks are used here: a POSIX lock on the journal file
    would be dropped when SQLite closes any of its descriptors to it.
    """
    note_file(fd, ident)
    if not ofd_locks():
        return -1
    held = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        lock_byte(held, fcntl.LOCK_EX, FILE_BYTE, wait=False)
    except OSError:
        os.close(held)
        raise JournalError(
            f"{path} is in use by another run, whose lock file {path}.lock was removed or "
            "replaced during that run; wait for it to end, or use another journal"
        ) from None
    return held


def release_file(fd: int) -> None:
    """Drop the run's lock on the journal file (see :func:`hold_file`) and close it."""
    if fd >= 0:
        try:
            lock_byte(fd, fcntl.LOCK_UN, FILE_BYTE)
        except OSError:
            pass
        os.close(fd)


def recorded_file(fd: int) -> tuple[int, int] | None:
    """Return the (device, inode) the lock file (``fd``) names, or None."""
    got = _read(fd).get("file")
    if isinstance(got, list) and len(got) == 2 and all(isinstance(x, int) for x in got):
        return got[0], got[1]
    return None


def set_aside_stale_log(path: str, fd: int | None) -> None:
    """Move aside a write-ahead log that another file of this name left (see module doc).

    ``fd``: the journal's lock file, or None (no lock file: nothing is known). The log is
    renamed ``run.db-wal.of-inode-<inode>`` (it holds the old file's last commits), its
    index ``run.db-shm`` removed, and a warning logged.
    """
    recorded = None if fd is None else recorded_file(fd)
    try:
        st = os.stat(path)
        now: tuple[int, int] | None = (st.st_dev, st.st_ino)
    except FileNotFoundError:
        now = None  # deleted: a file made there later must not get the log either
    if now is not None and (recorded is None or recorded == now):
        return
    wal = path + "-wal"
    if os.path.exists(wal) and os.path.getsize(wal) > 0:  # empty: nothing to apply
        aside = f"{wal}.of-inode-{recorded[1] if recorded else 'unknown'}"
        os.replace(wal, aside)
        _log.warning(
            "journal: %s was left by another file named %s (a journal replaced, deleted "
            "or moved away during a run); moved to %s, not applied to any other file",
            wal,
            path,
            aside,
        )
    try:
        os.unlink(path + "-shm")
    except FileNotFoundError:
        pass


def _read(fd: int) -> dict[str, Any]:
    try:
        got = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:
        return {}
    return got if isinstance(got, dict) else {}


def _file_entry(fd: int) -> dict[str, Any]:
    return {"file": list(f)} if (f := recorded_file(fd)) is not None else {}


def _write(fd: int, info: dict[str, Any]) -> None:
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
    """Clear the owner's name from the lock file (it keeps naming the journal's file) and
    drop the run's lock, then close it.

    Unlocked explicitly: the lock belongs to the open file description, which a process
    forked during the run (by a node, in C code too) may share for as long as it lives.
    """
    try:
        _write(fd, _file_entry(fd))
        lock_byte(fd, fcntl.LOCK_UN, OWNER_BYTE)
    except OSError:
        pass
    os.close(fd)
