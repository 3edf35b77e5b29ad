"""Item identities and failures.

Every item in a run has a *key*: its input position (an ``int``) at the top level, extended
by one sub-index per scatter level (``(position, i, j, ...)``). Routing, joins, gathers and
output order all go by key, never by stream position, so results cannot depend on batch
size, buffer, pool kind or worker count.

A :class:`Failure` stands in for the value of an item that failed. It travels downstream
like a value: nodes skip it (their function is not called), joins and gathers that meet it
produce it, and the sink reports it. That keeps batches intact and per-item bookkeeping
out of the hot path.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import linecache
import pickle
import re
import traceback
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

Key: TypeAlias = int | tuple[int, ...]

_REPR_LIMIT = 200


class ItemState(enum.Enum):
    """The states an input item and its sub-items pass through in a run, in order.

    The scheduler counts items per state (``Scheduler.counts()``); an item can be in
    several at once only as sub-items of a scatter or copies on parallel branches.
    """

    #: taken from the input by the reader thread, not yet admitted (counts against the buffer)
    READ = "read"
    #: in a step's queue, waiting for a worker of the step's pool
    WAITING = "waiting"
    #: inside a task a pool is running (or has queued)
    RUNNING = "running"
    #: in a join or gather table, waiting for its other parents or sub-items
    HELD = "held"
    #: reached every terminal; in the reorder buffer until its turn to be yielded
    FINISHED = "finished"
    #: left the run (yielded, drained by the sinks, or replayed from the journal): its
    #: buffer slot is free
    RETIRED = "retired"


def position(key: Key) -> int:
    """Return the input position an item key descends from."""
    return key if isinstance(key, int) else key[0]


def at_position(value: Any, p: int) -> Any:
    """Return ``value``, or a Failure moved to input position ``p`` if it names another.

    A journal record is known by the item's identity, not its position: a Failure recorded
    when the item was at position 5 names item 5 (or ``(5, i)`` below a scatter); replayed
    in a run where the item is at position 2, it must name 2 (``(2, i)``), not the item
    that now sits at 5.
    """
    if type(value) is not Failure or position(value.item) == p:
        return value
    item = value.item
    return dataclasses.replace(value, item=p if isinstance(item, int) else (p, *item[1:]))


def child_key(key: Key, index: int) -> tuple[int, ...]:
    """Return the key of the ``index``-th sub-item scattered from ``key``."""
    return (key, index) if isinstance(key, int) else (*key, index)


def parent_key(key: Key) -> Key:
    """Return the key a sub-item was scattered from (one level up)."""
    assert isinstance(key, tuple)
    return key[0] if len(key) == 2 else key[:-1]


def short_repr(value: Any) -> str:
    """Return ``repr(value)`` cut to a readable length; never raises."""
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__ must not hide the real failure
        text = f"<{type(value).__name__} (repr failed: {exc!r})>"
    return text if len(text) <= _REPR_LIMIT else text[: _REPR_LIMIT - 3] + "..."


@dataclass(frozen=True)
class Failure:
    """Describe an item that failed: where, which item, and why.

    ``exception`` is the original exception object when it could be carried back from the
    worker (same type and message); ``exc_type``, ``message`` and ``traceback`` are always
    set, as text, so a Failure prints well even when the exception itself could not travel.
    ``input_repr`` is ``repr()`` of the item's input to ``node`` (at most 200 characters),
    taken when the node failed (a node that changed its input in place shows the changed
    value: taking it before every call would cost every item a ``repr``), or empty when
    that input was never seen by whoever made the Failure: a worker that
    died or overran its timeout in a node after the first of a task that ran several, a
    result that could not be sent back, a pool that returned the wrong number of results.
    """

    node: str
    item: Key
    exc_type: str
    message: str
    traceback: str = ""
    input_repr: str = ""
    exception: BaseException | None = field(default=None, compare=False, repr=False)
    attempts: int = 1

    @property
    def position(self) -> int:
        """Return the input position of the failed item."""
        return position(self.item)

    def describe(self) -> str:
        """Return a one-line description naming the node, the item and the cause."""
        what = f" (input {self.input_repr})" if self.input_repr else ""
        return (
            f"node {self.node!r} failed on item {self.item!r}{what}: "
            f"{self.exc_type}: {self.message}"
        )

    def __str__(self) -> str:
        return self.describe()

    def to_dict(self) -> dict[str, Any]:
        """Return the failure as plain data (JSON-ready; the exception object is left out)."""
        return {
            "node": self.node,
            "item": list(self.item) if isinstance(self.item, tuple) else self.item,
            "position": self.position,
            "input_repr": self.input_repr,
            "exc_type": self.exc_type,
            "message": self.message,
            "traceback": self.traceback,
            "attempts": self.attempts,
        }

    def __reduce__(self) -> tuple[Any, ...]:
        # The exception may not pickle (custom __init__, unpicklable attributes): keep the
        # text either way so the Failure itself always crosses process boundaries.
        exc: Any = self.exception
        if exc is not None:
            exc = _travelling(exc)
        return (
            Failure,
            (
                self.node,
                self.item,
                self.exc_type,
                self.message,
                self.traceback,
                self.input_repr,
                exc,
                self.attempts,
            ),
        )


class _ExceptionState:
    """Carry an exception whose class cannot be rebuilt by calling it with ``args``.

    Pickle rebuilds an exception as ``cls(*exc.args)``, which fails for a class whose
    ``__init__`` takes other arguments than its message. This rebuilds it the way an
    instance is restored: without calling ``__init__``, then setting its ``args`` and
    attributes, so ``except MyError`` and ``err.field`` work on the driver's side.
    """

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __reduce__(self) -> tuple[Any, ...]:
        exc = self.exc
        return (_rebuild_exception, (type(exc), exc.args, dict(getattr(exc, "__dict__", {}))))


def _rebuild_exception(
    cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]
) -> BaseException:
    exc = cls.__new__(cls, *args)
    exc.args = args
    if state:
        exc.__dict__.update(state)
    return exc


def _travelling(exc: BaseException) -> Any:
    """Return what to pickle for ``exc``: itself, its state, or None if neither travels."""
    for candidate in (exc, _ExceptionState(exc)):
        try:
            pickle.loads(pickle.dumps(candidate))
        except Exception:
            continue
        return candidate
    return None


def qualified_type(obj: object) -> str:
    """Return the type name of ``obj`` (an exception or any value), module-qualified.

    A class of the driver's script is ``__main__.Name`` in every process: a process worker
    imported that script as ``__mp_main__``, and the same failure must not be counted
    under two names depending on the pool.
    """
    cls = type(obj)
    module = cls.__module__
    if module == "builtins":
        return cls.__qualname__
    if module == "__mp_main__":
        module = "__main__"
    return f"{module}.{cls.__qualname__}"


class _NoInput:
    """The input of a failed item where it is not known (see ``Failure.input_repr``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NO_INPUT"

    def __reduce__(self) -> str:
        return "NO_INPUT"  # one object in every process


NO_INPUT: Any = _NoInput()


def _message(exc: BaseException) -> str:
    """Return ``str(exc)``; never raises (an exception's own ``__str__`` may)."""
    try:
        return str(exc)
    except Exception as broken:
        return f"<unprintable {type(exc).__name__} (str failed: {broken!r})>"


def failure_from_exception(
    node: str, key: Key, exc: BaseException, value: Any = NO_INPUT, attempts: int = 1
) -> Failure:
    """Build a Failure from an exception caught while running ``node`` on item ``key``;
    ``value`` is the item's input to ``node``, if known (:data:`NO_INPUT` if not)."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return Failure(
        node=node,
        item=key,
        exc_type=qualified_type(exc),
        message=_message(exc),
        traceback=tb,
        input_repr="" if value is NO_INPUT else short_repr(value),
        exception=exc,
        attempts=attempts,
    )


_DYNAMIC_FRAME = re.compile(r'^( *)File "<dynamic-code>", line (\d+), in (.+)$', re.MULTILINE)


class FrameResolver:
    """Put file names back into tracebacks of functions that were shipped by value.

    cloudpickle sends functions the workers cannot import (a script's, a notebook cell's)
    by value and names their file ``<dynamic-code>``. The driver still has the functions:
    this maps ``(function name, line)`` back to the file and source line, so a traceback
    points at the user's line. Built from the node functions and their modules' globals.
    """

    def __init__(self, fns: Iterable[Any]) -> None:
        self._codes: dict[str, list[tuple[int, int, str]]] = {}
        seen: set[int] = set()
        for fn in fns:
            for f in self._functions(fn):
                self._add_function(f, seen)
                for v in list(getattr(f, "__globals__", {}).values()):
                    if isinstance(v, types.FunctionType):
                        self._add_function(v, seen)

    @staticmethod
    def _functions(fn: Any) -> list[Any]:
        while isinstance(fn, functools.partial):
            fn = fn.func
        inner = getattr(fn, "fns", None)  # a node's composed Call
        if isinstance(inner, list):
            return [g for f in inner for g in FrameResolver._functions(f)]
        fn = getattr(fn, "__func__", fn)  # bound methods
        return [fn] if isinstance(fn, types.FunctionType) else []

    def _add_function(self, fn: types.FunctionType, seen: set[int]) -> None:
        stack = [fn.__code__]
        while stack:
            code = stack.pop()
            if id(code) in seen:
                continue
            seen.add(id(code))
            lines = [line for _, _, line in code.co_lines() if line is not None]
            last = max(lines, default=code.co_firstlineno)
            self._codes.setdefault(code.co_name, []).append(
                (code.co_firstlineno, last, code.co_filename)
            )
            stack.extend(c for c in code.co_consts if isinstance(c, types.CodeType))

    def fix(self, tb: str) -> str:
        """Return ``tb`` with ``<dynamic-code>`` frames named by file, with their source."""
        if "<dynamic-code>" not in tb or not self._codes:
            return tb

        def frame(m: re.Match[str]) -> str:
            indent, line, name = m.group(1), int(m.group(2)), m.group(3)
            for first, last, filename in self._codes.get(name, ()):
                if first <= line <= last and not filename.startswith("<"):
                    text = linecache.getline(filename, line).strip()
                    source = f"\n{indent}  {text}" if text else ""
                    return f'{indent}File "{filename}", line {line}, in {name}{source}'
            return m.group(0)

        return _DYNAMIC_FRAME.sub(frame, tb)

    def fix_failure(self, failure: Failure) -> Failure:
        """Return ``failure`` with its traceback fixed (the same object if nothing changed)."""
        tb = self.fix(failure.traceback)
        return failure if tb is failure.traceback else dataclasses.replace(failure, traceback=tb)
