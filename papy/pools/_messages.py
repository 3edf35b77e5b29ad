"""The messages between the driver and a ProcessPool worker: framing and pickling.

A message is a small header (ids, keys, and where its out-of-band buffers are) followed
by a pickled body (:func:`frame`). Items and results use pickle protocol 5, falling back
to cloudpickle for lambdas and ``__main__`` objects. With an :class:`~papy.pools._shm.Outgoing`
buffer callback, large buffers (arrays, ``bytes``, ``bytearray``, ``memoryview``) leave the
body for shared memory; :func:`loads` rebuilds them over the mapped segments.
"""

from __future__ import annotations

import io
import pickle
import struct
from collections.abc import Callable, Sequence
from typing import Any

from papy._items import NO_INPUT, Failure, failure_from_exception, qualified_type
from papy._task import StepSpec, TaskResult
from papy.pools._base import Task
from papy.pools._functions import dumps_code, reduce_view
from papy.pools._shm import Outgoing


def _bytes_from(buffer: Any) -> bytes:
    """Rebuild a large ``bytes`` value from its out-of-band buffer (one copy)."""
    return bytes(buffer)


class _OutOfBandPickler(pickle._Pickler):  # type: ignore[name-defined,misc]
    """pickle's Python pickler, with large ``bytes``, ``bytearray`` and ``memoryview`` values
    out of band too.

    The C pickler writes ``bytes`` and ``bytearray`` into the message whatever their size
    (it never asks ``reducer_override`` about them) and cannot send a ``memoryview`` at
    all; this one can. It is slower per object, so it is used only for messages that hold
    such a value (see :func:`dumps`).
    """

    def __init__(self, file: io.BytesIO, out: Outgoing) -> None:
        super().__init__(file, protocol=5, buffer_callback=out)
        self.threshold = out.threshold

    def reducer_override(self, obj: Any) -> Any:
        kind = type(obj)
        if kind is bytes and len(obj) >= self.threshold:
            return _bytes_from, (pickle.PickleBuffer(obj),)
        if kind is bytearray and len(obj) >= self.threshold:
            return bytearray, (pickle.PickleBuffer(obj),)
        if kind is memoryview:
            return reduce_view(obj)
        return NotImplemented


def _holds_big_bytes(obj: Any, threshold: int, depth: int = 4) -> bool:
    """Tell whether ``obj`` holds ``bytes`` or ``bytearray`` of ``threshold`` bytes or more
    (looking into lists, tuples, sets, dicts and task results, ``depth`` levels deep)."""
    kind = type(obj)
    if kind is bytes or kind is bytearray:
        return len(obj) >= threshold
    if depth <= 0:
        return False
    if kind is list or kind is tuple or kind is set or kind is frozenset:
        return any(_holds_big_bytes(v, threshold, depth - 1) for v in obj)
    if kind is dict:
        return any(_holds_big_bytes(v, threshold, depth - 1) for v in obj.values())
    if kind is TaskResult:
        return _holds_big_bytes(obj.values, threshold, depth)
    return False


def _attempt(pickler: Any, obj: Any, out: Outgoing) -> bytes | None:
    """Pickle ``obj`` with ``pickler``; None (and no segment left) if it cannot."""
    try:
        buf = io.BytesIO()
        pickler(buf, out).dump(obj)
        return buf.getvalue()
    except Exception:
        out.reset()
        return None


def _c_pickler(file: io.BytesIO, out: Outgoing) -> pickle.Pickler:
    return pickle.Pickler(file, protocol=5, buffer_callback=out)


