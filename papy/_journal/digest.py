"""Digests: the identity of input items (content) and of code (node fingerprints).

**Item identity.** Without ``key=`` an input item is known by a digest of its value (the
canonical encoding of :mod:`papy._journal.encoding`: containers element by element, dicts
in their order, sets in a fixed order, other objects by how they are rebuilt, with the
code of their class when it is the user's) plus its occurrence count among equal items of
the run. An item whose value cannot be encoded (an object that cannot be pickled: a lock, a
socket, an open file) has no identity that a later run could find again: it gets one of
its own, so it runs every time and is never given another item's records.

**Code identity.** A node's fingerprint covers its functions' code (bytecode, constants,
names of the globals they read), defaults, closure values, what they use of the user's own
code (functions and classes they call, followed call by call, and global constants they
read), ``args``, ``kwargs``, its role (scatter, gather, batched, join), its parents and
their fingerprints. So a changed node and everything downstream of it no longer match
their records.
"""

from __future__ import annotations

import dis
import functools
import importlib.machinery
import importlib.util
import json
import logging
import os
import types
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from papy._errors import JournalError
from papy._graph import topological_order
from papy._journal.encoding import (
    Unidentifiable,
    callable_digest,
    cell_filled,
    class_code,
    classes_remembered,
    digest,
    fn_parts,
    is_constant,
    methods,
    user_code,
)
from papy._node import Node
from papy._pickling import in_library

log = logging.getLogger("papy")

#: at most this many functions and classes followed from one node's functions
_MAX_USES = 5_000

# -- identity of items ------------------------------------------------------------------------


def content_digest(value: Any) -> str:
    """Return a stable hex digest of an input item's value (its identity without ``key=``).

    Raises Unidentifiable when the value holds an object that cannot be pickled.
    """
    return digest(value, strict=True).hex()


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
        if key is None:
            with classes_remembered():
                return [self._by_content(v) for v in values]
        out = []
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

    def _by_content(self, v: Any) -> str:
        try:
            d = content_digest(v)
        except Unidentifiable as exc:
            return self._own(v, exc)
        n = self.seen.get(d, 0)
        self.seen[d] = n + 1
        return f"c:{d}:{n}"


# -- identity of code -------------------------------------------------------------------------


def _global_names(code: types.CodeType) -> set[str]:
    """Return the names ``code`` and the code nested in it read (globals and attributes)."""
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _global_names(c)
    return names


def _uses_digest(fns: Sequence[Any]) -> str:
    """Digest what the functions ``fns`` use of the user's own code, followed call by call
    (at most ``_MAX_USES`` functions and classes): see :func:`_use` for what each global
    name they read, each ``module.name`` of a user's module and each closure value adds."""
    entries: list[Any] = []
    seen: set[int] = {id(f) for f in fns}
    todo = list(fns)
    while todo and len(seen) < _MAX_USES:
        f = todo.pop()
        names = _global_names(f.__code__)
        scope = f.__globals__
        held = [c.cell_contents for c in f.__closure__ or () if cell_filled(c)]
        held += [*(f.__defaults__ or ()), *(f.__kwdefaults__ or {}).values()]
        for value in held:  # their digests are part of f's closure's and defaults': the
            use = _use(_unwrapped(value))  # functions they run are followed
            for g in use[1] if use is not None else []:
                if id(g) not in seen:
                    seen.add(id(g))
                    todo.append(g)
        imported = _imported_names(f.__code__)
        for name in sorted(names):
            if name in scope:
                value = scope[name]
            elif name in imported:  # a module imported inside the function, maybe not
                source = _module_source(name)  # here yet: known by its file's bytes
                if source is not None:
                    entries.append((name, source))
                continue
            else:
                continue
            found = _in_modules(name, value, names)
            for label, v in list(found):  # a singledispatch function's implementations
                found += [(f"{label}[{i}]", g) for i, g in enumerate(_dispatched(v))]
            for label, v in found:
                v = _unwrapped(v)
                owner = v if isinstance(v, (types.FunctionType, type)) else type(v)
                if not is_constant(v) and id(owner) in seen:
                    entries.append((label, "seen"))
                    continue
                use = _use(v)
                if use is not None:
                    entries.append((label, use[0]))
                    seen.add(id(owner))
                    todo.extend(g for g in use[1] if id(g) not in seen or g is owner)
    if todo:
        log.warning(
            "journal: %s uses more than %d functions and classes of your own; those past "
            "them are not part of its fingerprint (papy journal forget recomputes by hand)",
            _name_of(fns[0]) if fns else "a node",
            _MAX_USES,
        )
    return digest(entries).hex()


def _name_of(f: Any) -> str:
    return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', repr(f))}"


def _imported_names(code: types.CodeType) -> set[str]:
    """Return the modules ``code`` and the code nested in it import (``import x``)."""
    names = {i.argval for i in dis.get_instructions(code) if i.opname == "IMPORT_NAME"}
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _imported_names(c)
    return names


def _module_source(name: str) -> str | None:
    """Return a digest of the file of the user's module ``name`` (found on ``sys.path``
    and, for ``package.module``, in the package's directories, without importing
    anything), or None for a library's or one not found."""
    top, *rest = name.split(".")
    try:
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        return None
    origin = getattr(spec, "origin", None)
    for part in rest:  # a package's submodule: its file, by path
        places = list(getattr(spec, "submodule_search_locations", None) or [])
        files = [os.path.join(d, part + ".py") for d in places]
        files += [os.path.join(d, part, "__init__.py") for d in places]
        origin = next((f for f in files if os.path.isfile(f)), None)
        spec = importlib.machinery.ModuleSpec(name, None, origin=origin, is_package=True)
        spec.submodule_search_locations = [os.path.dirname(origin)] if origin else []
    if not origin or not origin.endswith(".py") or in_library(origin):
        return None
    try:
        with open(origin, "rb") as fh:
            return digest(fh.read()).hex()
    except OSError:
        return None


