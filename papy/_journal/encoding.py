"""A canonical encoding of values and code: what an item's or a node's identity is made of.

:func:`digest` feeds a value to a hash so that equal values give equal digests in every
process, whatever their identity, ``PYTHONHASHSEED`` or pickle's memo: plain values
(numbers, text, bytes, and lists, tuples, dicts and sets of them) element by element, each
with a tag of its exact type; other objects by what ``__reduce_ex__`` says rebuilds them
(their class's code, constructor arguments and state, encoded the same way) when their
class is the user's own, so a set deep inside such an object is encoded in a fixed order;
objects of library classes by their pickle. Code is encoded by what decides its behaviour:
bytecode, constants, names read, defaults and closure values of functions; for a class,
the same for every function it and its bases define, and its constant attributes. A value
that cannot be encoded (a lock, a socket) is known by its type and, for code, its
attributes; ``strict`` encoding (an input item's) raises :class:`Unidentifiable` instead.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import decimal
import enum
import fractions
import functools
import hashlib
import importlib.machinery
import os
import pathlib
import pickle
import re
import struct
import sys
import threading
import types
from collections.abc import Iterator
from typing import Any

import cloudpickle

from papy._pickling import in_library

#: how deep values and closures are followed; deeper ones are known by their pickle
MAX_DEPTH = 64
#: the types of global values a function's identity includes: constants (a module-level
#: list, dict or array may be changed in place at any time; it is left out)
_CONSTANT_TYPES = (int, float, complex, str, bytes, bool, type(None))
#: immutable values of the standard library a global may hold (see :func:`is_constant`)
_VALUE_TYPES = (
    re.Pattern,
    pathlib.PurePath,
    decimal.Decimal,
    fractions.Fraction,
    datetime.date,
    datetime.time,
    datetime.timedelta,
)
_local = threading.local()
#: library containers encoded by how they are rebuilt (see _by_state)
_CONTAINERS = frozenset(
    {
        types.SimpleNamespace,
        collections.OrderedDict,
        collections.defaultdict,
        collections.deque,
        collections.Counter,
    }
)


class Unidentifiable(Exception):
    """An input item holds a value that cannot be encoded (see the module docstring)."""


def digest(v: Any, depth: int = 0, strict: bool = False) -> bytes:
    """Return the 20-byte blake2b digest of the canonical encoding of ``v``."""
    h = hashlib.blake2b(digest_size=20)
    feed(h, v, depth, strict)
    return h.digest()


def feed(h: Any, v: Any, depth: int = 0, strict: bool = False) -> None:
    """Feed a canonical encoding of ``v`` to the hash ``h`` (see the module docstring).

    A dict's order is part of it (a node may see it: ``json.dumps``, ``list(d)``), a set's
    is not. ``strict``: raise Unidentifiable for a value that cannot be encoded, and tell
    functions and classes apart by their names too (an item, which a node may inspect).
    """
    t = type(v)
    if v is None:
        h.update(b"N")
    elif t is bool:
        h.update(b"T" if v else b"F")
    elif t is int:
        try:
            h.update(b"i%d:" % len(b := str(v).encode()) + b)
        except ValueError:  # above sys.get_int_max_str_digits(): in hexadecimal
            h.update(b"x%d:" % len(b := format(v, "x").encode()) + b)
    elif t is float:
        h.update(b"f" + struct.pack("!d", v))
    elif t is str:
        b = v.encode("utf-8", "surrogatepass")
        h.update(b"s%d:" % len(b) + b)
    elif t is bytes or t is bytearray:
        h.update((b"b" if t is bytes else b"B") + b"%d:" % len(v) + bytes(v))
    elif depth < MAX_DEPTH and (t is list or t is tuple):
        h.update((b"l" if t is list else b"t") + b"%d:" % len(v))
        for x in v:
            feed(h, x, depth + 1, strict)
    elif depth < MAX_DEPTH and t is dict:
        h.update(b"D%d:" % len(v))
        for k, x in v.items():
            feed(h, k, depth + 1, strict)
            feed(h, x, depth + 1, strict)
    elif depth < MAX_DEPTH and (t is set or t is frozenset):
        h.update((b"S" if t is set else b"Z") + b"%d:" % len(v))
        h.update(b"".join(sorted(digest(x, depth + 1, strict) for x in v)))
    elif isinstance(v, (types.FunctionType, types.MethodType, types.BuiltinFunctionType)):
        if strict:
            h.update(b"n" + _name(v).encode())
        h.update(b"c" + callable_digest(v, depth + 1, strict).encode())
    elif isinstance(v, type):
        h.update(b"y" + class_code(v, depth).encode())
    elif isinstance(v, types.ModuleType):
        h.update(b"m" + v.__name__.encode())
    elif isinstance(v, threading.Thread) and not strict:  # code's identity: a resource
        h.update(b"u" + _name(t).encode())  # whose state (its ident) is the process's
    elif depth < MAX_DEPTH and _object_array(v):  # its pickle holds each element's
        h.update(b"A" + repr((v.shape, v.dtype.str)).encode())  # pickle: sets in seed order
        feed(h, v.ravel().tolist(), depth + 1, strict)
    elif depth >= MAX_DEPTH or not _by_state(t) or not _feed_reduced(h, v, depth, strict):
        blob = _pickle_or_none(v)
        if blob is not None:
            h.update(b"p%d:" % len(blob) + blob)
        elif strict:
            raise Unidentifiable(f"{t.__module__}.{t.__qualname__}")
        else:  # code's identity: known by its type and its attributes
            h.update(b"u" + f"{t.__module__}.{t.__qualname__}".encode())
            feed(h, getattr(v, "__dict__", None), depth + 1, strict)


def _feed_reduced(h: Any, v: Any, depth: int, strict: bool) -> bool:
    """Feed ``v`` as ``__reduce_ex__(4)`` rebuilds it; False if it does not say how.

    Raises Unidentifiable (``strict``) for a part that cannot be encoded.
    """
    try:
        reduced = v.__reduce_ex__(4)
    except Exception:
        return False
    if not isinstance(reduced, tuple) or not 2 <= len(reduced) <= 6:
        return False
    fn, args, *rest = reduced
    t = type(v)
    h.update(b"R" + f"{t.__module__}.{t.__qualname__}|{_name(fn)}".encode())
    if user_code(t):
        h.update(class_code(t, depth).encode())  # a node may call the item's methods
    parts = [args, *(list(r) if hasattr(r, "__next__") else r for r in rest[:3])]
    feed(h, parts, depth + 1, strict)
    return True


def _by_state(t: type) -> bool:
    """Tell whether values of type ``t`` are encoded by how they are rebuilt: the user's
    own classes, and the library's plain ones (default reduction: their state is their
    attributes, ``argparse.Namespace``), and the standard containers (``_CONTAINERS``),
    whose pickle would hold a set in the hash seed's order; remembered like
    :func:`class_code`. Other library types (NumPy arrays) go by their pickle."""
    memo: dict[Any, Any] | None = getattr(_local, "classes", None)
    key = ("state", t)
    if memo is not None and key in memo:
        return bool(memo[key])
    plain = t in _CONTAINERS or (
        t.__reduce_ex__ is object.__reduce_ex__ and t.__reduce__ is object.__reduce__
    )
    out = plain or user_code(t)
    if memo is not None:
        memo[key] = out
    return out


def _object_array(v: Any) -> bool:
    """Tell whether ``v`` is a NumPy array of Python objects."""
    t = type(v)
    return t.__name__ == "ndarray" and t.__module__ == "numpy" and bool(v.dtype.hasobject)


def _name(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__name__)}"


def _pickle_or_none(v: Any) -> bytes | None:
    try:
        return pickle.dumps(v, protocol=4)
    except Exception:
        pass
    try:
        return bytes(cloudpickle.dumps(v, protocol=4))
    except Exception:
        return None


# -- code -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _visiting(obj: Any) -> Iterator[bool]:
    """Yield False when ``obj`` is being encoded already, further up (a cycle: a recursive
    closure, a method's ``__class__`` cell)."""
    stack: set[int] = _local.__dict__.setdefault("visiting", set())
    if id(obj) in stack:
        yield False
        return
    stack.add(id(obj))
    try:
        yield True
    finally:
        stack.discard(id(obj))


def code_digest(code: types.CodeType, depth: int = 0) -> str:
    """Digest what decides a code object's behaviour: bytecode, constants, names read."""
    h = hashlib.blake2b(digest_size=20)
    h.update(code.co_code)
    counts = (code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags)
    h.update(b"|%d|%d|%d|%d|" % counts)
    h.update(",".join(code.co_names).encode())
    h.update(b"|")
    h.update(",".join(code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]).encode())
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            h.update(b"C" + code_digest(c, depth + 1).encode())
        else:
            feed(h, c, depth + 1)
    return h.hexdigest()


