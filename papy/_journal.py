"""The journal: a SQLite file that makes a run resumable, with nothing lost or redone.

What is recorded, per *terminal* (a sink, or the node ``map`` yields) and per item key:
the output the terminal produced (or its Failure). An input item is finished when every
terminal has its output: for a terminal below a scatter, when all its sub-items are there,
which the driver marks with a ``complete`` row.

Who records: the process that ran the terminal task, right after running it and in one
transaction for the batch (so journaling costs one commit per task, not per item). That is
what makes a sink's side effects exactly-once across a crash of the driver: a worker that
is running a journaled terminal task when the driver dies finishes the task and its commit
before it exits (see ``papy.pools._worker``), so there is no moment where a sink ran but
its record is lost. Before running a terminal task, the worker drops the items already
recorded (an item whose result was committed but never reached the driver).

Resuming: items whose every terminal is recorded are skipped at admission and, for
``map``, their recorded outputs are replayed in order.

Keys are the input position, or ``key(item)`` (JSON-encoded) for inputs whose order may
change; a sub-item's key adds its scatter indices.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from papy._errors import JournalError
from papy._items import Failure

if TYPE_CHECKING:
    from papy._pipeline import Pipeline

_FORMAT = "papy-journal"
_VERSION = "1"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS outputs (
    terminal TEXT NOT NULL, item TEXT NOT NULL, sub TEXT NOT NULL, failed INTEGER NOT NULL,
    value BLOB, PRIMARY KEY (terminal, item, sub)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS complete (
    terminal TEXT NOT NULL, item TEXT NOT NULL, PRIMARY KEY (terminal, item)
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class JournalSpec:
    """What a worker needs to record a terminal task: where, and for which terminal."""

    path: str
    terminal: str
    retry_failed: bool = False
    #: the journal held records when the run began: look for items already done
    resuming: bool = True


def fingerprint(pipe: Pipeline) -> str:
    """Return a digest of the graph: node names, functions' qualified names, edges, roles."""
    parts = []
    for n in pipe.nodes:
        fns = ",".join(
            f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', type(f).__name__)}"
            for f in n.fns
        )
        parents = ",".join(p.name for p in n.parents)
        flags = f"s{int(n.scatter)}g{int(n.gather)}b{int(n.batched)}"
        parts.append(f"{n.name}|{fns}|{parents}|{flags}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 60000")
    return conn


def item_key(position_key: str, key: Any) -> tuple[str, str]:
    """Split an item's key into the journal's (input item, sub-item) columns."""
    if isinstance(key, tuple):
        return position_key, ".".join(str(i) for i in key[1:])
    return position_key, ""


class Journal:
    """The driver's side of the journal: open and check it, answer and record completion."""

    def __init__(
        self, path: str | Path, pipe: Pipeline, *, force: bool = False, retry_failed: bool = False
    ) -> None:
        self.path = str(Path(path).resolve())
        self.retry_failed = retry_failed
        self._lock = threading.Lock()
        self._pending_complete: list[tuple[str, str]] = []
        self._last_flush = time.monotonic()
        fresh = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        self.resuming = not fresh
        try:
            self.conn = _connect(self.path)
            if fresh:
                self.conn.execute("PRAGMA journal_mode = WAL")
                self.conn.executescript(_SCHEMA)
                self._set_meta(pipe)
            else:
                self._check(pipe, force)
                self.resuming = (
                    self.conn.execute("SELECT EXISTS (SELECT 1 FROM outputs)").fetchone()[0] == 1
                )
        except sqlite3.DatabaseError as exc:
            raise JournalError(
                f"{path} is not a papy journal ({exc}); it is corrupt or another kind of "
                "file: move it away, or give another journal path"
            ) from None
        self.conn.execute("PRAGMA synchronous = NORMAL")

    def _set_meta(self, pipe: Pipeline) -> None:
        rows = [
            ("format", _FORMAT),
            ("version", _VERSION),
            ("fingerprint", fingerprint(pipe)),
            ("pipeline", pipe.name),
            ("nodes", json.dumps([n.name for n in pipe.nodes])),
        ]
        self.conn.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", rows)

    def _check(self, pipe: Pipeline, force: bool) -> None:
        try:
            meta = dict(self.conn.execute("SELECT name, value FROM meta").fetchall())
        except sqlite3.OperationalError:
            meta = {}
        if meta.get("format") != _FORMAT:
            raise JournalError(
                f"{self.path} is an SQLite file but not a papy journal; give another path"
            )
        if meta.get("fingerprint") != fingerprint(pipe):
            if not force:
                raise JournalError(
                    f"{self.path} was written by a different pipeline "
                    f"({meta.get('pipeline')!r} with nodes {meta.get('nodes')}); the graph "
                    "changed, so its records may not fit: pass force=True to resume anyway, "
                    "or use a new journal"
                )
            self.conn.execute("PRAGMA journal_mode = WAL")
            self._set_meta(pipe)

    # -- resuming ------------------------------------------------------------------------

    def finished(self, items: Sequence[str], terminals: dict[str, bool]) -> dict[str, bool]:
        """Return, for the given input-item keys, which are finished at every terminal.

        ``terminals`` maps each terminal to whether it is top-level (one output per item).
        The value says whether the item failed somewhere (for ``retry_failed``).
        """
        if not items or not self.resuming:
            return {}
        count: dict[str, int] = {}
        failed: dict[str, bool] = {}
        marks = ",".join("?" * len(items))
        for terminal, top in terminals.items():
            if top:
                rows = self.conn.execute(
                    f"SELECT item, failed FROM outputs WHERE terminal = ? AND sub = '' "
                    f"AND item IN ({marks})",
                    (terminal, *items),
                ).fetchall()
            else:
                rows = self.conn.execute(
                    f"SELECT c.item, COALESCE(MAX(o.failed), 0) FROM complete c LEFT JOIN "
                    f"outputs o ON o.terminal = c.terminal AND o.item = c.item WHERE "
                    f"c.terminal = ? AND c.item IN ({marks}) GROUP BY c.item",
                    (terminal, *items),
                ).fetchall()
            for item, bad in rows:
                count[item] = count.get(item, 0) + 1
                failed[item] = failed.get(item, False) or bool(bad)
        done = {k: failed[k] for k, c in count.items() if c == len(terminals)}
        if self.retry_failed:
            done = {k: v for k, v in done.items() if not v}
        return done

    def outputs(self, terminal: str, item: str) -> list[Any]:
        """Return what ``terminal`` produced for an input item, in sub-item order."""
        rows = self.conn.execute(
            "SELECT sub, value FROM outputs WHERE terminal = ? AND item = ?", (terminal, item)
        ).fetchall()
        rows.sort(key=lambda r: tuple(int(x) for x in r[0].split(".")) if r[0] else ())
        return [pickle.loads(v) for _, v in rows]

    # -- recording (driver side) ---------------------------------------------------------

    def mark_complete(self, terminal: str, item: str) -> None:
        """Note that a terminal below a scatter has all of an input item's sub-items."""
        self._pending_complete.append((terminal, item))
        if len(self._pending_complete) >= 256 or time.monotonic() - self._last_flush > 0.2:
            self.flush()

    def flush(self) -> None:
        """Write what is pending, in one transaction."""
        with self._lock:
            if self._pending_complete:
                _write(
                    self.conn,
                    "INSERT OR REPLACE INTO complete VALUES (?, ?)",
                    self._pending_complete,
                    self.path,
                )
                self._pending_complete = []
            self._last_flush = time.monotonic()

    def close(self) -> None:
        """Flush and close; idempotent."""
        try:
            self.flush()
            self.conn.close()
        except sqlite3.ProgrammingError:
            pass


