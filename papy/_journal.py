"""The journal: a SQLite file that makes a run resumable and caches node outputs.

**What is recorded.** Per node that is a *terminal* (a sink, or the node ``map`` yields) or
was added with ``cache=True``, and per input item: the output the node produced (or its
Failure), keyed by ``(node, item, sub-item)`` and stamped with the node's *fingerprint*.
An input item is finished when every terminal has its output: for a terminal below a
scatter, when all its sub-items are there, which the driver marks with a ``complete`` row.

**Item identity.** Without ``key=`` an input item is known by a digest of its value (a
canonical encoding: containers element by element, dicts and sets in a fixed order, other
objects by their pickle) plus its occurrence count among equal items of the run, so
inserting, removing, reordering or editing input items never hands one item another's
output. With ``key=`` it is known by the key, which must then be unique: a repeated key
raises :class:`JournalError` at admission, before anything is looked up for it.

**Code identity.** A node's fingerprint covers its functions' code (bytecode, constants,
names of the globals they read), defaults, closure values, ``args``, ``kwargs``, its role
(scatter, gather, batched, join), its parents and their fingerprints. So a changed node and
everything downstream of it no longer match their records: the records of a changed node
are dropped when the journal is opened, and the log and the report say which nodes
changed and why.

**Who records.** The process that ran the task, right after running it (one transaction
per task; per item for a sink, so a sink's side effect and its record are never more than
one item apart). A worker running a journaled task when the driver dies finishes the task
and its commit before it exits (see ``papy.pools._worker``). Before running a task, the
worker looks the items up: a node with a record is not run again, its output is reused.

**Trust.** The file must belong to the user running PaPy, and every record carries an
HMAC keyed by a per-user secret (``$XDG_CONFIG_HOME/papy/secret``, mode 0600), checked
before its pickle is loaded: a journal written by someone else, or edited, is refused.

**One run at a time.** ``run.db.lock`` (next to the journal) holds a POSIX lock for the
run's whole life and names its owner; a second run fails at once with the owner's pid and
host. On close, the write-ahead log is checkpointed into the main file, so ``run.db`` alone
is the whole journal.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import hmac
import json
import os
import pickle
import socket
import sqlite3
import struct
import threading
import time
import types
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from papy._errors import JournalError
from papy._items import Failure

if TYPE_CHECKING:
    from papy._node import Node
    from papy._pipeline import Pipeline
    from papy._report import Report

_FORMAT = "papy-journal"
_VERSION = "2"
_SCHEMA = """
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
_FILE_MODE = 0o600
#: byte ranges of the lock file: the run's owner holds 0 exclusively; a worker holds 2
#: shared while it runs a journaled task, so a new run waits for a dead run's last commits
_OWNER_BYTE = 0
_TASK_BYTE = 2
_CHECK_EVERY_S = 0.25
_PRELOAD_ROWS = 1_000_000


@dataclass(frozen=True)
class JournalSpec:
    """What a worker needs to look up and record a step's outputs.

    ``nodes`` lists the recorded stages of the step as (stage index, node name,
    fingerprint); ``sink``: the last stage is a sink, recorded item by item.
    """

    path: str
    terminal: str
    retry_failed: bool = False
    #: the journal held records when the run began (kept for callers; lookups always run)
    resuming: bool = True
    nodes: tuple[tuple[int, str, str], ...] = ()
    sink: bool = False
    #: (device, inode) of the run's journal file: a worker refuses to write to another
    ident: tuple[int, int] = (0, 0)


# -- identity of items ------------------------------------------------------------------------


def _feed(h: Any, v: Any, depth: int = 0) -> None:
    """Feed a canonical encoding of ``v`` to the hash ``h``.

    Equal plain values (numbers, text, bytes, and lists, tuples, dicts and sets of them)
    give equal encodings whatever their identity or insertion order; other objects are
    encoded by their pickle (cloudpickle for functions), which is stable for equal state.
    """
    t = type(v)
    if v is None:
        h.update(b"N")
    elif t is bool:
        h.update(b"T" if v else b"F")
    elif t is int:
        b = str(v).encode()
        h.update(b"i%d:" % len(b) + b)
    elif t is float:
        h.update(b"f" + struct.pack("!d", v))
    elif t is str:
        b = v.encode("utf-8", "surrogatepass")
        h.update(b"s%d:" % len(b) + b)
    elif t is bytes or t is bytearray:
        h.update(b"b%d:" % len(v) + bytes(v))
    elif depth < 64 and (t is list or t is tuple):
        h.update((b"l" if t is list else b"t") + b"%d:" % len(v))
        for x in v:
            _feed(h, x, depth + 1)
    elif depth < 64 and t is dict:
        pairs = sorted((_digest(k, depth + 1), _digest(x, depth + 1)) for k, x in v.items())
        h.update(b"d%d:" % len(pairs) + b"".join(a + b for a, b in pairs))
    elif depth < 64 and (t is set or t is frozenset):
        h.update(b"S%d:" % len(v) + b"".join(sorted(_digest(x, depth + 1) for x in v)))
    elif isinstance(v, (types.FunctionType, types.MethodType, types.BuiltinFunctionType)):
        h.update(b"c" + _callable_digest(v, depth + 1).encode())
    elif isinstance(v, type):
        h.update(b"y" + f"{v.__module__}.{v.__qualname__}".encode())
    elif isinstance(v, types.ModuleType):
        h.update(b"m" + v.__name__.encode())
    else:
        blob = _pickle_or_none(v)
        if blob is None:  # an unpicklable object (a lock, a socket): known by its type only
            h.update(b"u" + f"{t.__module__}.{t.__qualname__}".encode())
        else:
            h.update(b"p%d:" % len(blob) + blob)