def fn_parts(f: Any, depth: int = 0, strict: bool = False) -> dict[str, str]:
    """Split a callable's identity into code, defaults and closure digests.

    A callable object counts as the code of every function its class and its bases
    define (``__call__`` and the methods it may call) and its state (``__dict__`` and
    ``__slots__``; a built-in one, ``operator.itemgetter(1)``, its pickle); a built-in
    method (``items.append``) as its name and its object. ``strict``: see :func:`feed`.
    """
    if depth > MAX_DEPTH:
        return {"code": "deep", "defaults": "", "closure": ""}
    if isinstance(f, type):  # a class called as a node: the code it runs (class_code
        return {"code": class_code(f, depth), "defaults": "", "closure": ""}  # visits it)
    with _visiting(f) as fresh:
        if not fresh:
            return {"code": f"cycle {_name(f)}", "defaults": "", "closure": ""}
        return _fn_parts(f, depth, strict)


def _fn_parts(f: Any, depth: int, strict: bool) -> dict[str, str]:
    if isinstance(f, types.MethodType):
        parts = fn_parts(f.__func__, depth + 1, strict)
        parts["closure"] = digest([parts["closure"], f.__self__], depth + 1, strict).hex()
        return parts
    if isinstance(f, types.FunctionType):
        closure = [c.cell_contents for c in (f.__closure__ or ()) if cell_filled(c)]
        attrs = sorted((k, v) for k, v in vars(f).items() if is_constant(v))
        if attrs:  # constant attributes the function may read (f.k = 2)
            closure.append(attrs)
        return {
            "code": code_digest(f.__code__, depth),
            "defaults": digest([f.__defaults__, f.__kwdefaults__], depth + 1, strict).hex(),
            "closure": digest(closure, depth + 1, strict).hex(),
        }
    if isinstance(f, (functools.partial, functools.partialmethod)):
        parts = fn_parts(f.func, depth + 1, strict)
        parts["closure"] = digest(
            [parts["closure"], getattr(f, "args", ()), f.keywords], depth + 1, strict
        ).hex()
        return parts
    if isinstance(f, types.BuiltinFunctionType):
        owner = getattr(f, "__self__", None)  # a built-in method's object (not a module's)
        bound = owner is not None and not isinstance(owner, (types.ModuleType, type))
        held = digest(owner, depth + 1, strict).hex() if bound else ""
        return {"code": _name(f), "defaults": "", "closure": held}
    cls = type(f)  # a callable object: its class's code + state
    slots = {
        name: getattr(f, name)
        for base in cls.__mro__
        for name in _slot_names(base)
        if hasattr(f, name)
    }
    state: list[Any] = [getattr(f, "__dict__", None), slots]
    if not methods(cls):  # built in (str.upper, itemgetter(1)): what it pickles as
        state.append(_pickle_or_none(f))
    return {
        "code": class_code(cls, depth),
        "defaults": "",
        "closure": digest(state, depth + 1, strict).hex(),
    }


