"""A sink batch in progress: one record per item on disk at once, folded in after a crash.

Each record of a sink batch goes to a private append-only file next to the journal
(``run.db.pending-<inode>-<host>-<pid>-<thread>.<serial>``, mode 0600) with one
``write``, and the batch is committed to SQLite in one transaction at the end, after
which the file is removed. If the process dies mid-batch (or the run stops because its
journal was removed, replaced or renamed away), whoever runs the batch's items next on
that journal file (the pool's re-run, or the next run) first folds the file into the
journal (:func:`fold_pending`), so the items the sink already did are not done again.
The inode names the journal file the records belong to: another journal made or moved in
under the same name never takes them, and the journal they belong to finds them under
whatever name it has now in the same folder. The format is plain length-prefixed fields,
never a pickle, so reading a file is safe before its records are authenticated.
"""

from __future__ import annotations

import functools
import itertools
import os
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

from papy._journal.files import FILE_MODE
from papy._journal.secret import Row
from papy._journal.store import JournalSpec, Store, store_for

PENDING = ".pending-"
_ROW_HEAD = struct.Struct("!9I")  # total length, then the lengths of the 8 fields
#: pending files this process writes now (path -> its batch's tracker): see :func:`_alive`
_WRITING: dict[str, Any] = {}
_SERIAL = itertools.count()  # of this process's batches (see SinkLog)
_WRITING_GUARD = threading.Lock()


class SinkLog:
    """The records of a sink batch in progress, one per item, as soon as the item is done."""

    def __init__(self, spec: JournalSpec, node: str, fp: str, tracker: Any = None) -> None:
        self.spec = spec
        self.node = node
        self.fp = fp
        self.tracker = tracker  # its ``abandoned``: the pool gave up on the batch
        self.store = store_for(spec)
        self.rows: list[Row] = []
        self.fd: int | None = None
        host, pid, tid = socket.gethostname(), os.getpid(), threading.get_ident()
        # A thread's ident is reused once it ended: the serial keeps a later batch from
        # taking (and truncating) the file of a batch cut short that no one folded yet.
        serial = next(_SERIAL)
        self.file = f"{spec.path}{PENDING}{spec.ident[1]}-{host}-{pid}-{tid}.{serial}"

    def add(self, jkey: tuple[str, str], value: Any, fail: Callable[[int, Exception], Any]) -> Any:
        """Write one item's record to the file at once; return what was recorded: the
        value, or ``fail(0, error)`` when it cannot be pickled."""
        values = [value]
        (row,) = self.store.signer.rows(self.node, self.fp, (jkey,), values, fail)
        self.rows.append(row)
        if self.fd is None:
            with _WRITING_GUARD:  # before the file exists: no other thread may fold it
                _WRITING[self.file] = self.tracker
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_NOFOLLOW
            self.fd = os.open(self.file, flags | os.O_CLOEXEC, FILE_MODE)
        os.write(self.fd, encode_row(row))
        return values[0]

    def commit(self) -> None:
        """Commit the batch's records in one transaction; remove the file.

        If the commit fails (the run's journal was closed meanwhile), the file is kept for
        the next run to fold in (:func:`fold_pending`), and closed.
        """
        try:
            if self.rows:
                self.store.write_outputs(self.rows)
        except BaseException:
            self.close()
            raise
        if self.fd is not None:
            try:
                os.unlink(self.file)  # before close(): while listed, no other thread folds it
            except FileNotFoundError:
                pass  # folded by another thread meanwhile: the same rows, committed twice
            self.close()

    def close(self) -> None:
        """Close the file, keeping it (a batch cut short: the next run folds it in)."""
        fd, self.fd = self.fd, None
        if fd is not None:
            with _WRITING_GUARD:
                _WRITING.pop(self.file, None)
            os.close(fd)


def _as_recorded(failure: Any, _attempt: int, _error: Exception) -> Any:
    return failure  # a Failure always pickles: its fields are strings


def keep_failures(
    spec: JournalSpec, node: str, fp: str, failed: list[tuple[tuple[str, str], Any]]
) -> None:
    """Write the records of a batch's known failures (``(journal key, Failure)`` pairs) to
    a pending file for the next run on the journal to fold in.

    For a batch its run, now ended, can no longer commit: the re-run of a late item's
    batch-mates on a thread pool. The late call still runs in the background; its
    item's timeout is then on record, so the next run does not call the sink on it again.
    """
    if not failed:
        return
    log = SinkLog(spec, node, fp)
    try:
        for jkey, failure in failed:
            log.add(jkey, failure, functools.partial(_as_recorded, failure))
    finally:
        log.close()


