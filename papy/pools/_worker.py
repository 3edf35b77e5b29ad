"""The main loop of a ProcessPool worker process.

Messages are pickled tuples on a private pipe, one per task, so the driver always knows
which task each worker holds: that is what lets the pool re-run exactly the batch a dead
worker lost and pin down an item that kills its worker every time. (This is why the engine
keeps its own small process pool instead of ``multiprocessing.Pool``, which hangs when a
worker dies, or ``ProcessPoolExecutor``, which breaks the whole pool.)
"""

from __future__ import annotations

import ctypes
import os
import pickle
import signal
import struct
import sys
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from papy._items import Failure, failure_from_exception, qualified_type
from papy._task import StepSpec, TaskResult, critical, run_task


def dumps(obj: Any) -> bytes:
    """Pickle ``obj`` fast; fall back to cloudpickle for lambdas and ``__main__`` objects."""
    try:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        import cloudpickle

        return cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def unpicklable(value: Any) -> Exception | None:
    """Return why ``value`` cannot be pickled, or None when it can."""
    try:
        dumps(value)
    except Exception as exc:
        return exc
    return None


def _on_sigterm(signum: int, frame: Any) -> None:
    """Exit now, unless a journaled task is committing: then right after it (30 s at most)."""
    if critical.depth:
        type(critical).deferred = True
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(30)
        return
    os._exit(128 + signum)


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this worker when the driver dies, so no worker is orphaned."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except Exception:  # pragma: no cover - best effort; the driver also terminates workers
        pass


def fail_unpicklable(
    node: str, keys: Any, values: list[Any], why: Callable[[Any, Exception], str]
) -> list[Any]:
    """Return ``values`` with the ones that cannot be pickled replaced by Failures.

    Used on both sides of a process boundary (items going out, results coming back), so
    only the offending items fail and the message names their type.
    """
    out = []
    for key, value in zip(keys, values):
        exc = None if type(value) is Failure else unpicklable(value)
        if exc is None:
            out.append(value)
        else:
            out.append(failure_from_exception(node, key, TypeError(why(value, exc)), value))
    return out


def _encode_result(result: TaskResult, spec: StepSpec, keys: Any) -> bytes:
    try:
        return dumps(result)
    except Exception:
        pass
    result.values = fail_unpicklable(
        spec.stages[-1].name,
        keys,
        result.values,
        lambda value, exc: (
            f"the result of type {qualified_type(value)} cannot be sent back from the worker "
            f"process ({qualified_type(exc)}: {exc}); return plain data, or use a ThreadPool"
        ),
    )
    for st in result.stats:
        if st.first_failure is not None and unpicklable(st.first_failure) is not None:
            st.first_failure = None
    return dumps(result)


def frame(header: Any, body: bytes) -> bytes:
    """Join a small header and a pickled body into one message.

    The header (ids and keys) always unpickles, so a body that cannot be rebuilt on the
    other side still tells which task and which items it was about.
    """
    head = pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL)
    return struct.pack("!I", len(head)) + head + body


def unframe(data: bytes) -> tuple[Any, memoryview]:
    """Split a message made by :func:`frame` into its header and its body."""
    (n,) = struct.unpack_from("!I", data)
    view = memoryview(data)
    return pickle.loads(view[4 : 4 + n]), view[4 + n :]


def worker_main(conn: Connection, initializer: Any = None) -> None:
    """Receive tasks, run them, send results back, until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    signal.signal(signal.SIGTERM, _on_sigterm)
    _die_with_parent()
    if initializer is not None:
        initializer()
    specs: dict[str, StepSpec] = {}
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        (job_id, spec_id, spec_blob, keys, jkeys, dirty), body = unframe(data)
        if spec_blob is not None:
            specs[spec_id] = pickle.loads(spec_blob)
        spec = specs[spec_id]
        try:
            values = pickle.loads(body)
        except Exception as exc:
            err = TypeError(
                f"the item could not be rebuilt in the worker process ({qualified_type(exc)}: "
                f"{exc}); is its type importable there?"
            )
            name = spec.stages[0].name
            result = TaskResult([failure_from_exception(name, k, err) for k in keys], [])
        else:
            result = run_task(spec, keys, values, jkeys, dirty)
        payload = _encode_result(result, spec, keys)
        try:
            conn.send_bytes(frame(job_id, payload))
        except (BrokenPipeError, OSError):
            return