def callable_digest(f: Any, depth: int, strict: bool = False) -> str:
    """Return one digest of :func:`fn_parts`."""
    p = fn_parts(f, depth, strict)
    return hashlib.blake2b("|".join(p[k] for k in sorted(p)).encode(), digest_size=20).hexdigest()


def class_code(cls: type, depth: int) -> str:
    """Digest a class's name, every function it and its bases define (code, defaults and
    closure values), their constant attributes, and an enum's members' values."""
    name = f"{cls.__module__}.{cls.__qualname__}"
    if depth > MAX_DEPTH:
        return name
    memo: dict[Any, Any] | None = getattr(_local, "classes", None)
    if memo is not None and cls in memo:
        return str(memo[cls])
    with _visiting(cls) as fresh:
        if not fresh:
            return f"cycle {name}"
        code = [name]
        code += [f"{m.__qualname__}:{callable_digest(m, depth + 1)}" for m in methods(cls)]
        for base in cls.__mro__[:-1]:
            for attr, v in sorted(base.__dict__.items()):
                if not attr.startswith("__") and is_constant(v):
                    code.append(f"{base.__qualname__}.{attr}={digest(v).hex()}")
                elif isinstance(v, type) and user_code(v):  # a class nested in it
                    code.append(f"{base.__qualname__}.{attr}:{class_code(v, depth + 1)}")
        meta = type(cls)
        if meta is not type and user_code(meta):  # its metaclass's methods
            code.append(f"meta:{class_code(meta, depth + 1)}")
        if issubclass(cls, enum.Enum):
            code += [f"{m.name}={digest(m.value, depth + 1).hex()}" for m in cls]
        out = digest(code).hex()
    if memo is not None:
        memo[cls] = out
    return out


