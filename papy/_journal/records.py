"""A worker looks a step's items up in the journal before running them, and records after.

One query per 500 items to look up, one transaction per node and task to record; every
record is signed (HMAC) when written and authenticated before it is unpickled.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from papy._errors import JournalError
from papy._items import Failure, Key, failure_from_exception, qualified_type
from papy._journal import forks
from papy._journal.sinklog import fold_pending
from papy._journal.store import JournalSpec, store_for

log = logging.getLogger("papy")


def lookup(spec: JournalSpec, jkeys: Sequence[tuple[str, str]]) -> dict[int, dict[int, Any]]:
    """Return {stage index: {index in batch: recorded output}} for the step's records.

    Every record is authenticated before it is unpickled (JournalError if one fails).
    Failed records are left out with ``retry_failed``.
    """
    store = store_for(spec)
    if spec.sink:
        # a sink batch cut short by a crash: the items it did count as done
        fold_pending(store)
    by_name = {name: (idx, fp) for idx, name, fp in spec.nodes}
    names = list(by_name)
    found: dict[tuple[str, str, str], tuple[str, int, bytes, bytes]] = {}
    items = sorted({item for item, _ in jkeys})
    nmarks = ",".join("?" * len(names))
    with forks.section():
        conn = store.conn()
        for start in range(0, len(items), 500):
            chunk = items[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for node, item, sub, fp, bad, value, mac in conn.execute(
                f"SELECT node, item, sub, fp, failed, value, mac FROM outputs WHERE node IN "
                f"({nmarks}) AND item IN ({marks})",
                (*names, *chunk),
            ):
                found[(node, item, sub)] = (fp, bad, value, mac)
    out: dict[int, dict[int, Any]] = {}
    if not found:
        return out
    signer = store.signer
    for name, (idx, fp) in by_name.items():
        hits: dict[int, Any] = {}
        for i, (item, sub) in enumerate(jkeys):
            hit = found.get((name, item, sub))
            if hit is None or hit[0] != fp or (spec.retry_failed and hit[1]):
                continue
            try:
                hits[i] = signer.load(spec.path, name, item, sub, hit[0], hit[1], hit[2], hit[3])
            except JournalError:
                raise  # not authentic: never unpickled
            except Exception as exc:  # its class changed or moved since: compute it again
                log.warning(
                    "journal: the record of node %r for item %r cannot be loaded (%s: %s); "
                    "computing it again",
                    name,
                    item,
                    qualified_type(exc),
                    exc,
                )
        if hits:
            out[idx] = hits
    return out


def recorded(spec: JournalSpec, jkeys: Sequence[tuple[str, str]]) -> dict[int, Any]:
    """Return {index in batch: recorded output} of the step's last recorded node."""
    if not spec.nodes:
        return {}
    last = max(idx for idx, _, _ in spec.nodes)
    return lookup(spec, jkeys).get(last, {})


def record(
    spec: JournalSpec,
    jkeys: Sequence[tuple[str, str]],
    values: list[Any],
    node: str,
    fp: str,
    keys: Sequence[Key],
) -> list[Failure]:
    """Commit one node's outputs for a batch, in one transaction (HMAC on every record).

    An output that cannot be pickled is replaced, in ``values``, by a ``TypeError``
    Failure of ``node`` (``keys``: the items' keys), which is what is recorded; returns
    those new Failures (the caller counts them).
    """
    store = store_for(spec)
    made: list[Failure] = []

    def fail(i: int, exc: Exception) -> Failure:
        made.append(unrecordable(node, keys[i], values[i], exc))
        return made[-1]

    rows = store.signer.rows(node, fp, jkeys, values, fail)
    if rows:
        store.write_outputs(rows)
    return made


def unrecordable(node: str, key: Key, value: Any, exc: Exception) -> Failure:
    """Return the Failure of an output of ``node`` that cannot be recorded in the journal."""
    error = TypeError(
        f"the output of type {qualified_type(value)} cannot be recorded in the journal "
        f"({qualified_type(exc)}: {exc}); return plain data from a node whose outputs are "
        "recorded (a sink, or cache=True)"
    )
    return failure_from_exception(node, key, error)