def _pickle_or_none(v: Any) -> bytes | None:
    try:
        return pickle.dumps(v, protocol=4)
    except Exception:
        pass
    try:
        import cloudpickle

        return bytes(cloudpickle.dumps(v, protocol=4))
    except Exception:
        return None


def _digest(v: Any, depth: int = 0) -> bytes:
    h = hashlib.blake2b(digest_size=20)
    _feed(h, v, depth)
    return h.digest()


def content_digest(value: Any) -> str:
    """Return a stable hex digest of an input item's value (its identity without ``key=``)."""
    return _digest(value).hex()


# -- identity of code -------------------------------------------------------------------------


def _code_digest(code: types.CodeType, depth: int = 0) -> str:
    """Digest what decides a code object's behaviour: bytecode, constants, names read."""
    h = hashlib.blake2b(digest_size=20)
    h.update(code.co_code)
    h.update(b"|%d|%d|%d|" % (code.co_argcount, code.co_kwonlyargcount, code.co_flags))
    h.update(",".join(code.co_names).encode())
    h.update(b"|")
    h.update(",".join(code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]).encode())
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            h.update(b"C" + _code_digest(c, depth + 1).encode())
        else:
            _feed(h, c, depth + 1)
    return h.hexdigest()


def _fn_parts(f: Any, depth: int = 0) -> dict[str, str]:
    """Split a callable's identity into code, defaults and closure digests."""
    if depth > 8:
        return {"code": "deep", "defaults": "", "closure": ""}
    if isinstance(f, types.MethodType):
        parts = _fn_parts(f.__func__, depth + 1)
        parts["closure"] = _digest([parts["closure"], f.__self__], depth + 1).hex()
        return parts
    if isinstance(f, types.FunctionType):
        closure = [c.cell_contents for c in (f.__closure__ or ()) if _cell_filled(c)]
        return {
            "code": _code_digest(f.__code__, depth),
            "defaults": _digest([f.__defaults__, f.__kwdefaults__], depth + 1).hex(),
            "closure": _digest(closure, depth + 1).hex(),
        }
    func = getattr(f, "func", None)  # functools.partial
    if func is not None and callable(func) and hasattr(f, "keywords"):
        parts = _fn_parts(func, depth + 1)
        parts["closure"] = _digest(
            [parts["closure"], getattr(f, "args", ()), f.keywords], depth + 1
        ).hex()
        return parts
    if isinstance(f, (types.BuiltinFunctionType, type)):
        name = f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', repr(f))}"
        return {"code": name, "defaults": "", "closure": ""}
    call = type(f).__dict__.get("__call__")  # a callable object: its class's code + state
    parts = (
        _fn_parts(call, depth + 1)
        if isinstance(call, types.FunctionType)
        else {"code": f"{type(f).__module__}.{type(f).__qualname__}", "defaults": ""}
    )
    parts["closure"] = _digest(getattr(f, "__dict__", None), depth + 1).hex()
    return parts


def _cell_filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


def _callable_digest(f: Any, depth: int) -> str:
    p = _fn_parts(f, depth)
    return hashlib.blake2b("|".join(p[k] for k in sorted(p)).encode(), digest_size=20).hexdigest()


#: the parts of a fingerprint, in the order the reasons name them
_REASONS = {
    "code": "function body changed",
    "defaults": "defaults changed",
    "closure": "closure values changed",
    "args": "args changed",
    "kwargs": "kwargs changed",
    "graph": "place in graph changed",
}


@dataclass(frozen=True)
class NodePrint:
    """A node's fingerprint, the digests it is made of, and its parents' names."""

    fingerprint: str
    parts: dict[str, str]
    parents: list[str]


def node_prints(pipe: Pipeline) -> dict[str, NodePrint]:
    """Return every node's fingerprint; a node's covers its ancestors' (see module doc)."""
    from papy._graph import topological_order

    out: dict[str, NodePrint] = {}
    for n in topological_order(pipe.nodes):
        fns = [_fn_parts(f) for f in n.fns]
        call = n.call
        parts = {
            "code": _digest([p["code"] for p in fns]).hex(),
            "defaults": _digest([p["defaults"] for p in fns]).hex(),
            "closure": _digest([p["closure"] for p in fns]).hex(),
            "args": _digest(list(getattr(call, "args", []))).hex(),
            "kwargs": _digest(list(getattr(call, "kwargs", []))).hex(),
            "graph": _digest(
                [
                    [p.name for p in n.parents],
                    n.scatter,
                    n.gather,
                    n.batched,
                    len(n.parents) > 1,
                ]
            ).hex(),
        }
        upstream = [out[p.name].fingerprint for p in n.parents]
        fp = _digest([n.name, sorted(parts.items()), upstream]).hex()
        out[n.name] = NodePrint(fp, parts, [p.name for p in n.parents])
    return out