def encode_row(row: Row) -> bytes:
    """Return a record as length-prefixed fields (see :func:`decode_rows`)."""
    node, item, sub, fp, bad, message, blob, mac = row
    fields = (
        node.encode(),
        item.encode(),
        sub.encode(),
        fp.encode(),
        b"1" if bad else b"0",
        b"\xff" if message is None else message.encode("utf-8", "replace"),
        blob,
        mac,
    )
    sizes = [len(f) for f in fields]
    return _ROW_HEAD.pack(sum(sizes) + 32, *sizes) + b"".join(fields)


def decode_rows(data: bytes) -> list[Row]:
    """Parse a pending file; a record cut short by a crash (the last) is dropped."""
    rows: list[Row] = []
    pos = 0
    head = _ROW_HEAD.size
    while pos + head <= len(data):
        total, *sizes = _ROW_HEAD.unpack_from(data, pos)
        if pos + 4 + total > len(data) or sum(sizes) + 32 != total:
            break
        at = pos + head
        fields = []
        for k in sizes:
            fields.append(data[at : at + k])
            at += k
        pos = at
        node, item, sub, fp, bad, message, blob, mac = fields
        rows.append(
            (
                node.decode(),
                item.decode(),
                sub.decode(),
                fp.decode(),
                int(bad == b"1"),
                None if message == b"\xff" else message.decode(),
                blob,
                mac,
            )
        )
    return rows


def _alive(host: str, pid: int, path: str) -> bool:
    """Tell whether the process (and, in this one, the batch) writing pending file ``path``
    may still add to it."""
    if host != socket.gethostname():
        return True  # cannot tell: leave it to a run that owns the journal
    if pid == os.getpid():
        # Another thread of this process, busy with its own batch; not one a thread pool
        # gave up on (a late item): that thread adds nothing more, and the batch-mates it
        # did are re-run elsewhere, which must find them done.
        with _WRITING_GUARD:
            if path not in _WRITING:
                return False  # closed: a batch cut short
            return not getattr(_WRITING[path], "abandoned", False)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner(name: str, base: str, inode: int) -> tuple[str, str] | None:
    """Return (host, pid) of a pending file ``name`` that holds records of the journal
    file ``inode`` (named ``base`` now), or None if it is another file's.

    ``<name>.pending-<inode>-<host>-<pid>-<thread>.<serial>``; a file without the inode (made by
    an earlier version) is the journal's that has its name. Inode 0 (unknown) matches by
    name only.
    """
    prefix, _, tail = name.partition(PENDING)
    parts = tail.rsplit("-", 2)
    if len(parts) != 3:
        return None
    head, pid = parts[0], parts[1]
    ino, dash, host = head.partition("-")
    if not (dash and ino.isdigit()):  # no inode: by its name alone
        return (head, pid) if prefix == base else None
    if int(ino) == inode and inode != 0:
        return host, pid
    return (host, pid) if inode == 0 and prefix == base else None


def fold_pending(store: Store, everything: bool = False) -> int:
    """Commit the records of sink batches whose process died; return how many.

    ``everything``: also those of live-looking processes (only the run's owner, at start,
    when no other run can be writing). Files of other users are ignored.
    """
    folder = os.path.dirname(store.path)
    try:
        names = [n for n in os.listdir(folder or ".") if PENDING in n]
    except OSError:
        return 0
    total = 0
    for name in names:
        owner = _owner(name, os.path.basename(store.path), store.ident[1])
        if owner is None:
            continue  # another journal file's
        host, pid = owner
        full = os.path.join(folder, name)
        if not everything and (not pid.isdigit() or _alive(host, int(pid), full)):
            continue
        try:
            fd = os.open(full, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            continue  # someone else folded it meanwhile
        try:
            if os.fstat(fd).st_uid != os.getuid():
                continue
            chunks = []
            while True:
                b = os.read(fd, 1 << 20)
                if not b:
                    break
                chunks.append(b)
        finally:
            os.close(fd)
        rows = decode_rows(b"".join(chunks))
        if rows:
            store.write_outputs(rows)
            total += len(rows)
        try:
            os.unlink(full)
        except FileNotFoundError:
            pass
    return total
