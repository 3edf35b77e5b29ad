"""Folding the write-ahead log into the journal while a run goes, off the workers' path.

SQLite folds its write-ahead log (``run.db-wal``) into the main file every 1000 pages, by
whichever connection commits past that mark: a worker, which then waits for two ``fsync``
calls while holding the journal's write lock and every other writer waits behind it. On a
busy disk that is most of a journaled run's time. Workers' connections therefore never
checkpoint (``wal_autocheckpoint = 0``); a thread of the run's driver does it, ``PASSIVE``
(writers and readers go on meanwhile), whenever the log passes :data:`WAL_BYTES`.
Durability is unchanged: commits are as durable as before (``synchronous = NORMAL``), and
the run's end still folds the whole log into the file.
"""

from __future__ import annotations

import os
import sqlite3
import threading

from papy._journal import forks
from papy._journal.files import connect

#: the size of the write-ahead log past which it is folded into the file (SQLite's own
#: mark: 1000 pages of 4 KiB)
WAL_BYTES = 4 * 2**20
#: how often the log's size is looked at (seconds)
CHECK_EVERY_S = 0.1


class Checkpointer:
    """A thread that checkpoints the journal at ``path`` while a run goes; stop() ends it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="papy-journal-checkpoint")
        self._thread.daemon = True
        forks.track(self)
        self._thread.start()

    def _loop(self) -> None:
        wal = self.path + "-wal"
        try:
            while not self._stop.wait(CHECK_EVERY_S):
                try:
                    if os.path.getsize(wal) < WAL_BYTES:
                        continue
                    with forks.section():
                        if self._conn is None:
                            self._conn = connect(self.path)
                        self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except (OSError, sqlite3.Error):
                    continue  # the run sees a vanished or full journal itself, and says so
        finally:
            self.drop_connections()

    def forked(self) -> None:
        """In a forked child: nothing (the thread is the parent's; the connection closed)."""

    def drop_connections(self) -> None:
        """Close the connection (reopened on the next checkpoint; see papy._journal.forks)."""
        with forks.section():
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

    def stop(self) -> None:
        """End the thread and wait for it (its last checkpoint, if one is running)."""
        self._stop.set()
        self._thread.join()


def fold_log(conn: sqlite3.Connection | None) -> None:
    """Fold the write-ahead log into the file ``conn`` has open, wherever that file is now
    (removed, replaced by another, renamed away and maybe back): the log's commits are
    that file's. Without a connection (a fork closed it) nothing is folded: the log is
    set aside (:func:`~papy._journal.ownership.set_aside_stale_log`), whole. Folding it
    through a second name for the file let a worker's connection, still open to the old
    log, later write into the file beside the next run's log ("malformed")."""
    if conn is None:
        return
    try:
        with forks.section():
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.Error:
        pass
