"""Digests: the identity of input items (content) and of code (node fingerprints).

**Item identity.** Without ``key=`` an input item is known by a digest of its value (a
canonical encoding: containers element by element, dicts in their order, sets in a fixed
order, other objects by their pickle) plus its occurrence count among equal items of the
run. An item whose value cannot be encoded (an object that cannot be pickled: a lock, a
socket, an open file) has no identity that a later run could find again: it gets one of
its own, so it runs every time and is never given another item's records.

**Code identity.** A node's fingerprint covers its functions' code (bytecode, constants,
names of the globals they read), defaults, closure values, ``args``, ``kwargs``, its role
(scatter, gather, batched, join), its parents and their fingerprints. So a changed node and
everything downstream of it no longer match their records.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import json
import logging
import os
import pickle
import struct
import sys
import types
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import cloudpickle

from papy._errors import JournalError
from papy._graph import topological_order
from papy._node import Node
from papy._pickling import in_library

log = logging.getLogger("papy")

# -- identity of items ------------------------------------------------------------------------


class Unidentifiable(Exception):
    """An input item holds a value that cannot be encoded (see the module docstring)."""


def _feed(h: Any, v: Any, depth: int = 0, strict: bool = False) -> None:
    """Feed a canonical encoding of ``v`` to the hash ``h``.

    Equal plain values (numbers, text, bytes, and lists, tuples, dicts and sets of them)
    give equal encodings whatever their identity; a dict's order is part of it (a node may
    see it: ``json.dumps``, ``list(d)``), a set's is not. Other objects are encoded by
    their pickle (cloudpickle for functions), which is stable for equal state. An object
    that cannot be pickled is known by its type, or raises Unidentifiable if ``strict``
    (an input item's identity; code identity takes the type).
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
            _feed(h, x, depth + 1, strict)
    elif depth < 64 and t is dict:
        h.update(b"D%d:" % len(v))
        for k, x in v.items():
            _feed(h, k, depth + 1, strict)
            _feed(h, x, depth + 1, strict)
    elif depth < 64 and (t is set or t is frozenset):
        h.update(b"S%d:" % len(v) + b"".join(sorted(_digest(x, depth + 1, strict) for x in v)))
    elif isinstance(v, (types.FunctionType, types.MethodType, types.BuiltinFunctionType)):
        h.update(b"c" + _callable_digest(v, depth + 1, strict).encode())
    elif isinstance(v, type):
        h.update(b"y" + _class_code(v, depth).encode())
    elif isinstance(v, types.ModuleType):
        h.update(b"m" + v.__name__.encode())
    else:
        blob = _pickle_or_none(v)
        if blob is None and strict:
            raise Unidentifiable(f"{t.__module__}.{t.__qualname__}")
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


def _digest(v: Any, depth: int = 0, strict: bool = False) -> bytes:
    h = hashlib.blake2b(digest_size=20)
    _feed(h, v, depth, strict)
    return h.digest()


def content_digest(value: Any) -> str:
    """Return a stable hex digest of an input item's value (its identity without ``key=``).

    Raises Unidentifiable when the value holds an object that cannot be pickled.
    """
    return _digest(value, strict=True).hex()


class ItemIds:
    """The journal identities of a run's input items, given in input order.

    Without ``key=``: ``c:<content digest>:<occurrences of equal items before it>``; with
    it: ``k:<the key as JSON>``, which must be unique (JournalError otherwise).
    """

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}
        self.keys: set[str] = set()
        self.unidentified = 0  # items given an identity of their own (see _own)

    def _own(self, value: Any, exc: Unidentifiable) -> str:
        """Return an identity no other item, in this run or another, has."""
        self.unidentified += 1
        if self.unidentified == 1:
            log.warning(
                "journal: input item %.80r holds a %s, which cannot be pickled, so the journal "
                "cannot know it again: such items run every time; give key= to resume them",
                value,
                exc,
            )
        return f"u:{uuid.uuid4().hex}"

    def identify(self, values: Sequence[Any], key: Callable[[Any], Any] | None) -> list[str]:
        """Return the journal identity of each input item, in order.

        Raises JournalError when ``key`` gives two input items the same key.
        """
        out = []
        if key is None:
            seen = self.seen
            for v in values:
                try:
                    d = content_digest(v)
                except Unidentifiable as exc:
                    out.append(self._own(v, exc))
                    continue
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


