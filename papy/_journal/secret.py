"""The per-user secret and the HMAC that authenticates every record of a journal.

A journal holds pickles, and unpickling runs code: a record is unpickled only after its
HMAC-SHA256, keyed by this user's secret (``$XDG_CONFIG_HOME/papy/secret``, 32 random
bytes, mode 0600), checks out. A journal written by someone else, or edited, is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle

from papy._errors import JournalError
from papy._items import Failure
from papy._journal.files import FILE_MODE


def config_dir() -> Path:
    """Return the user's PaPy configuration directory (``$XDG_CONFIG_HOME/papy``)."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "papy"


def user_secret() -> bytes:
    """Return this user's journal key, creating it once (32 random bytes, mode 0600).

    Read from the file on every call (a run reads it once, see :class:`Signer`). Raises
    JournalError when the file belongs to someone else or others can read it.
    """
    path = config_dir() / "secret"
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
            return data
        time.sleep(0.05)  # another process is writing it right now
    raise JournalError(f"the journal key {path} is empty or truncated: remove it")


def _create_secret(path: Path) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".secret-{os.getpid()}-{threading.get_ident()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, FILE_MODE)
        try:
            os.fchmod(fd, FILE_MODE)
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


def failure_text(f: Failure) -> str:
    """Return what ``papy journal failures`` shows of a Failure: origin node, tab, cause."""
    what = f" (input {f.input_repr})" if f.input_repr else ""
    return f"{f.node}\t{f.exc_type}: {f.message}{what}"


def _blob(value: Any) -> bytes:
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        return bytes(cloudpickle.dumps(value))


#: one journal row: node, item, sub-item, fingerprint, failed, message, pickle, HMAC
Row = tuple[str, str, str, str, int, "str | None", bytes, bytes]


class Signer:
    """Make and check the records of one journal with one user's key.

    The keyed HMAC state is computed once and copied per record.
    """

    def __init__(self, secret: bytes) -> None:
        self._base = hmac.new(secret, digestmod=hashlib.sha256)

    @classmethod
    def for_user(cls) -> Signer:
        """Return a Signer keyed by this user's secret (see :func:`user_secret`)."""
        return cls(user_secret())

    def mac(self, node: str, item: str, sub: str, fp: str, failed: int, blob: bytes) -> bytes:
        """Return a record's HMAC-SHA256: over its node, identity, fingerprint and pickle."""
        h = self._base.copy()
        h.update(f"{node}\0{item}\0{sub}\0{fp}\0{failed}\0".encode())
        h.update(blob)
        return h.digest()

    def rows(
        self,
        node: str,
        fp: str,
        jkeys: Any,
        values: Any,
        fail: Callable[[int, Exception], Failure] | None = None,
    ) -> list[Row]:
        """Return the signed rows of one node's outputs ``values`` for items ``jkeys``.

        ``jkeys`` are (item, sub-item) pairs. Each value is pickled once; a Failure also
        keeps its text (for ``papy journal failures``, which never unpickles). A value
        that cannot be pickled is replaced, in ``values`` (a list), by ``fail(index,
        error)`` and recorded as that Failure; without ``fail`` the error is raised.
        """
        base = self._base
        dumps = pickle.dumps
        proto = pickle.HIGHEST_PROTOCOL
        head = f"{node}\0"
        tail = f"\0{fp}\0"
        out: list[Row] = []
        for (item, sub), value in zip(jkeys, values):
            if type(value) is Failure:
                bad = 1
                message: str | None = failure_text(value)
                blob = _blob(value)
            else:
                bad = 0
                message = None
                try:
                    blob = dumps(value, protocol=proto)
                except Exception:
                    try:
                        blob = _blob(value)
                    except Exception as exc:
                        if fail is None:
                            raise
                        i = len(out)
                        value = values[i] = fail(i, exc)
                        bad, message, blob = 1, failure_text(value), _blob(value)
            h = base.copy()
            h.update(f"{head}{item}\0{sub}{tail}{bad}\0".encode())
            h.update(blob)
            out.append((node, item, sub, fp, bad, message, blob, h.digest()))
        return out

    def load(
        self,
        path: str,
        node: str,
        item: str,
        sub: str,
        fp: str,
        failed: int,
        blob: bytes,
        mac: bytes,
    ) -> Any:
        """Unpickle a record, after checking its HMAC (a forged record never reaches pickle).

        Raises JournalError when the record fails authentication.
        """
        if not hmac.compare_digest(mac, self.mac(node, item, sub, fp, failed, blob)):
            raise JournalError(
                f"{path}: the record of node {node!r} for item {item!r} fails authentication: "
                "the journal was written with another user's key or modified since; it is not "
                "loaded (a journal holds pickles, which can run code). Use a new journal"
            )
        return pickle.loads(blob)