def fingerprint(pipe: Pipeline) -> str:
    """Return one digest of the whole pipeline: every node's fingerprint."""
    prints = node_prints(pipe)
    return _digest(sorted((k, v.fingerprint) for k, v in prints.items())).hex()


# -- the per-user secret and record authentication ------------------------------------------

_secrets: dict[str, bytes] = {}


def config_dir() -> Path:
    """Return the user's PaPy configuration directory (``$XDG_CONFIG_HOME/papy``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "papy"


def user_secret() -> bytes:
    """Return this user's journal key, creating it once (32 random bytes, mode 0600).

    Raises JournalError when the file belongs to someone else or others can read it.
    """
    env = os.environ
    found = _secrets.get(f"{env.get('XDG_CONFIG_HOME')}\0{env.get('HOME')}")
    if found is not None:
        return found
    path = config_dir() / "secret"
    key = f"{env.get('XDG_CONFIG_HOME')}\0{env.get('HOME')}"
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            _create_secret(path)
            continue
        except OSError as exc:
            raise JournalError(f"cannot read the journal key {path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if st.st_uid != os.getuid():
                raise JournalError(
                    f"the journal key {path} belongs to uid {st.st_uid}, not to you "
                    f"(uid {os.getuid()}): remove it, and PaPy makes a new one"
                )
            if st.st_mode & 0o077:
                raise JournalError(
                    f"the journal key {path} can be read by other users (mode "
                    f"{st.st_mode & 0o777:o}): remove it, and PaPy makes a new one"
                )
            data = os.read(fd, 64)
        finally:
            os.close(fd)
        if len(data) >= 32:
            _secrets[key] = data
            return data
        time.sleep(0.05)  # another process is writing it right now
    raise JournalError(f"the journal key {path} is empty or truncated: remove it")


def _create_secret(path: Path) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".secret-{os.getpid()}-{threading.get_ident()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, _FILE_MODE)
        try:
            os.fchmod(fd, _FILE_MODE)
            os.write(fd, os.urandom(32))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # never replaces a key another process made meanwhile
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    except OSError as exc:
        raise JournalError(
            f"cannot create the journal key in {path.parent}: {exc.strerror}; set "
            "XDG_CONFIG_HOME to a directory you own"
        ) from None


_hmacs: dict[bytes, Any] = {}


def _mac(secret: bytes, node: str, item: str, sub: str, fp: str, failed: int, blob: bytes) -> bytes:
    """Return the record's HMAC-SHA256 (keyed state computed once per key, then copied)."""
    base = _hmacs.get(secret)
    if base is None:
        base = _hmacs[secret] = hmac.new(secret, digestmod=hashlib.sha256)
    h = base.copy()
    h.update(f"{node}\0{item}\0{sub}\0{fp}\0{failed}\0".encode())
    h.update(blob)
    return bytes(h.digest())


def _load(
    path: str,
    secret: bytes,
    node: str,
    item: str,
    sub: str,
    fp: str,
    failed: int,
    blob: bytes,
    mac: bytes,
) -> Any:
    """Unpickle a record, after checking its HMAC (a forged record never reaches pickle)."""
    if not hmac.compare_digest(mac, _mac(secret, node, item, sub, fp, failed, blob)):
        raise JournalError(
            f"{path}: the record of node {node!r} for item {item!r} fails authentication: "
            "the journal was written with another user's key or modified since; it is not "
            "loaded (a journal holds pickles, which can run code). Use a new journal"
        )
    return pickle.loads(blob)


def _failure_text(f: Failure) -> str:
    """Return what ``papy journal failures`` shows of a Failure: origin node, tab, cause."""
    what = f" (input {f.input_repr})" if f.input_repr else ""
    return f"{f.node}\t{f.exc_type}: {f.message}{what}"


def _blob(value: Any) -> bytes:
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        import cloudpickle

        return bytes(cloudpickle.dumps(value))


# -- opening a journal ------------------------------------------------------------------------


def _owner_name(uid: int) -> str:
    try:
        import pwd

        return f"user {pwd.getpwuid(uid).pw_name!r} (uid {uid})"
    except (KeyError, ImportError):
        return f"uid {uid}"


def _check_owner(path: str, st: os.stat_result) -> None:
    if st.st_uid != os.getuid():
        raise JournalError(
            f"{path} belongs to {_owner_name(st.st_uid)}, not to you (uid {os.getuid()}): a "
            "journal holds pickled data, and loading another user's pickles would run their "
            "code; use a journal of your own"
        )


def _place_error(path: str, exc: OSError) -> JournalError:
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