def _fn_parts(f: Any, depth: int = 0, strict: bool = False) -> dict[str, str]:
    """Split a callable's identity into code, defaults and closure digests.

    A callable object counts as the code of every function its class and its bases
    define (``__call__`` and the methods it may call) and its state (``__dict__`` and
    ``__slots__``); a built-in method (``items.append``) as its name and its object.
    ``strict``: see :func:`_feed`.
    """
    if depth > 8:
        return {"code": "deep", "defaults": "", "closure": ""}
    if isinstance(f, types.MethodType):
        parts = _fn_parts(f.__func__, depth + 1, strict)
        parts["closure"] = _digest([parts["closure"], f.__self__], depth + 1, strict).hex()
        return parts
    if isinstance(f, types.FunctionType):
        closure = [c.cell_contents for c in (f.__closure__ or ()) if _cell_filled(c)]
        return {
            "code": _code_digest(f.__code__, depth),
            "defaults": _digest([f.__defaults__, f.__kwdefaults__], depth + 1, strict).hex(),
            "closure": _digest(closure, depth + 1, strict).hex(),
        }
    func = getattr(f, "func", None)  # functools.partial
    if func is not None and callable(func) and hasattr(f, "keywords"):
        parts = _fn_parts(func, depth + 1, strict)
        parts["closure"] = _digest(
            [parts["closure"], getattr(f, "args", ()), f.keywords], depth + 1, strict
        ).hex()
        return parts
    if isinstance(f, type):  # a class called as a node: the code it runs
        return {"code": _class_code(f, depth), "defaults": "", "closure": ""}
    if isinstance(f, types.BuiltinFunctionType):
        name = f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', repr(f))}"
        owner = getattr(f, "__self__", None)  # a built-in method's object (not a module's)
        bound = owner is not None and not isinstance(owner, (types.ModuleType, type))
        held = _digest(owner, depth + 1, strict).hex() if bound else ""
        return {"code": name, "defaults": "", "closure": held}
    cls = type(f)  # a callable object: its class's code + state
    slots = {
        name: getattr(f, name)
        for base in cls.__mro__
        for name in _slot_names(base)
        if hasattr(f, name)
    }
    state = [getattr(f, "__dict__", None), slots]
    return {
        "code": _class_code(cls, depth),
        "defaults": "",
        "closure": _digest(state, depth + 1, strict).hex(),
    }


#: the types of global values a function's identity includes: constants (a module-level
#: list, dict or array may be changed in place at any time; it is left out)
_CONSTANT_TYPES = (int, float, complex, str, bytes, bool, type(None))
#: at most this many functions and classes followed from one node's functions
_MAX_USES = 500


def _is_constant(v: Any) -> bool:
    if isinstance(v, _CONSTANT_TYPES):
        return True
    return isinstance(v, (tuple, frozenset)) and len(v) <= 1_000 and all(map(_is_constant, v))


def _user_code(obj: Any) -> bool:
    """Tell whether a function, class or module is the user's own code: not built in, and
    defined in ``__main__``, a notebook, an ``exec`` or a file outside the standard library
    and site-packages (see :func:`papy._pickling.in_library`)."""
    if isinstance(obj, types.FunctionType):
        path = obj.__code__.co_filename
    elif isinstance(obj, types.ModuleType):
        path = getattr(obj, "__file__", None) or ""
        if not path:
            return obj.__name__ == "__main__"
    elif isinstance(obj, type):
        module = sys.modules.get(obj.__module__)
        if obj.__module__ == "builtins" or module is None:
            return False
        return _user_code(module)
    else:
        return False
    if path.startswith("<frozen") or path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
        return False  # the standard library's frozen modules; compiled code
    return not (os.path.isabs(path) and in_library(path))


def _global_names(code: types.CodeType) -> set[str]:
    """Return the names ``code`` and the code nested in it read (globals and attributes)."""
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _global_names(c)
    return names