def dumps(obj: Any, out: Outgoing | None = None) -> bytes:
    """Pickle ``obj`` fast; fall back to cloudpickle for lambdas and ``__main__`` objects.

    With ``out``, buffers of ``out.threshold`` bytes or more go to shared memory (see
    :class:`~papy.pools._shm.Outgoing`); the caller sends ``out.fds`` beside the message
    and then calls ``out.close()``. A failed attempt leaves no segment behind.
    """
    if out is None:
        try:
            return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:
            return dumps_code(obj)
    body = _attempt(_c_pickler, obj, out)  # arrays leave the message here already
    if body is not None and (len(body) < out.threshold or not _holds_big_bytes(obj, out.threshold)):
        return body
    out.reset()  # large bytes, or something the C pickler refused (a memoryview?)
    body = _attempt(_OutOfBandPickler, obj, out) or _attempt(_c_pickler, obj, out)
    if body is not None:
        return body
    try:
        return dumps_code(obj, buffer_callback=out)
    except BaseException:
        out.reset()
        raise


def loads(body: Any, buffers: Sequence[Any] = ()) -> Any:
    """Unpickle a message body, its out-of-band buffers given in order."""
    return pickle.loads(body, buffers=buffers)


def unpicklable(value: Any) -> Exception | None:
    """Return why ``value`` cannot be pickled, or None when it can."""
    try:
        dumps(value)
    except Exception as exc:
        return exc
    return None


def fail_unpicklable(
    node: str,
    keys: Any,
    values: list[Any],
    why: Callable[[Any, Exception], str],
    check: Callable[[Any], Exception | None] = unpicklable,
    inputs: bool = True,
) -> list[Any]:
    """Return ``values`` with the ones that cannot be pickled replaced by Failures.

    Used on both sides of a process boundary (items going out, results coming back), so
    only the offending items fail and the message names their type. ``check`` says why a
    value cannot travel (default: this module's pickler; the Dask pool passes cloudpickle).
    ``inputs`` tells whether the values are the node's inputs (items going out) or its
    outputs (results, whose Failures then have no ``input_repr``).
    """
    out = []
    for key, value in zip(keys, values):
        exc = None if type(value) is Failure else check(value)
        if exc is None:
            out.append(value)
        else:
            given = value if inputs else NO_INPUT
            out.append(failure_from_exception(node, key, TypeError(why(value, exc)), given))
    return out


def encode_items(task: Task, out: Outgoing | None) -> bytes:
    """Pickle a task's items for a worker; items that cannot travel become Failures.

    The task then holds those Failures (and is marked dirty), so a crash that sends the
    task again sends the same thing.
    """
    try:
        return dumps(task.values, out)
    except Exception:
        pass
    values = fail_unpicklable(
        task.first_stage(),
        task.keys,
        task.values,
        lambda value, exc: (
            f"the item of type {qualified_type(value)} cannot be sent to a worker "
            f"process ({qualified_type(exc)}: {exc}); use a ThreadPool for this node"
        ),
    )
    task.values = values
    task.dirty = True  # the worker must skip the items that could not travel
    return dumps(values, out)


def encode_each(task: Task) -> bytes:
    """Pickle a task's items one by one: a list of pickles, all in the message.

    For a task that killed a worker once: its worker rebuilds the items one at a time,
    each announced in its slot, so a crash while rebuilding one names that item instead
    of sending the driver into a halving search (see :func:`rebuild_each`).
    """
    try:
        return dumps([dumps(value) for value in task.values])
    except Exception:
        encode_items(task, None)  # items that cannot travel become Failures, on the task
        return dumps([dumps(value) for value in task.values])


def rebuild_each(body: Any, announce: Callable[[int], None]) -> list[Any]:
    """Rebuild the items of a message made by :func:`encode_each`, calling
    ``announce(i)`` before item ``i``."""
    values = []
    for i, blob in enumerate(loads(body)):
        announce(i)
        values.append(loads(blob))
    return values


def encode_result(result: TaskResult, spec: StepSpec, keys: Any, out: Outgoing | None) -> bytes:
    """Pickle a task's result; values that cannot travel become Failures naming their type."""
    try:
        return dumps(result, out)
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
        inputs=False,
    )
    result.dirty = True  # the driver must see (and count) the Failures made here
    for st in result.stats:
        st.keep_firsts(lambda f: unpicklable(f) is None)
    return dumps(result, out)


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
