"""Digests: the identity of input items (content) and of code (node fingerprints).

**Item identity.** Without ``key=`` an input item is known by a digest of its value (a
canonical encoding: containers element by element, dicts and sets in a fixed order, other
objects by their pickle) plus its occurrence count among equal items of the run.

**Code identity.** A node's fingerprint covers its functions' code (bytecode, constants,
names of the globals they read), defaults, closure values, ``args``, ``kwargs``, its role
(scatter, gather, batched, join), its parents and their fingerprints. So a changed node and
everything downstream of it no longer match their records.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cloudpickle

from papy._errors import JournalError
from papy._graph import topological_order
from papy._node import Node

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


class ItemIds:
    """The journal identities of a run's input items, given in input order.

    Without ``key=``: ``c:<content digest>:<occurrences of equal items before it>``; with
    it: ``k:<the key as JSON>``, which must be unique (JournalError otherwise).
    """

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}
        self.keys: set[str] = set()

    def identify(self, values: Sequence[Any], key: Callable[[Any], Any] | None) -> list[str]:
        """Return the journal identity of each input item, in order.

        Raises JournalError when ``key`` gives two input items the same key.
        """
        out = []
        if key is None:
            seen = self.seen
            for v in values:
                d = content_digest(v)
                n = seen.get(d, 0)
                seen[d] = n + 1
                out.append(f"c:{d}:{n}")
            return out
        keys = self.keys
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
REASONS = {
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


def node_prints(nodes: Sequence[Node]) -> dict[str, NodePrint]:
    """Return every node's fingerprint; a node's covers its ancestors' (see module doc).

    ``nodes``: every node of the pipeline, in any order.
    """
    out: dict[str, NodePrint] = {}
    for n in topological_order(nodes):
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


def fingerprint(nodes: Sequence[Node]) -> str:
    """Return one digest of a whole pipeline (all its ``nodes``): every node's fingerprint."""
    prints = node_prints(nodes)
    return _digest(sorted((k, v.fingerprint) for k, v in prints.items())).hex()