def _uses_digest(fns: Sequence[Any]) -> str:
    """Digest what the functions ``fns`` use from their modules: the code, defaults and
    closures of the user's own functions and classes they name (followed through the
    functions those name in turn, at most ``_MAX_USES``), the same of the user's own
    modules' functions and classes they name as ``module.name``, and the value of every
    global constant (``_CONSTANT_TYPES``, and tuples of them) they read."""
    entries: list[Any] = []
    seen: set[int] = {id(f) for f in fns}
    todo = list(fns)
    while todo and len(seen) < _MAX_USES:
        f = todo.pop()
        names = _global_names(f.__code__)
        scope = f.__globals__
        cells = [c for c in (f.__closure__ or ()) if _cell_filled(c)]
        held = [(f"<cell {i}>", c.cell_contents) for i, c in enumerate(cells)]
        for name, value in [(n, scope[n]) for n in sorted(names) if n in scope] + held:
            found = [(name, value)]
            if isinstance(value, types.ModuleType) and _user_code(value):
                found = [
                    (f"{name}.{attr}", getattr(value, attr))
                    for attr in sorted(names)
                    if attr in vars(value)
                ]
            for label, v in found:
                v = _unwrapped(v)
                if _is_constant(v):
                    entries.append((label, _digest(v).hex()))
                elif isinstance(v, (types.FunctionType, type)) and _user_code(v):
                    if id(v) in seen:
                        entries.append((label, "seen"))
                        continue
                    seen.add(id(v))
                    entries.append((label, _callable_digest(v, 1)))
                    if isinstance(v, types.FunctionType):
                        todo.append(v)
                    else:
                        todo.extend(_methods(v))
    return _digest(entries).hex()


def _unwrapped(v: Any) -> Any:
    """Return the function a ``functools.cache``/``lru_cache`` or ``functools.wraps``
    wrapper that is not a plain function itself holds (``__wrapped__``), else ``v``."""
    if isinstance(v, (types.FunctionType, type)) or not callable(v):
        return v
    try:
        inner = getattr(v, "__wrapped__", None)
    except Exception:  # an object's own __getattr__
        return v
    return inner if isinstance(inner, types.FunctionType) else v


def _functions_of(f: Any) -> list[types.FunctionType]:
    """Return the Python functions a node's callable runs (a partial's function, a bound
    method's, a class's or a callable object's methods)."""
    for _ in range(8):  # partials of partials
        if isinstance(f, types.MethodType):
            f = f.__func__
        elif callable(getattr(f, "func", None)) and hasattr(f, "keywords"):
            f = f.func
        else:
            break
    if isinstance(f, types.FunctionType):
        return [f]
    cls = f if isinstance(f, type) else type(f)
    return _methods(cls) if _user_code(cls) else []


def _methods(cls: type) -> list[types.FunctionType]:
    """Return the functions a class and its bases define (methods, static and class
    methods, property getters); built-in classes have none."""
    found = []
    for base in cls.__mro__[:-1]:  # object's own are built in
        for _, attr in sorted(base.__dict__.items()):
            if isinstance(attr, (staticmethod, classmethod)):
                attr = attr.__func__
            elif isinstance(attr, property):
                attr = attr.fget
            if isinstance(attr, types.FunctionType):
                found.append(attr)
    return found


def _class_code(cls: type, depth: int) -> str:
    """Digest a class's name and the code of every function it and its bases define
    (methods, static and class methods, property getters); built-in classes have none."""
    code = [f"{cls.__module__}.{cls.__qualname__}"]
    code += [f"{m.__qualname__}:{_code_digest(m.__code__, depth)}" for m in _methods(cls)]
    return _digest(code).hex()


def _slot_names(cls: type) -> list[str]:
    names = cls.__dict__.get("__slots__", ())
    names = [names] if isinstance(names, str) else list(names)
    return [n for n in names if n not in ("__dict__", "__weakref__")]


def _cell_filled(cell: Any) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


def _callable_digest(f: Any, depth: int, strict: bool = False) -> str:
    p = _fn_parts(f, depth, strict)
    return hashlib.blake2b("|".join(p[k] for k in sorted(p)).encode(), digest_size=20).hexdigest()


#: the parts of a fingerprint, in the order the reasons name them
REASONS = {
    "code": "function body changed",
    "defaults": "defaults changed",
    "closure": "closure values changed",
    "uses": "a function, class or constant it uses changed",
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
            "uses": _uses_digest([g for f in n.fns for g in _functions_of(f)]),
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
