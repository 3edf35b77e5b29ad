"""Reconciling a journal with the pipeline that opens it: which nodes' records still hold.

Each node's fingerprint covers its code, its settings and its ancestors'
(:mod:`papy._journal.digest`). A node whose fingerprint changed since the journal recorded
it is recomputed: its records are dropped, and the reason is logged and kept for the run's
report. The records of a node gone from the pipeline stay: put back unchanged (a sink
left out of one run), it finds them again (``papy journal forget`` drops them).
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import sqlite3
import time
from collections.abc import Sequence

from papy._journal.digest import REASONS, NodePrint
from papy._journal.secret import Signer
from papy._node import Node

_log = logging.getLogger("papy")


def reconcile(
    conn: sqlite3.Connection,
    prints: dict[str, NodePrint],
    nodes: Sequence[Node],
    pipeline: str,
    force: bool,
    signer: Signer,
) -> dict[str, str]:
    """Compare node fingerprints with the recorded ones; drop what no longer holds.

    Returns the nodes whose records no longer hold, with why. ``force`` keeps their
    records: each is authenticated under its old fingerprint and signed again (``signer``)
    under the new one, as the caller vouches for it; a record that fails authentication is
    dropped (it is recomputed), never signed.
    """
    old = {
        name: (fp, json.loads(parts))
        for name, fp, parts in conn.execute("SELECT name, fingerprint, parts FROM nodes")
    }
    changed: dict[str, str] = {}
    for name, pr in prints.items():
        if name not in old or old[name][0] == pr.fingerprint:
            continue
        why: list[str] = [
            text for part, text in REASONS.items() if old[name][1].get(part) != pr.parts[part]
        ]
        if not why:
            ups = [p for p in pr.parents if p in changed]
            why = [f"upstream node {ups[0]!r} changed" if ups else "upstream nodes changed"]
        changed[name] = ", ".join(why)
    terminals = {n.name for n in nodes if n.is_sink}
    cached = {n.name for n in nodes if getattr(n, "cache", False)}
    rows = [
        (
            name,
            pr.fingerprint,
            json.dumps(pr.parts, sort_keys=True),
            json.dumps(pr.parents),
            int(name in cached),
            int(name in terminals),
        )
        for name, pr in prints.items()
    ]
    conn.execute("BEGIN IMMEDIATE")
    try:
        if force:
            for name in changed:  # keep the records: the caller vouches for them
                _move_records(conn, signer, name, prints[name].fingerprint)
        else:
            for name in changed:
                conn.execute("DELETE FROM outputs WHERE node = ?", (name,))
                conn.execute("DELETE FROM complete WHERE node = ?", (name,))
        conn.executemany("INSERT OR REPLACE INTO nodes VALUES (?, ?, ?, ?, ?, ?)", rows)
        if not force:  # records of another version of a node (folded in, say)
            conn.execute(
                "DELETE FROM outputs WHERE fp != "
                "(SELECT fingerprint FROM nodes WHERE nodes.name = outputs.node)"
            )
        conn.executemany(
            "INSERT OR REPLACE INTO meta VALUES (?, ?)",
            [
                ("pipeline", pipeline),
                ("last_run", time.strftime("%Y-%m-%d %H:%M:%S")),
                ("last_host", socket.gethostname()),
            ],
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    if changed and not force:
        for name, reason in changed.items():
            _log.warning("journal: node %r: %s; recomputing it", name, reason)
    if force and changed:
        _log.warning(
            "journal: nodes changed (%s) but force=True keeps their records",
            "; ".join(f"{k!r}: {v}" for k, v in changed.items()),
        )
    return changed


def _move_records(conn: sqlite3.Connection, signer: Signer, node: str, fp: str) -> None:
    """Give ``node``'s authentic records the fingerprint ``fp``, signed again for it."""
    moved, forged = [], []
    for item, sub, old_fp, bad, blob, mac in conn.execute(
        "SELECT item, sub, fp, failed, value, mac FROM outputs WHERE node = ?", (node,)
    ).fetchall():
        if hmac.compare_digest(mac, signer.mac(node, item, sub, old_fp, bad, blob)):
            moved.append((fp, signer.mac(node, item, sub, fp, bad, blob), node, item, sub))
        else:
            forged.append((node, item, sub))
    conn.executemany(
        "UPDATE outputs SET fp = ?, mac = ? WHERE node = ? AND item = ? AND sub = ?", moved
    )
    conn.executemany("DELETE FROM outputs WHERE node = ? AND item = ? AND sub = ?", forged)


def with_records(conn: sqlite3.Connection, nodes: Sequence[str]) -> set[str]:
    """Return the ``nodes`` the journal holds records of.

    An unchanged node with records (a sink that now has a child, say) has its records
    used, and kept up, as a cache's are.
    """
    return {
        node
        for node in nodes
        if conn.execute("SELECT 1 FROM outputs WHERE node = ? LIMIT 1", (node,)).fetchone()
    }
