"""The journal's files: format, modes, owners, and the errors that name what went wrong.

Shared by the driver and the workers. Every file PaPy makes for a journal (``run.db``, its
``-wal``/``-shm``, ``run.db.lock``, pending sink files) is mode 0600 and must belong to the
user running PaPy: a journal holds pickles, and loading someone else's would run their code.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import urllib.parse

from papy._errors import JournalError

FORMAT = "papy-journal"
VERSION = "2"
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    name TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, parts TEXT NOT NULL,
    parents TEXT NOT NULL, cached INTEGER NOT NULL, terminal INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS outputs (
    node TEXT NOT NULL, item TEXT NOT NULL, sub TEXT NOT NULL, fp TEXT NOT NULL,
    failed INTEGER NOT NULL, message TEXT, value BLOB NOT NULL, mac BLOB NOT NULL,
    PRIMARY KEY (node, item, sub)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS complete (
    node TEXT NOT NULL, item TEXT NOT NULL, PRIMARY KEY (node, item)
) WITHOUT ROWID;
"""
#: the statement every recorded output goes through (workers, pending files)
INSERT_OUTPUT = "INSERT OR REPLACE INTO outputs VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
#: a record the driver writes for an item a worker may have recorded first: the worker's stays
KEEP_OUTPUT = "INSERT OR IGNORE INTO outputs VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
FILE_MODE = 0o600
#: byte ranges of the lock file: the run's owner holds 0 exclusively; a worker holds 2
#: shared while it runs a journaled task, so a new run waits for a dead run's last commits;
#: byte 1 is taken by whoever writes, so writers queue on a lock rather than sleep
OWNER_BYTE = 0
WRITE_BYTE = 1
TASK_BYTE = 2


def owner_name(uid: int) -> str:
    """Return ``user 'name' (uid N)`` for a uid, or ``uid N`` when it has no name."""
    try:
        import pwd

        return f"user {pwd.getpwuid(uid).pw_name!r} (uid {uid})"
    except (KeyError, ImportError):
        return f"uid {uid}"


def check_owner(path: str, st: os.stat_result) -> None:
    """Raise JournalError unless the file ``st`` describes belongs to the current user."""
    if st.st_uid != os.getuid():
        raise JournalError(
            f"{path} belongs to {owner_name(st.st_uid)}, not to you (uid {os.getuid()}): a "
            "journal holds pickled data, and loading another user's pickles would run their "
            "code; use a journal of your own"
        )


def place_error(path: str, exc: OSError) -> JournalError:
    """Turn an OS error about the journal's place into an error naming the real cause."""
    folder = os.path.dirname(path)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return JournalError(
            f"cannot write the journal {path}: directory {folder} is not writable "
            f"({exc.strerror}); the journal and its -wal, -shm and .lock files live there"
        )
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return JournalError(f"cannot write the journal {path}: disk full ({exc.strerror})")
    if exc.errno == errno.ENOENT:
        return JournalError(f"cannot create the journal {path}: directory {folder} does not exist")
    if exc.errno == errno.ELOOP:
        return JournalError(f"{path} is a symbolic link; a journal must be a regular file")
    return JournalError(f"cannot open the journal {path}: {exc.strerror}")


def sqlite_error(
    path: str, exc: sqlite3.Error, ident: tuple[int, int] | None = None
) -> JournalError:
    """Turn an SQLite error into a JournalError naming the cause (disk full, read-only...).

    A journal file removed, or replaced by another (``ident``: the (device, inode) the run
    opened), makes SQLite fail in ways that look like corruption ("disk I/O error",
    "attempt to write a readonly database"): that is said first. An error raised while a
    Ctrl-C unwound ("cannot rollback - no transaction is active") is not the file's
    fault: that KeyboardInterrupt is raised here instead.
    """
    if isinstance(exc.__context__, KeyboardInterrupt):
        raise exc.__context__
    try:
        now = file_ident(path)
    except JournalError as gone:
        return gone
    if ident is not None and ident != (0, 0) and now != ident:
        return replaced_error(path)
    text = str(exc)
    if "full" in text:
        return JournalError(f"cannot write the journal {path}: disk full ({text})")
    if "readonly" in text or "unable to open" in text:
        folder = os.path.dirname(path)
        return JournalError(
            f"cannot write the journal {path} ({text}): check that it and directory {folder} "
            "are writable"
        )
    if getattr(exc, "sqlite_errorcode", 0) & 0xFF in (5, 6):  # SQLITE_BUSY, SQLITE_LOCKED
        return JournalError(
            f"the journal {path} is locked by another connection ({text}): another program "
            "keeps it busy (a database browser, a copy of the run that was not stopped)"
        )
    return JournalError(
        f"{path} is not a papy journal ({text}); it is corrupt or another kind of file: "
        "move it away, or give another journal path"
    )


def connect(path: str, ident: tuple[int, int] | None = None) -> sqlite3.Connection:
    """Open a connection to the journal file ``path`` in autocommit mode that waits up to
    60 s for a busy file.

    Never creates the file: a journal removed during a run is not made again, empty, by a
    connection that opens after it went (JournalError "was removed"). With ``ident``
    (device, inode), the file at ``path`` must still be that one (JournalError "was
    replaced"), so a connection opened late never reads or writes a journal swapped in.
    """
    uri = "file://" + urllib.parse.quote(os.path.abspath(path)) + "?mode=rw"
    try:
        conn = sqlite3.connect(
            uri, uri=True, timeout=60, isolation_level=None, check_same_thread=False
        )
    except sqlite3.OperationalError:
        file_ident(path)  # gone: say so
        raise
    if ident is not None and file_ident(path) != ident:
        conn.close()
        raise replaced_error(path)
    conn.execute("PRAGMA busy_timeout = 60000")
    return conn


def open_lock(path: str) -> int:
    """Open (creating, mode 0600) ``path.lock`` and return its descriptor.

    Raises JournalError when it cannot be made there or belongs to someone else.
    """
    lock = path + ".lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE)
    except OSError as exc:
        raise place_error(path, exc) from None
    st = os.fstat(fd)
    if st.st_uid != os.getuid():
        os.close(fd)
        raise JournalError(
            f"{lock} belongs to {owner_name(st.st_uid)}, not to you: the journal {path} is "
            "someone else's; use a journal of your own"
        )
    if st.st_mode & 0o777 != FILE_MODE:
        os.fchmod(fd, FILE_MODE)
    return fd


def file_ident(path: str) -> tuple[int, int]:
    """Return the (device, inode) of the journal file.

    Raises JournalError when it is gone: what the run computes could no longer be recorded.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise JournalError(
            f"the journal {path} was removed during the run (deleted or moved away): "
            "stopped, since what the run computes could no longer be recorded"
        ) from None
    return (st.st_dev, st.st_ino)


def replaced_error(path: str) -> JournalError:
    """The error for a journal file replaced by another during the run."""
    return JournalError(
        f"the journal {path} was replaced by another file during the run: stopped, since "
        "records would go to the old file"
    )


def check_format(conn: sqlite3.Connection, path: str) -> None:
    """Raise JournalError unless ``conn`` is to a papy journal of this version."""
    try:
        meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
    except sqlite3.OperationalError:
        meta = {}
    if meta.get("format") != FORMAT:
        raise JournalError(f"{path} is an SQLite file but not a papy journal; give another path")
    if meta.get("version") != VERSION:
        raise JournalError(
            f"{path} was written by another version of papy (journal format "
            f"{meta.get('version')}, this papy writes {VERSION}); use a new journal"
        )