def _sqlite_error(path: str, exc: sqlite3.Error) -> JournalError:
    text = str(exc)
    if "full" in text:
        return JournalError(f"cannot write the journal {path}: disk full ({text})")
    if "readonly" in text or "unable to open" in text:
        folder = os.path.dirname(path)
        return JournalError(
            f"cannot write the journal {path} ({text}): check that it and directory {folder} "
            "are writable"
        )
    return JournalError(
        f"{path} is not a papy journal ({text}); it is corrupt or another kind of file: "
        "move it away, or give another journal path"
    )


def _connect(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 60000")
    return conn


def _open_lock(path: str) -> int:
    lock = path + ".lock"
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, _FILE_MODE)
    except OSError as exc:
        raise _place_error(path, exc) from None
    st = os.fstat(fd)
    if st.st_uid != os.getuid():
        os.close(fd)
        raise JournalError(
            f"{lock} belongs to {_owner_name(st.st_uid)}, not to you: the journal {path} is "
            "someone else's; use a journal of your own"
        )
    if st.st_mode & 0o777 != _FILE_MODE:
        os.fchmod(fd, _FILE_MODE)
    return fd


def _take_ownership(path: str, fd: int) -> None:
    """Hold the run's lock or fail at once naming the run that holds it.

    The caller closes ``fd`` when this raises (JournalError).
    """
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _OWNER_BYTE)
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
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, _TASK_BYTE)
            fcntl.lockf(fd, fcntl.LOCK_UN, 1, _TASK_BYTE)
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
    _held[path] = os.getpid()