def _in_modules(name: str, value: Any, names: set[str], depth: int = 0) -> list[tuple[str, Any]]:
    """Return ``[(name, value)]``, or for a user's module what the code reads of it
    (``module.name``, ``package.module.name``: the attributes among ``names``)."""
    if not isinstance(value, types.ModuleType) or not user_code(value) or depth > 4:
        return [(name, value)]
    found = []
    for attr in sorted(names & vars(value).keys()):
        found += _in_modules(f"{name}.{attr}", getattr(value, attr), names, depth + 1)
    return found


def _use(v: Any) -> tuple[str, list[types.FunctionType]] | None:
    """Return what using ``v`` adds to a function's identity, and the functions to follow
    from it; None for what is left out (library code, mutable values).

    A constant: its value. The user's function or class: its code, defaults and closure
    (a class: of every method). A ``functools.partial``: the same, and its arguments. An
    instance of the user's class: its class's code (not its state, which may change).
    """
    if is_constant(v):
        return digest(v).hex(), []
    if isinstance(v, tuple):  # of functions, say: each is followed
        follow = [g for x in v if callable(x) for g in _functions_of(_unwrapped(x))]
        return (digest(v).hex(), follow) if any(map(user_code, follow)) else None
    if isinstance(v, (types.FunctionType, type)):
        return (callable_digest(v, 1), _functions_of(v)) if user_code(v) else None
    if isinstance(v, (functools.partial, types.MethodType)):
        follow = _functions_of(v)
        return (callable_digest(v, 1), follow) if any(map(user_code, follow)) else None
    if not isinstance(v, types.ModuleType) and user_code(type(v)):
        return class_code(type(v), 1), methods(type(v))
    return None


def _unwrapped(v: Any) -> Any:
    """Return the user's function behind a wrapper that is not the user's code: a
    ``functools.cache``, a library decorator made with ``functools.wraps``
    (``contextlib.contextmanager``, ``functools.singledispatch``) and the like, by its
    ``__wrapped__``; else ``v``."""
    for _ in range(16):  # stacked library decorators
        if isinstance(v, type) or not callable(v):
            return v
        if isinstance(v, types.FunctionType) and user_code(v):
            return v
        try:
            inner = getattr(v, "__wrapped__", None)
        except Exception:  # an object's own __getattr__
            return v
        if not callable(inner):
            return v
        v = inner
    return v


def _dispatched(v: Any) -> list[Any]:
    """Return the implementations a ``functools.singledispatch`` function registered."""
    registry: Any = getattr(v, "registry", None) if isinstance(v, types.FunctionType) else None
    if not hasattr(registry, "values"):
        return []
    return [f for f in registry.values() if isinstance(f, types.FunctionType)]


def _held_functions(fns: Sequence[Any], call: Any) -> list[types.FunctionType]:
    """Return the user's functions a node holds as data: in a partial's arguments, a
    callable object's attributes, the node's ``args``/``kwargs`` (``call``); their callees
    are followed like a node's own."""
    held: list[Any] = [a for per in getattr(call, "args", []) for a in per]
    held += [v for per in getattr(call, "kwargs", []) for v in per.values()]
    for v in fns:
        if isinstance(v, (functools.partial, functools.partialmethod)):
            held += [*v.args, *v.keywords.values()]
        elif callable(v) and not isinstance(v, (types.FunctionType, type, types.MethodType)):
            held += list(getattr(v, "__dict__", {}).values())
        else:
            held.append(v)
    found = []
    for v in held:
        use = _use(_unwrapped(v)) if callable(v) else None
        found += use[1] if use is not None else []
    return found


def _functions_of(f: Any) -> list[types.FunctionType]:
    """Return the Python functions a node's callable runs: a partial's function, a bound
    method's and the other methods of its object's class, a class's or a callable
    object's methods (the user's own classes only)."""
    extra: list[types.FunctionType] = []
    for _ in range(8):  # partials of partials
        if isinstance(f, types.MethodType):
            owner = f.__self__
            cls = owner if isinstance(owner, type) else type(owner)
            extra = methods(cls) if user_code(cls) else []
            f = f.__func__
        elif isinstance(f, (functools.partial, functools.partialmethod)):
            f = f.func
        else:
            break
    if isinstance(f, types.FunctionType):
        return [f, *extra]
    cls = f if isinstance(f, type) else type(f)
    return methods(cls) if user_code(cls) else []


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
        fns = [fn_parts(f) for f in n.fns]
        call = n.call
        parts = {
            "code": digest([p["code"] for p in fns]).hex(),
            "defaults": digest([p["defaults"] for p in fns]).hex(),
            "closure": digest([p["closure"] for p in fns]).hex(),
            "uses": _uses_digest(
                [g for f in n.fns for g in _functions_of(f)] + _held_functions(n.fns, call)
            ),
            "args": digest(list(getattr(call, "args", []))).hex(),
            "kwargs": digest(list(getattr(call, "kwargs", []))).hex(),
            "graph": digest(
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
        fp = digest([n.name, sorted(parts.items()), upstream]).hex()
        out[n.name] = NodePrint(fp, parts, [p.name for p in n.parents])
    return out


def fingerprint(nodes: Sequence[Node]) -> str:
    """Return one digest of a whole pipeline (all its ``nodes``): every node's fingerprint."""
    prints = node_prints(nodes)
    return digest(sorted((k, v.fingerprint) for k, v in prints.items())).hex()
