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

import pickle
import traceback
from dataclasses import dataclass, field
from typing import Any, TypeAlias

Key: TypeAlias = int | tuple[int, ...]

_REPR_LIMIT = 200


def position(key: Key) -> int:
    """Return the input position an item key descends from."""
    return key if isinstance(key, int) else key[0]


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
    """Return the type name of ``obj`` (an exception or any value), module-qualified."""
    cls = type(obj)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"


def failure_from_exception(
    node: str, key: Key, exc: BaseException, value: Any = None, attempts: int = 1
) -> Failure:
    """Build a Failure from an exception caught while running ``node`` on item ``key``."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return Failure(
        node=node,
        item=key,
        exc_type=qualified_type(exc),
        message=str(exc),
        traceback=tb,
        input_repr=short_repr(value),
        exception=exc,
        attempts=attempts,
    )