def _create_file(path: str) -> None:
    """Create an empty journal file, mode 0600, never through a symbolic link."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, _FILE_MODE)
    except FileExistsError:
        return
    except OSError as exc:
        raise _place_error(path, exc) from None
    os.fchmod(fd, _FILE_MODE)
    os.close(fd)


def _private(path: str) -> None:
    """Set a journal file (and its -wal/-shm) to mode 0600 if it is not."""
    for p in (path, path + "-wal", path + "-shm"):
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        if st.st_uid == os.getuid() and st.st_mode & 0o777 != _FILE_MODE:
            os.chmod(p, _FILE_MODE)


class Journal:
    """The driver's side of the journal: open and check it, answer and record completion.

    Raises JournalError when the file is not a journal, belongs to another user, fails
    authentication, is in use by another run, or cannot be written where it is.
    """

    def __init__(
        self, path: str | Path, pipe: Pipeline, *, force: bool = False, retry_failed: bool = False
    ) -> None:
        self.path = str(Path(path).resolve())
        self.retry_failed = retry_failed
        self.force = force
        self._lock = threading.Lock()
        self._pending_complete: list[tuple[str, str]] = []
        self._last_flush = time.monotonic()
        self._last_check = time.monotonic()
        self._seen: dict[str, int] = {}
        self._keys_seen: set[str] = set()
        #: values read along with completion, for the node whose outputs are replayed
        self._replayed: set[str] = set()
        self._done: dict[str, bool] | None = None
        self._prefetched: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
        self._closed = False
        #: node name -> why its records were dropped ("function body changed", ...)
        self.changes: dict[str, str] = {}
        self.prints = node_prints(pipe)
        self.secret = user_secret()
        if os.path.islink(self.path):
            raise JournalError(f"{self.path} is a symbolic link; a journal must be a regular file")
        if _held.get(self.path) == os.getpid():
            raise JournalError(
                f"{self.path} is in use by another run (pid {os.getpid()} on host "
                f"{socket.gethostname()}, this process); wait for it to end, or use another "
                "journal"
            )
        self._lock_fd = -1
        self._lock_fd = _open_lock(self.path)
        try:
            _take_ownership(self.path, self._lock_fd)
            self._open(pipe)
        except BaseException:
            conn = getattr(self, "conn", None)
            if conn is not None:
                conn.close()
            _close_thread_conns(self.path)
            self._release()
            raise

    def _open(self, pipe: Pipeline) -> None:
        path = self.path
        if os.path.exists(path):
            st = os.stat(path)
            _check_owner(path, st)
            if not os.access(os.path.dirname(path), os.W_OK):
                raise _place_error(path, PermissionError(errno.EACCES, "Permission denied"))
        if not os.path.exists(path):
            for stale in (path + "-wal", path + "-shm"):  # of a journal deleted earlier
                if os.path.lexists(stale):
                    os.unlink(stale)
        _create_file(path)
        _private(path)
        fresh = os.path.getsize(path) == 0
        try:
            self.conn = _connect(path)
            if fresh:
                self.conn.execute("PRAGMA journal_mode = WAL")
                self.conn.executescript(_SCHEMA)
                self.conn.executemany(
                    "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                    [("format", _FORMAT), ("version", _VERSION)],
                )
            else:
                self._check_format()
                self.conn.execute("PRAGMA journal_mode = WAL")
            fold_pending(path, everything=True)  # sink batches of a run that died
            self._reconcile(pipe)
            self.resuming = (
                self.conn.execute("SELECT EXISTS (SELECT 1 FROM outputs)").fetchone()[0] == 1
            )
            self.conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error as exc:
            raise _sqlite_error(path, exc) from None
        _private(path)
        st = os.stat(path)
        self._ident = (st.st_dev, st.st_ino)

    def _check_format(self) -> None:
        try:
            meta = dict(self.conn.execute("SELECT name, value FROM meta").fetchall())
        except sqlite3.OperationalError:
            meta = {}
        if meta.get("format") != _FORMAT:
            raise JournalError(
                f"{self.path} is an SQLite file but not a papy journal; give another path"
            )
        if meta.get("version") != _VERSION:
            raise JournalError(
                f"{self.path} was written by another version of papy (journal format "
                f"{meta.get('version')}, this papy writes {_VERSION}); use a new journal"
            )

    def _reconcile(self, pipe: Pipeline) -> None:
        """Compare node fingerprints with the recorded ones; drop what no longer holds."""
        old = {
            name: (fp, json.loads(parts))
            for name, fp, parts in self.conn.execute("SELECT name, fingerprint, parts FROM nodes")
        }
        changed: dict[str, str] = {}
        for name, pr in self.prints.items():
            if name not in old or old[name][0] == pr.fingerprint:
                continue
            why: list[str] = [
                text for part, text in _REASONS.items() if old[name][1].get(part) != pr.parts[part]
            ]
            if not why:
                ups = [p for p in pr.parents if p in changed]
                why = [f"upstream node {ups[0]!r} changed" if ups else "upstream nodes changed"]
            changed[name] = ", ".join(why)
        gone = [name for name in old if name not in self.prints]
        terminals = {n.name for n in pipe.nodes if n.is_sink}
        rows = [
            (
                name,
                pr.fingerprint,
                json.dumps(pr.parts, sort_keys=True),
                json.dumps(pr.parents),
                int(bool(getattr(pipe.node(name), "cache", False))),
                int(name in terminals),
            )
            for name, pr in self.prints.items()
        ]
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            if self.force:
                for name in changed:  # keep the records: the caller vouches for them
                    self.conn.execute(
                        "UPDATE outputs SET fp = ? WHERE node = ?",
                        (self.prints[name].fingerprint, name),
                    )
            else:
                for name in [*changed, *gone]:
                    self.conn.execute("DELETE FROM outputs WHERE node = ?", (name,))
                    self.conn.execute("DELETE FROM complete WHERE node = ?", (name,))
                for name in gone:
                    self.conn.execute("DELETE FROM nodes WHERE name = ?", (name,))
            self.conn.executemany("INSERT OR REPLACE INTO nodes VALUES (?, ?, ?, ?, ?, ?)", rows)
            if not self.force:  # records of another version of a node (folded in, say)
                self.conn.execute(
                    "DELETE FROM outputs WHERE fp != "
                    "(SELECT fingerprint FROM nodes WHERE nodes.name = outputs.node)"
                )
            self.conn.executemany(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)",
                [
                    ("pipeline", pipe.name),
                    ("last_run", time.strftime("%Y-%m-%d %H:%M:%S")),
                    ("last_host", socket.gethostname()),
                ],
            )
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.changes = changed
        if changed and not self.force:
            import logging

            log = logging.getLogger("papy")
            for name, reason in changed.items():
                log.warning("journal: node %r: %s; recomputing it", name, reason)
        if self.force and changed:
            import logging

            logging.getLogger("papy").warning(
                "journal: nodes changed (%s) but force=True keeps their records",
                "; ".join(f"{k!r}: {v}" for k, v in changed.items()),
            )

    # -- wiring the run ------------------------------------------------------------------

    def spec_for(self, nodes: Sequence[Node], terminals: set[str]) -> JournalSpec | None:
        """Return the spec of a step of ``nodes`` that records something, or None.

        A step records the outputs of its terminals (names in ``terminals``) and of its
        nodes with ``cache=True``.
        """
        rec = tuple(
            (i, n.name, self.prints[n.name].fingerprint)
            for i, n in enumerate(nodes)
            if n.name in terminals or getattr(n, "cache", False)
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
        )

    def identify(self, values: Sequence[Any], key: Callable[[Any], Any] | None) -> list[str]:
        """Return the journal identity of each input item (see the module docstring).

        Raises JournalError when ``key`` gives two input items the same key.
        """
        out = []
        if key is None:
            seen = self._seen
            for v in values:
                d = content_digest(v)
                n = seen.get(d, 0)
                seen[d] = n + 1
                out.append(f"c:{d}:{n}")
            return out
        keys = self._keys_seen
        for v in values:
            k = "k:" + json.dumps(key(v), sort_keys=True, default=str)
            if k in keys:
                raise JournalError(
                    f"key {k[2:]} is given to more than one input item (again by item "
                    f"{v!r:.80}): with a journal, key= must tell every input item apart"
                )
            keys.add(k)
            out.append(k)
        return out

    def check(self, now: bool = False) -> None:
        """Stop the run (JournalError) if the journal file was removed or replaced."""
        t = time.monotonic()
        if not now and t - self._last_check < _CHECK_EVERY_S:
            return
        self._last_check = t
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise JournalError(
                f"the journal {self.path} was removed during the run: stopped, since what "
                "the run computes could no longer be recorded"
            ) from None
        if (st.st_dev, st.st_ino) != self._ident:
            raise JournalError(
                f"the journal {self.path} was replaced by another file during the run: "
                "stopped, since records would go to the old file"
            )

    # -- resuming ------------------------------------------------------------------------

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
        return done

    def _load_done(self, terminals: dict[str, bool]) -> dict[str, bool]:
        """Read which items are finished at every terminal, once, if that is small enough.

        Resuming asks item by item; one query per item would cost more than the rest of
        the driver's work. Only for top-level terminals and up to _PRELOAD_ROWS records
        (about 100 bytes of memory each); otherwise an empty dict (ask SQLite each time).
        """
        if not all(terminals.values()):
            return {}
        names = list(terminals)
        marks = ",".join("?" * len(names))
        (n,) = self.conn.execute(
            f"SELECT COUNT(*) FROM outputs WHERE sub = '' AND node IN ({marks})", names
        ).fetchone()
        if n > _PRELOAD_ROWS:
            return {}
        count: dict[str, int] = {}
        failed: dict[str, bool] = {}
        for terminal in names:
            for item, bad in self.conn.execute(
                "SELECT item, failed FROM outputs WHERE node = ? AND sub = '' AND fp = ?",
                (terminal, self.prints[terminal].fingerprint),
            ):
                count[item] = count.get(item, 0) + 1
                if bad:
                    failed[item] = True
        done = {k: failed.get(k, False) for k, c in count.items() if c == len(names)}
        return done or {"": False}  # non-empty: "loaded", even when nothing is finished

    def outputs(self, terminal: str, item: str) -> list[Any]:
        """Return what ``terminal`` produced for an input item, in sub-item order."""
        self._replayed.add(terminal)
        rows = self._prefetched.pop((terminal, item), None)
        if self._prefetched and len(self._prefetched) > 4096:
            self._prefetched.clear()  # items finished at the output but not everywhere
        if rows is None:
            rows = self.conn.execute(
                "SELECT sub, fp, failed, value, mac FROM outputs WHERE node = ? AND item = ?",
                (terminal, item),
            ).fetchall()
        rows.sort(key=lambda r: tuple(int(x) for x in r[0].split(".")) if r[0] else ())
        return [
            _load(self.path, self.secret, terminal, item, sub, fp, bad, blob, mac)
            for sub, fp, bad, blob, mac in rows
        ]

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
        """Flush, fold the write-ahead log into the file, release the run's lock; idempotent.

        Raises JournalError if the file was removed or replaced during the run.
        """
        if self._closed:
            return
        self._closed = True
        try:
            self.check(now=True)
            self.flush()
            _close_thread_conns(self.path)
            try:
                self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self.conn.execute("PRAGMA journal_mode = DELETE")
            except sqlite3.OperationalError:
                pass  # another connection still has it open: the checkpoint is what matters
        except sqlite3.Error as exc:
            raise _sqlite_error(self.path, exc) from None
        finally:
            _close_thread_conns(self.path)
            self.conn.close()
            self._release()

    def _release(self) -> None:
        fd, self._lock_fd = self._lock_fd, -1
        if fd >= 0:
            if _held.get(self.path) == os.getpid():  # ours: clear the owner's name
                del _held[self.path]
                try:
                    os.ftruncate(fd, 0)
                except OSError:
                    pass
            os.close(fd)  # drops the POSIX lock

    def annotate(self, report: Report) -> Report:
        """Return the run's report with the nodes whose records were dropped, and why."""
        import dataclasses

        if not self.changes:
            return report
        return dataclasses.replace(report, changed=dict(self.changes))