@contextlib.contextmanager
def classes_remembered() -> Iterator[None]:
    """Encode each class once inside the block (one run's input items: a class's code
    does not change while they are named)."""
    outer = getattr(_local, "classes", None)
    _local.classes = outer if outer is not None else {}
    try:
        yield
    finally:
        _local.classes = outer


def methods(cls: type) -> list[types.FunctionType]:
    """Return the functions a class and its bases define (methods, static and class
    methods, property getters); built-in classes have none."""
    found = []
    for base in cls.__mro__[:-1]:  # object's own are built in
        for _, attr in sorted(base.__dict__.items()):
            if isinstance(attr, (staticmethod, classmethod)):
                attr = attr.__func__
            elif isinstance(attr, property):
                attr = attr.fget
            if isinstance(attr, types.FunctionType) and not _generated(attr):
                found.append(attr)
    return found


def _generated(f: types.FunctionType) -> bool:
    """Tell whether ``f`` was written by a class-making library (attrs): its code holds
    values of the process (a hash of a unique name) and follows the class's fields,
    which are encoded already."""
    return f.__code__.co_filename.startswith("<attrs generated")


def _slot_names(cls: type) -> list[str]:
    names = cls.__dict__.get("__slots__", ())
    names = [names] if isinstance(names, str) else list(names)
    return [n for n in names if n not in ("__dict__", "__weakref__")]


def cell_filled(cell: Any) -> bool:
    """Tell whether a closure cell holds a value (a name not yet assigned leaves it empty)."""
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


def is_constant(v: Any, depth: int = 0) -> bool:
    """Tell whether ``v`` is a constant: a number, text, bytes, a compiled pattern, a
    path, a decimal, a fraction, a date or time, an enum member, an instance of a frozen
    dataclass of such, or a tuple or frozenset of any of these (nested at most
    ``MAX_DEPTH`` deep: a deeper one is not taken for a constant)."""
    if isinstance(v, _CONSTANT_TYPES):
        return True
    if depth >= MAX_DEPTH:
        return False
    if isinstance(v, (tuple, frozenset)):
        return len(v) <= 100_000 and all(is_constant(x, depth + 1) for x in v)
    if isinstance(v, (*_VALUE_TYPES, enum.Enum)):
        return True
    params = getattr(type(v), "__dataclass_params__", None)
    if params is not None and params.frozen and hasattr(v, "__dict__"):
        return all(is_constant(x, depth + 1) for x in vars(v).values())
    return False


def user_code(obj: Any) -> bool:
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
        if obj.__module__ == "builtins":
            return False
        return module is None or user_code(module)  # None: made by exec, or the like
    else:
        return False
    if path.startswith("<frozen") or path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES)):
        return False  # the standard library's frozen modules; compiled code
    return not (os.path.isabs(path) and in_library(path))
