"""The driver's side of the journal: open and check it, answer and record completion.

See :mod:`papy._journal` for what is recorded, by whom, and how it is trusted.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from papy._errors import JournalError
from papy._items import Failure
from papy._journal import forks, ownership
from papy._journal.checkpoint import Checkpointer, fold_log
from papy._journal.digest import ItemIds, node_prints
from papy._journal.files import (
    FORMAT,
    KEEP_OUTPUT,
    SCHEMA,
    VERSION,
    check_format,
    check_owner,
    connect,
    file_ident,
    open_lock,
    place_error,
    replaced_error,
    sqlite_error,
)
from papy._journal.reconcile import reconcile, with_records
from papy._journal.secret import Signer
from papy._journal.sinklog import fold_pending
from papy._journal.store import JournalSpec, Store, wait_for_earlier_runs
from papy._node import Node
from papy._report import Report

_CHECK_EVERY_S = 0.25
_PRELOAD_ROWS = 1_000_000
#: recorded values (pickles) up to this many bytes are read in one pass when resuming
_PRELOAD_BYTES = 64 * 2**20
_log = logging.getLogger("papy")


class Journal:
    """The driver's side of the journal: open and check it, answer and record completion.

    Raises JournalError when the file is not a journal, belongs to another user, fails
    authentication, is in use by another run, or cannot be written where it is.
    """

    def __init__(
        self,
        path: str | Path,
        nodes: Sequence[Node],
        name: str,
        *,
        force: bool = False,
        retry_failed: bool = False,
    ) -> None:
        self.path = str(Path(path).resolve())
        self.retry_failed = retry_failed
        self.force = force
        self._lock = threading.Lock()
        self._pending_complete: list[tuple[str, str]] = []
        self._pending_failures: list[tuple[Any, ...]] = []
        self._last_flush = time.monotonic()
        self._last_check = time.monotonic()
        self._ids = ItemIds()
        #: values read along with completion, for the node whose outputs are replayed
        self._replayed: set[str] = set()
        self._done: dict[str, bool] | None = None
        self._prefetched: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
        #: records read with completion at the start, until replayed (see _load_done)
        self._preloaded: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
        #: items finished() last found done, whose outputs are fetched together
        self._to_fetch: list[str] = []
        self._fetch_at = 0
        self._closed = False
        self._ended = False  # close() is done: no connection may be opened again
        #: node name -> why its records were dropped ("function body changed", ...)
        self.changes: dict[str, str] = {}
        self.recorded: set[str] = set()  # see _open
        self.prints = node_prints(nodes)
        self.signer = Signer.for_user()
        #: names this run to the workers (a worker's store of an earlier run is closed)
        self.run = os.urandom(8).hex()
        if os.path.islink(self.path):
            raise JournalError(f"{self.path} is a symbolic link; a journal must be a regular file")
        self._lock_fd = self._file_fd = -1
        self._owned = False
        self._conn: sqlite3.Connection | None = None
        self.store: Store | None = None
        self._checkpointer: Checkpointer | None = None
        self._lock_fd = open_lock(self.path)
        # a process forked meanwhile (a fork pool, a node's os.fork) would share the lock's
        # open file description, and with it the run's lock, for as long as it lives
        forks.track(self)
        try:
            ownership.take_ownership(self.path, self._lock_fd)
            self._owned = True
            self._open(nodes, name)
            self._checkpointer = Checkpointer(self.path)
        except BaseException:
            self.drop_connections()
            if self.store is not None:
                self.store.close()
            self._release()
            raise

    @property
    def conn(self) -> sqlite3.Connection:
        """The driver's own connection, reopened after a fork closed it (use it inside a
        :class:`~papy._journal.forks.section`)."""
        if self._conn is None:
            if self._ended:
                raise JournalError(f"the run on {self.path} has ended; its journal is closed")
            self._conn = connect(self.path, self._ident)
            self._conn.execute("PRAGMA synchronous = NORMAL")
            self._conn.execute("PRAGMA wal_autocheckpoint = 0")  # see papy._journal.checkpoint
        return self._conn

    def drop_connections(self) -> None:
        """Close the driver's own connection; reopened on next use (see papy._journal.forks)."""
        with forks.section():
            conn, self._conn = self._conn, None
            if conn is not None:
                conn.close()

    def _open(self, nodes: Sequence[Node], name: str) -> None:
        path = self.path
        if os.path.exists(path):
            st = os.stat(path)
            check_owner(path, st)
            if not os.access(os.path.dirname(path), os.W_OK):
                raise place_error(path, PermissionError(errno.EACCES, "Permission denied"))
        if not os.path.exists(path):  # a log of a journal deleted or moved away earlier
            ownership.set_aside_stale_log(path, self._lock_fd)
        ownership.create_file(path)
        ownership.private(path)
        fresh = os.path.getsize(path) == 0
        st = os.stat(path)
        self._ident = (st.st_dev, st.st_ino)
        ownership.set_aside_stale_log(path, self._lock_fd)
        self._file_fd = ownership.hold_file(path, self._lock_fd, self._ident)
        # the run's store: its workers in this process share the run's lock descriptor
        wait_for_earlier_runs(path)  # their tasks' side effects, not yet recorded
        self.store = Store(path, self._ident, self.run, signer=self.signer, lock_fd=self._lock_fd)
        try:
            with forks.section():
                if fresh:
                    self.conn.execute("PRAGMA journal_mode = WAL")
                    self.conn.executescript(SCHEMA)
                    self.conn.executemany(
                        "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                        [("format", FORMAT), ("version", VERSION)],
                    )
                else:
                    check_format(self.conn, path)
                    self.conn.execute("PRAGMA journal_mode = WAL")
            fold_pending(self.store, everything=True)  # sink batches of a run that died
            with forks.section():
                self._reconcile(nodes, name)
        except sqlite3.Error as exc:
            raise sqlite_error(path, exc, self._ident) from None
        ownership.private(path)

    def _reconcile(self, nodes: Sequence[Node], name: str) -> None:
        """Drop the records of changed nodes; note what the journal holds already."""
        self.changes = reconcile(self.conn, self.prints, nodes, name, self.force, self.signer)
        kept = [n for n in self.prints if n not in self.changes or self.force]
        self.recorded = with_records(self.conn, kept)
        self.resuming = (
            self.conn.execute("SELECT EXISTS (SELECT 1 FROM outputs)").fetchone()[0] == 1
        )

    # -- wiring the run ------------------------------------------------------------------

    def spec_for(self, nodes: Sequence[Node], terminals: set[str]) -> JournalSpec | None:
        """Return the spec of a step of ``nodes`` that records something, or None.

        A step records the outputs of its terminals (names in ``terminals``), of its
        nodes with ``cache=True``, and of its nodes whose records an earlier run left
        and that are unchanged (a sink that now has a child: its side effects are not
        repeated).
        """
        rec = tuple(
            (i, n.name, self.prints[n.name].fingerprint)
            for i, n in enumerate(nodes)
            if n.name in terminals or getattr(n, "cache", False) or n.name in self.recorded
        )
        if not rec:
            return None
        tail = nodes[-1]
        return JournalSpec(
            self.path,
            tail.name,
            self.retry_failed,
            self.resuming,
            rec,
            sink=tail.is_sink,
            ident=self._ident,
            run=self.run,
            store=self.store,
        )

    def identify(self, values: Sequence[Any], key: Callable[[Any], Any] | None) -> list[str]:
        """Return the journal identity of each input item (see :class:`ItemIds`).

        Raises JournalError when ``key`` gives two input items the same key.
        """
        return self._ids.identify(values, key)

    def check(self, now: bool = False) -> None:
        """Stop the run (JournalError) if the journal file was removed or replaced."""
        t = time.monotonic()
        if not now and t - self._last_check < _CHECK_EVERY_S:
            return
        self._last_check = t
        if file_ident(self.path) != self._ident:  # JournalError if it is gone
            raise replaced_error(self.path)

    # -- resuming ------------------------------------------------------------------------

    @forks.within
    def finished(self, items: Sequence[str], terminals: dict[str, bool]) -> dict[str, bool]:
        """Return, for the given input-item keys, which are finished at every terminal.

        ``terminals`` maps each terminal to whether it is top-level (one output per item).
        The value says whether the item failed somewhere (for ``retry_failed``).
        """
        self.check()
        if not items or not self.resuming:
            return {}
        if self._done is None:
            self._done = self._load_done(terminals)
        if self._done:
            hit = {k: self._done[k] for k in items if k in self._done}
            if self.retry_failed:
                hit = {k: v for k, v in hit.items() if not v}
            self._to_fetch, self._fetch_at = list(hit), 0
            return hit
        count: dict[str, int] = {}
        failed: dict[str, bool] = {}
        for start in range(0, len(items), 500):
            chunk = items[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for terminal, top in terminals.items():
                fp = self.prints[terminal].fingerprint
                if top and terminal in self._replayed:
                    # the output node: fetch the values too, for outputs() (one query)
                    got = self.conn.execute(
                        f"SELECT item, failed, value, mac FROM outputs WHERE node = ? AND "
                        f"sub = '' AND fp = ? AND item IN ({marks})",
                        (terminal, fp, *chunk),
                    ).fetchall()
                    for item, bad, blob, mac in got:
                        self._prefetched[(terminal, item)] = [("", fp, bad, blob, mac)]
                    rows = [(item, bad) for item, bad, _, _ in got]
                elif top:
                    rows = self.conn.execute(
                        f"SELECT item, failed FROM outputs WHERE node = ? AND sub = '' "
                        f"AND fp = ? AND item IN ({marks})",
                        (terminal, fp, *chunk),
                    ).fetchall()
                else:
                    rows = self.conn.execute(
                        f"SELECT c.item, COALESCE(MAX(o.failed), 0) FROM complete c LEFT JOIN "
                        f"outputs o ON o.node = c.node AND o.item = c.item WHERE "
                        f"c.node = ? AND c.item IN ({marks}) GROUP BY c.item",
                        (terminal, *chunk),
                    ).fetchall()
                for item, bad in rows:
                    count[item] = count.get(item, 0) + 1
                    failed[item] = failed.get(item, False) or bool(bad)
        done = {k: failed[k] for k, c in count.items() if c == len(terminals)}
        if self.retry_failed:
            done = {k: v for k, v in done.items() if not v}
        self._to_fetch, self._fetch_at = list(done), 0
        return done

    def _load_done(self, terminals: dict[str, bool]) -> dict[str, bool]:
        """Read which items are finished at every terminal, once, if that is small enough.

        Resuming asks item by item; one query per item would cost more than the rest of
        the driver's work. Only for top-level terminals and up to _PRELOAD_ROWS records
        (about 100 bytes of memory each); otherwise an empty dict (ask SQLite each time).
        When the recorded values take at most _PRELOAD_BYTES, they are read in the same
        pass (one scan, not a lookup per item) and kept until :meth:`outputs` replays them.
        """
        if not all(terminals.values()):
            return {}
        names = list(terminals)
        marks = ",".join("?" * len(names))
        n, size = self.conn.execute(
            f"SELECT COUNT(*), SUM(LENGTH(value)) FROM outputs WHERE sub = '' AND node IN "
            f"({marks})",
            names,
        ).fetchone()
        if n > _PRELOAD_ROWS:
            return {}
        values = (size or 0) <= _PRELOAD_BYTES
        count: dict[str, int] = {}
        failed: dict[str, bool] = {}
        for terminal in names:
            fp = self.prints[terminal].fingerprint
            if values:
                rows = self.conn.execute(
                    "SELECT item, failed, value, mac FROM outputs WHERE node = ? AND sub = '' "
                    "AND fp = ?",
                    (terminal, fp),
                )
            else:
                rows = self.conn.execute(
                    "SELECT item, failed, NULL, NULL FROM outputs WHERE node = ? AND sub = '' "
                    "AND fp = ?",
                    (terminal, fp),
                )
            for item, bad, blob, mac in rows:
                count[item] = count.get(item, 0) + 1
                if bad:
                    failed[item] = True
                if blob is not None:
                    self._preloaded[(terminal, item)] = [("", fp, bad, blob, mac)]
        done = {k: failed.get(k, False) for k, c in count.items() if c == len(names)}
        return done or {"": False}  # non-empty: "loaded", even when nothing is finished

    @forks.within
    def outputs(self, terminal: str, item: str) -> list[Any]:
        """Return what ``terminal`` produced for an input item, in sub-item order."""
        self._replayed.add(terminal)
        rows = self._prefetched.pop((terminal, item), None)
        if self._prefetched and len(self._prefetched) > 4096:
            self._prefetched.clear()  # items finished at the output but not everywhere
        if rows is None and self._preloaded:
            rows = self._preloaded.pop((terminal, item), None)
        if rows is None:
            self._fetch(terminal, item)
            rows = self._prefetched.pop((terminal, item), [])
        if len(rows) > 1:
            rows.sort(key=lambda r: tuple(int(x) for x in r[0].split(".")) if r[0] else ())
        return [
            self.signer.load(self.path, terminal, item, sub, fp, bad, blob, mac)
            for sub, fp, bad, blob, mac in rows
        ]

    def _fetch(self, terminal: str, item: str) -> None:
        """Read the records of ``item`` and of the next items finished() found done.

        One query for up to 500 items: replaying a finished item then costs a share of a
        query, not one query of its own.
        """
        want = [item]
        todo, at = self._to_fetch, self._fetch_at
        while at < len(todo) and len(want) < 500:
            k = todo[at]
            at += 1
            if k != item and (terminal, k) not in self._prefetched:
                want.append(k)
        self._fetch_at = at
        marks = ",".join("?" * len(want))
        for got, *row in self.conn.execute(
            f"SELECT item, sub, fp, failed, value, mac FROM outputs WHERE node = ? AND "
            f"item IN ({marks})",
            (terminal, *want),
        ):
            self._prefetched.setdefault((terminal, got), []).append(tuple(row))

    @forks.within
    def failures(self, item: str, terminals: Sequence[str]) -> list[Any]:
        """Return the Failures ``terminals`` recorded for an input item (sub-items too),
        with the nodes' current fingerprints: what a skipped item failed with there."""
        if not terminals:
            return []
        prints = {t: self.prints[t].fingerprint for t in terminals}
        marks = ",".join("?" * len(prints))
        rows = self.conn.execute(
            f"SELECT node, sub, fp, failed, value, mac FROM outputs WHERE item = ? AND "
            f"failed = 1 AND node IN ({marks}) ORDER BY node, sub",
            (item, *prints),
        ).fetchall()
        return [
            self.signer.load(self.path, node, item, sub, fp, bad, blob, mac)
            for node, sub, fp, bad, blob, mac in rows
            if fp == prints[node]
        ]

    # -- recording (driver side) ---------------------------------------------------------

    def mark_complete(self, terminal: str, item: str) -> None:
        """Note that a terminal below a scatter has all of an input item's sub-items."""
        self._pending_complete.append((terminal, item))
        self._flush_if_due()

    def record_failures(
        self, terminal: str, jkeys: Sequence[tuple[str, str]], failures: list[Failure]
    ) -> None:
        """Record Failures that reached ``terminal``, unless a worker recorded that item.

        A worker records a terminal's outputs, Failures included, as it makes them; the
        Failures made outside the node (its worker crashed or ran past ``timeout=``, the
        item could not be sent to it, its pool broke) are recorded here, so the item is
        finished like any failed one: replayed, not run again, by the next run
        (``retry_failed=True`` runs it again). ``jkeys``: (item, sub-item) pairs.
        """
        rows = self.signer.rows(terminal, self.prints[terminal].fingerprint, jkeys, failures)
        with self._lock:
            self._pending_failures.extend(rows)
        self._flush_if_due()

    def _flush_if_due(self) -> None:
        """Write what is pending once it is 256 rows of a kind or 0.2 s old."""
        pending = max(len(self._pending_complete), len(self._pending_failures))
        if pending >= 256 or time.monotonic() - self._last_flush > 0.2:
            self.flush()

    def flush(self) -> None:
        """Write what is pending, in one transaction."""
        with self._lock:
            if self._pending_failures:
                assert self.store is not None
                rows, self._pending_failures = self._pending_failures, []
                self.store.write(KEEP_OUTPUT, rows, conn=lambda: self.conn)
            if self._pending_complete:
                assert self.store is not None
                sql = "INSERT OR REPLACE INTO complete VALUES (?, ?)"
                self.store.write(sql, self._pending_complete, conn=lambda: self.conn)
                self._pending_complete = []
            self._last_flush = time.monotonic()

    def close(self) -> None:
        """Flush, fold the write-ahead log into the file, release the run's lock; idempotent.

        Raises JournalError if the file was removed or replaced during the run.
        """
        if self._closed:
            return
        self._closed = True
        self._preloaded.clear()
        if self._checkpointer is not None:
            self._checkpointer.stop()
        try:
            try:
                self.check(now=True)
            except JournalError:  # the log's commits are the run's own file's, wherever it is
                if self.store is not None:
                    self.store.close()
                fold_log(self._conn)
                raise
            self.flush()
            if self.store is not None:
                self.store.close()  # every thread's connection: the checkpoint needs them gone
            try:
                with forks.section():
                    self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                    self.conn.execute("PRAGMA journal_mode = DELETE")
            except sqlite3.OperationalError:
                pass  # another connection still has it open: the checkpoint is what matters
        except sqlite3.Error as exc:
            raise sqlite_error(self.path, exc, self._ident) from None
        finally:
            self._ended = True
            if self.store is not None:
                self.store.close()
            self.drop_connections()
            if self._lock_fd >= 0:  # a log of the file replaced: not for whoever opens next
                ownership.set_aside_stale_log(self.path, self._lock_fd)
            self._release()

    def forked(self) -> None:
        """In a forked child: let go of the parent's lock descriptors (papy._journal.forks)."""
        for fd in (self._lock_fd, self._file_fd):
            if fd >= 0:
                os.close(fd)  # the child's copy only: the parent's locks stay
        self._lock_fd = self._file_fd = -1
        self._owned = False

    def _release(self) -> None:
        ownership.release_file(self._file_fd)
        fd, self._lock_fd, self._file_fd = self._lock_fd, -1, -1
        if fd >= 0:
            if self._owned:  # ours: clear the owner's name
                self._owned = False
                ownership.release_ownership(fd)
            else:
                os.close(fd)

    def annotate(self, report: Report) -> Report:
        """Return the run's report with the nodes whose records were dropped, and why."""
        if not self.changes:
            return report
        return dataclasses.replace(report, changed=dict(self.changes))