def _write(
    conn: sqlite3.Connection, sql: str, rows: Iterable[tuple[Any, ...]], path: str | None = None
) -> None:
    """Write rows in one transaction.

    Writers from several processes take a lock first: SQLite's own busy handler backs
    off by sleeping up to 100 ms, which several workers committing at the same time turn
    into most of the run; a POSIX lock wakes the next writer at once. Raises JournalError
    naming the cause when the disk is full or the file is read-only.
    """
    held = _write_lock(path) if path else None
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(sql, rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    except sqlite3.OperationalError as exc:
        raise _sqlite_error(path or "journal", exc) from None
    finally:
        if held is not None:
            fcntl.lockf(held[0], fcntl.LOCK_UN, 1, 1)
            held[1].release()


_local = threading.local()  # one connection per thread (thread pools run tasks at once)
_proc_locks: dict[tuple[int, str], tuple[int, threading.Lock]] = {}
_proc_locks_guard = threading.Lock()


def _lock_fd(path: str) -> tuple[int, threading.Lock]:
    """Return this process's descriptor of ``path.lock`` and its thread lock.

    POSIX locks belong to the process, so threads of one process also take the thread
    lock; the descriptor is never closed (closing any descriptor of the file would drop
    every POSIX lock the process holds on it, the run's own among them).
    """
    key = (os.getpid(), path)
    got = _proc_locks.get(key)
    if got is None:
        with _proc_locks_guard:
            got = _proc_locks.get(key)
            if got is None:
                fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, _FILE_MODE)
                got = _proc_locks[key] = (fd, threading.Lock())
    return got


