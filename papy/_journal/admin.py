"""Reading and editing a journal without running it: ``papy journal show/failures/forget``.

Reads metadata and counts only: no record is ever unpickled, so these are safe on a
journal one does not trust.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from papy._errors import JournalError
from papy._journal.files import FORMAT, VERSION, check_owner, connect, open_lock, sqlite_error
from papy._journal.ownership import (
    hold_file,
    release_file,
    release_ownership,
    set_aside_stale_log,
    take_ownership,
)

F = TypeVar("F", bound=Callable[..., Any])


def _sqlite_errors_named(fn: F) -> F:
    """Report an SQLite error (a malformed file, say) as a JournalError naming the journal."""

    @functools.wraps(fn)
    def wrapper(path: str, *args: Any) -> Any:
        try:
            return fn(path, *args)
        except sqlite3.Error as exc:
            raise sqlite_error(os.path.abspath(path), exc) from None

    return wrapper  # type: ignore[return-value]


def _open_readonly(path: str) -> sqlite3.Connection:
    p = os.path.abspath(path)
    if not os.path.isfile(p):
        raise JournalError(f"no journal at {path}")
    try:
        lock = os.open(p + ".lock", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        lock = None  # none yet: no run has recorded which file it wrote to
    try:
        set_aside_stale_log(p, lock)
    finally:
        if lock is not None:
            os.close(lock)
    try:
        conn = sqlite3.connect(f"file://{urllib.parse.quote(p)}?mode=ro", uri=True)
        meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
    except sqlite3.Error as exc:
        raise sqlite_error(p, exc) from None
    if meta.get("format") != FORMAT:
        raise JournalError(f"{path} is an SQLite file but not a papy journal")
    if meta.get("version") != VERSION:
        raise JournalError(f"{path} was written by another version of papy")
    return conn


@_sqlite_errors_named
def describe(path: str) -> dict[str, Any]:
    """Return a journal's metadata: pipeline, nodes with fingerprints and counts, size.

    Reads only metadata and counts; no record is unpickled.
    """
    conn = _open_readonly(path)
    try:
        meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
        counts = {
            node: (n, bad or 0, size or 0)
            for node, n, bad, size in conn.execute(
                "SELECT node, COUNT(*), SUM(failed), SUM(LENGTH(value)) FROM outputs GROUP BY node"
            )
        }
        complete = dict(conn.execute("SELECT node, COUNT(*) FROM complete GROUP BY node"))
        nodes = []
        for name, fp, parents, cached, terminal in conn.execute(
            "SELECT name, fingerprint, parents, cached, terminal FROM nodes ORDER BY rowid"
        ):
            n, bad, size = counts.get(name, (0, 0, 0))
            nodes.append(
                {
                    "name": name,
                    "fingerprint": fp,
                    "parents": json.loads(parents),
                    "cached": bool(cached),
                    "terminal": bool(terminal),
                    "records": n,
                    "done": n - bad,
                    "failed": bad,
                    "complete": complete.get(name, 0),
                    "bytes": size,
                }
            )
    finally:
        conn.close()
    return {
        "path": os.path.abspath(path),
        "pipeline": meta.get("pipeline"),
        "last_run": meta.get("last_run"),
        "last_host": meta.get("last_host"),
        "size": os.path.getsize(path),
        "nodes": nodes,
    }


@_sqlite_errors_named
def failures(path: str) -> list[dict[str, str]]:
    """Return the failed items: the node where each failed, its identity, the message.

    An item that failed upstream of several recorded nodes is listed once, at the node
    where it failed. Reads metadata only; nothing is unpickled.
    """
    conn = _open_readonly(path)
    try:
        rows = conn.execute(
            "SELECT o.node, o.item, o.sub, o.message FROM outputs o LEFT JOIN nodes n "
            "ON n.name = o.node WHERE o.failed = 1 ORDER BY o.item, o.sub, n.rowid"
        ).fetchall()
    finally:
        conn.close()
    out: list[dict[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for node, item, sub, message in rows:
        origin, _, text = (message or "").partition("\t")
        if not text:
            origin, text = node, message or ""
        if (item, sub) in seen:
            continue
        seen.add((item, sub))
        out.append({"node": origin, "item": item, "sub": sub, "message": text})
    out.sort(key=lambda r: (r["node"], r["item"], r["sub"]))
    return out


@_sqlite_errors_named
def forget(path: str, node: str) -> list[str]:
    """Drop the records of ``node`` and of every node downstream of it; return their names.

    Takes the journal's run lock, so it fails (JournalError) while a run uses the journal.
    """
    p = str(Path(path).resolve())
    _open_readonly(p).close()
    check_owner(p, os.stat(p))
    fd = open_lock(p)
    owned, held = False, -1
    try:
        take_ownership(p, fd)
        owned = True
        st = os.stat(p)
        held = hold_file(p, fd, (st.st_dev, st.st_ino))  # a run whose lock file went
        conn = connect(p)
        try:
            graph = {
                name: json.loads(parents)
                for name, parents in conn.execute("SELECT name, parents FROM nodes")
            }
            if node not in graph:
                raise JournalError(
                    f"no node {node!r} in {path}; its nodes are: {', '.join(graph) or '(none)'}"
                )
            drop = [node]
            for name in graph:  # nodes are stored in topological order
                if name not in drop and any(p_ in drop for p_ in graph[name]):
                    drop.append(name)
            conn.execute("BEGIN IMMEDIATE")
            for name in drop:
                conn.execute("DELETE FROM outputs WHERE node = ?", (name,))
                conn.execute("DELETE FROM complete WHERE node = ?", (name,))
            conn.execute("COMMIT")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            conn.close()
    finally:
        release_file(held)
        if owned:
            release_ownership(fd)
        else:
            os.close(fd)
    return drop