def _write(
    conn: sqlite3.Connection, sql: str, rows: Iterable[tuple[Any, ...]], path: str | None = None
) -> None:
    """Write rows in one transaction.

    Writers from several processes take a lock file first: SQLite's own busy handler
    backs off by sleeping up to 100 ms, which several workers committing at the same
    time turn into most of the run; ``flock`` wakes the next writer at once.
    """
    lock = _lock_file(path) if path else None
    if lock is not None:
        fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(sql, rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    finally:
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _lock_file(path: str) -> int:
    fds: dict[tuple[int, str], int] | None = getattr(_local, "locks", None)
    if fds is None:
        fds = _local.locks = {}
    key = (os.getpid(), path)
    fd = fds.get(key)
    if fd is None:
        fd = fds[key] = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    return fd


# -- the worker's side ----------------------------------------------------------------------

_local = threading.local()  # one connection per thread (thread pools run tasks at once)


def _worker_conn(path: str) -> sqlite3.Connection:
    conns: dict[tuple[int, str], sqlite3.Connection] | None = getattr(_local, "conns", None)
    if conns is None:
        conns = _local.conns = {}
    key = (os.getpid(), path)  # a forked worker must not reuse its parent's connection
    conn = conns.get(key)
    if conn is None:
        conn = conns[key] = _connect(path)
        conn.execute("PRAGMA synchronous = NORMAL")
    return conn


def recorded(spec: JournalSpec, jkeys: Sequence[tuple[str, str]]) -> dict[int, Any]:
    """Return {index in batch: recorded output} for items this terminal already did."""
    conn = _worker_conn(spec.path)
    found: dict[tuple[str, str], tuple[int, bytes]] = {}
    items = sorted({item for item, _ in jkeys})
    for start in range(0, len(items), 500):
        chunk = items[start : start + 500]
        marks = ",".join("?" * len(chunk))
        for item, sub, bad, value in conn.execute(
            f"SELECT item, sub, failed, value FROM outputs WHERE terminal = ? AND item IN "
            f"({marks})",
            (spec.terminal, *chunk),
        ):
            found[(item, sub)] = (bad, value)
    out: dict[int, Any] = {}
    for i, k in enumerate(jkeys):
        hit = found.get(k)
        if hit is not None and not (spec.retry_failed and hit[0]):
            out[i] = pickle.loads(hit[1])
    return out


def record(spec: JournalSpec, jkeys: Sequence[tuple[str, str]], values: Sequence[Any]) -> None:
    """Commit a terminal task's outputs, one transaction for the batch."""
    rows = []
    for (item, sub), value in zip(jkeys, values):
        try:
            blob = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            import cloudpickle

            blob = cloudpickle.dumps(value)
        rows.append((spec.terminal, item, sub, int(type(value) is Failure), blob))
    if rows:
        _write(
            _worker_conn(spec.path),
            "INSERT OR REPLACE INTO outputs VALUES (?, ?, ?, ?, ?)",
            rows,
            spec.path,
        )