def _write_lock(path: str) -> tuple[int, threading.Lock]:
    fd, tlock = _lock_fd(path)
    tlock.acquire()
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX, 1, 1)
    except BaseException:
        tlock.release()
        raise
    return fd, tlock


class task_guard:
    """Hold the lock file's task byte (shared) while a worker process runs a journaled task.

    A new run waits until no worker of an earlier (dead) run holds it. The driver's own
    process holds the run's lock already and skips this.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None

    def __enter__(self) -> None:
        if _held.get(self.path) == os.getpid():
            return
        fd, _ = _lock_fd(self.path)
        try:
            fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, _TASK_BYTE)
            self.fd = fd
        except OSError:
            pass  # never block a worker on it

    def __exit__(self, *exc: object) -> None:
        if self.fd is not None:
            try:
                fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, _TASK_BYTE)
            except OSError:
                pass
            self.fd = None


#: journals this process runs on (path -> pid): POSIX locks cannot tell two runs of one
#: process apart, so this does
_held: dict[str, int] = {}


# -- the worker's side ----------------------------------------------------------------------


def _worker_conn(path: str, expect: tuple[int, int] | None = None) -> sqlite3.Connection:
    """Return this thread's connection to the journal at ``path``.

    ``expect``: the (device, inode) of the run's journal file; JournalError if the file
    was removed or replaced since the run began, so nothing is written to the wrong file.
    """
    conns: dict[tuple[int, str], tuple[sqlite3.Connection, tuple[int, int]]] | None = getattr(
        _local, "conns", None
    )
    if conns is None:
        conns = _local.conns = {}
    key = (os.getpid(), path)  # a forked worker must not reuse its parent's connection
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise JournalError(
            f"the journal {path} was removed during the run: stopped, since what the run "
            "computes could no longer be recorded"
        ) from None
    ident = (st.st_dev, st.st_ino)
    if expect is not None and expect != (0, 0) and ident != expect:
        raise JournalError(
            f"the journal {path} was replaced by another file during the run: stopped, "
            "since records would go to the old file"
        )
    got = conns.get(key)
    if got is not None and got[1] == ident:
        return got[0]
    if got is not None:  # the file was replaced since (a new journal at the same path)
        got[0].close()
    conn = _connect(path)
    conn.execute("PRAGMA synchronous = NORMAL")
    conns[key] = (conn, ident)
    return conn


def _close_thread_conns(path: str) -> None:
    conns = getattr(_local, "conns", None)
    if not conns:
        return
    got = conns.pop((os.getpid(), path), None)
    if got is not None:
        got[0].close()


def lookup(spec: JournalSpec, jkeys: Sequence[tuple[str, str]]) -> dict[int, dict[int, Any]]:
    """Return {stage index: {index in batch: recorded output}} for the step's records.

    Every record is authenticated before it is unpickled. Failed records are left out
    with ``retry_failed``.
    """
    if spec.sink:
        # a sink batch cut short by a crash: the items it did count as done
        fold_pending(spec.path, expect=spec.ident)
    conn = _worker_conn(spec.path, spec.ident)
    secret = user_secret()
    by_name = {name: (idx, fp) for idx, name, fp in spec.nodes}
    names = list(by_name)
    found: dict[tuple[str, str, str], tuple[str, int, bytes, bytes]] = {}
    items = sorted({item for item, _ in jkeys})
    nmarks = ",".join("?" * len(names))
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
    for name, (idx, fp) in by_name.items():
        hits: dict[int, Any] = {}
        for i, (item, sub) in enumerate(jkeys):
            hit = found.get((name, item, sub))
            if hit is None or hit[0] != fp or (spec.retry_failed and hit[1]):
                continue
            hits[i] = _load(spec.path, secret, name, item, sub, hit[0], hit[1], hit[2], hit[3])
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
    values: Sequence[Any],
    node: str | None = None,
    fp: str | None = None,
) -> None:
    """Commit one node's outputs for a batch, in one transaction (HMAC on every record)."""
    if node is None:
        _, node, fp = max(spec.nodes)
    assert fp is not None
    secret = user_secret()
    rows = []
    for (item, sub), value in zip(jkeys, values):
        blob = _blob(value)
        bad = int(type(value) is Failure)
        message = _failure_text(value) if bad else None
        mac = _mac(secret, node, item, sub, fp, bad, blob)
        rows.append((node, item, sub, fp, bad, message, blob, mac))
    if rows:
        _write(
            _worker_conn(spec.path, spec.ident),
            "INSERT OR REPLACE INTO outputs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
            spec.path,
        )


# -- a sink batch in progress ----------------------------------------------------------------

_PENDING = ".pending-"


class SinkLog:
    """The records of a sink batch in progress, one per item, as soon as the item is done.

    Each record goes to a private append-only file next to the journal with one
    ``write`` (a process that dies keeps what it wrote; the kernel has it), and the batch
    is committed to SQLite in one transaction at the end, after which the file is removed.
    If the process dies mid-batch, whoever runs the batch's items next (the pool's
    re-run, or the next run) first folds the file into the journal, so the items the
    sink already did are not done again. The format is plain length-prefixed fields,
    never a pickle, so reading a file is safe before its records are authenticated.
    """

    def __init__(self, spec: JournalSpec, node: str, fp: str) -> None:
        self.spec = spec
        self.node = node
        self.fp = fp
        self.secret = user_secret()
        self.rows: list[tuple[Any, ...]] = []
        self.fd: int | None = None
        self.file = (
            f"{spec.path}{_PENDING}{socket.gethostname()}-{os.getpid()}-{threading.get_ident()}"
        )

    def add(self, jkey: tuple[str, str], value: Any) -> None:
        """Write one item's record to the file at once."""
        item, sub = jkey
        blob = _blob(value)
        bad = int(type(value) is Failure)
        message = _failure_text(value) if bad else None
        mac = _mac(self.secret, self.node, item, sub, self.fp, bad, blob)
        row = (self.node, item, sub, self.fp, bad, message, blob, mac)
        self.rows.append(row)
        if self.fd is None:
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_NOFOLLOW
            self.fd = os.open(self.file, flags | os.O_CLOEXEC, _FILE_MODE)
        os.write(self.fd, _encode_row(row))

    def commit(self) -> None:
        """Commit the batch's records in one transaction; remove the file."""
        if self.rows:
            _write(
                _worker_conn(self.spec.path, self.spec.ident),
                "INSERT OR REPLACE INTO outputs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                self.rows,
                self.spec.path,
            )
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            os.unlink(self.file)


_ROW_HEAD = struct.Struct("!9I")  # total length, then the lengths of the 8 fields


def _encode_row(row: tuple[Any, ...]) -> bytes:
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


def _decode_rows(data: bytes) -> list[tuple[Any, ...]]:
    """Parse a pending file; a record cut short by a crash (the last) is dropped."""
    rows = []
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


def _alive(host: str, pid: int) -> bool:
    if host != socket.gethostname():
        return True  # cannot tell: leave it to a run that owns the journal
    if pid == os.getpid():
        return True  # another thread of this process, busy with its own batch
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fold_pending(path: str, everything: bool = False, expect: tuple[int, int] | None = None) -> int:
    """Commit the records of sink batches whose process died; return how many.

    ``everything``: also those of live-looking processes (only the run's owner, at start,
    when no other run can be writing). Files of other users are ignored.
    """
    folder, base = os.path.split(path)
    prefix = base + _PENDING
    try:
        names = [n for n in os.listdir(folder or ".") if n.startswith(prefix)]
    except OSError:
        return 0
    total = 0
    for name in names:
        parts = name[len(prefix) :].rsplit("-", 2)
        host, pid = parts[0], parts[1] if len(parts) == 3 else "0"
        if not everything and (not pid.isdigit() or _alive(host, int(pid))):
            continue
        full = os.path.join(folder, name)
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
        rows = _decode_rows(b"".join(chunks))
        if rows:
            _write(
                _worker_conn(path, expect),
                "INSERT OR REPLACE INTO outputs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
                path,
            )
            total += len(rows)
        try:
            os.unlink(full)
        except FileNotFoundError:
            pass
    return total


# -- reading a journal without running it (papy journal ...) -------------------------------


def _open_readonly(path: str) -> sqlite3.Connection:
    p = os.path.abspath(path)
    if not os.path.isfile(p):
        raise JournalError(f"no journal at {path}")
    try:
        conn = sqlite3.connect(f"file:{p}?mode=ro", uri=True)
        meta = dict(conn.execute("SELECT name, value FROM meta").fetchall())
    except sqlite3.Error as exc:
        raise _sqlite_error(p, exc) from None
    if meta.get("format") != _FORMAT:
        raise JournalError(f"{path} is an SQLite file but not a papy journal")
    if meta.get("version") != _VERSION:
        raise JournalError(f"{path} was written by another version of papy")
    return conn


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


def forget(path: str, node: str) -> list[str]:
    """Drop the records of ``node`` and of every node downstream of it; return their names.

    Takes the journal's run lock, so it fails (JournalError) while a run uses the journal.
    """
    p = str(Path(path).resolve())
    _open_readonly(p).close()
    _check_owner(p, os.stat(p))
    if _held.get(p) == os.getpid():
        raise JournalError(f"{path} is in use by a run of this process; forget after it ends")
    fd = _open_lock(p)
    try:
        _take_ownership(p, fd)
        conn = _connect(p)
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
        if _held.pop(p, None) is not None:
            os.ftruncate(fd, 0)
        os.close(fd)
    return drop
