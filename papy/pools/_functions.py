"""How node functions, classes and initializers travel to ProcessPool workers.

cloudpickle sends lambdas and closures by value; a function or class defined at the top
level of the user's own file (a script run as ``__main__``, or a file run by ``papy run``)
travels instead as a reference to that file (:func:`file_home`, :func:`from_file`), so in
the worker it lives in the file's module namespace with its module-level state, as under
``python file.py``.
"""

from __future__ import annotations

import ast
import io
import os
import pickle
import sys
import types
from collections.abc import Callable
from typing import Any

import cloudpickle

#: namespaces of user files, by absolute path (driver and worker alike)
_FILES: dict[str, dict[str, Any]] = {}


class _FileModule(types.ModuleType):
    """A module view of a user file's namespace that no import system knows.

    ``papy run file.py`` runs the file under the name ``__papy__`` and keeps no module for
    it; registering this view lets classes defined there (a user's exception type, say)
    be found by name when a worker sends instances back.
    """

    def __init__(self, name: str, namespace: dict[str, Any]) -> None:
        super().__init__(name)
        self._papy_namespace = namespace

    def __getattr__(self, name: str) -> Any:
        try:
            return self._papy_namespace[name]
        except KeyError:
            raise AttributeError(name) from None


def register_file_module(name: str, namespace: dict[str, Any]) -> None:
    """Let ``import name`` (and unpickling) find a user file's namespace in this process.

    ``papy run`` registers the file it ran as ``__papy__`` at once, so an object of the
    file that comes back from a process a node started is found here, not run again.
    """
    if name not in sys.modules:
        sys.modules[name] = _FileModule(name, namespace)


def _resolve(namespace: dict[str, Any], qualname: str) -> Any:
    first, *rest = qualname.split(".")
    obj = namespace[first]
    for part in rest:
        obj = getattr(obj, part)
    return obj


_GUARDED: bool | None = None


def main_is_guarded() -> bool:
    """Tell whether workers may import the driver's ``__main__`` file.

    ``forkserver`` and ``spawn`` workers import the driver's script (as ``__mp_main__``)
    before they start, which runs its top-level code again. A script that keeps its work
    under ``if __name__ == "__main__":`` is safe to import, and its functions then share one
    module namespace in the worker. A script without that guard would start its pipeline
    again inside every worker, so its workers do not import it, and its functions travel
    by value instead (each with a copy of the globals it uses), as in a REPL.
    """
    global _GUARDED
    if _GUARDED is None:
        _GUARDED = _has_main_guard(getattr(sys.modules.get("__main__"), "__file__", None))
    return _GUARDED


def _has_main_guard(path: str | None) -> bool:
    if not path or not path.endswith(".py"):
        return True  # no file to import (REPL, notebook, ``python -c``): nothing re-runs
    try:
        with open(path, "rb") as fh:
            tree = ast.parse(fh.read(), path)
    except (OSError, SyntaxError, ValueError):
        return False
    for node in tree.body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Compare):
            names = [node.test.left, *node.test.comparators]
            if any(isinstance(n, ast.Name) and n.id == "__name__" for n in names) and any(
                isinstance(n, ast.Constant) and n.value == "__main__" for n in names
            ):
                return True
    return False


def file_home(obj: Any) -> tuple[str, str, str] | None:
    """Return ``(path, module name, qualname)`` when ``obj`` should travel by its file.

    That is a function or class defined at the top level of a user's file that runs as a
    script (``__main__``) or through ``papy run`` (a module name no worker can import).
    Functions of importable modules travel by reference as usual; lambdas, closures and
    anything typed in a REPL or notebook (no file) travel by value.
    """
    mod_name = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not isinstance(mod_name, str) or not isinstance(qualname, str) or "<" in qualname:
        return None
    module = sys.modules.get(mod_name)
    if module is not None and mod_name != "__main__" and not isinstance(module, _FileModule):
        return None
    if mod_name == "__main__" and not main_is_guarded():
        return None  # workers do not import an unguarded script: travel by value
    if isinstance(obj, types.FunctionType):
        namespace = obj.__globals__
    elif module is not None:
        namespace = module.__dict__
        if isinstance(module, _FileModule):
            namespace = module._papy_namespace
    else:
        return None
    path = namespace.get("__file__")
    if not isinstance(path, str) or not path.endswith(".py") or not os.path.isfile(path):
        return None
    try:
        if _resolve(namespace, qualname) is not obj:
            return None
    except (KeyError, AttributeError):
        return None
    path = os.path.abspath(path)
    _FILES.setdefault(path, namespace)
    if module is None:
        register_file_module(mod_name, namespace)
    return path, mod_name, qualname


def from_file(path: str, mod_name: str, qualname: str) -> Any:
    """Return ``qualname`` from the user file at ``path``, importing the file once.

    In a worker started by ``forkserver`` or ``spawn``, multiprocessing has already
    imported the driver's ``__main__`` file (as ``__mp_main__``, so its
    ``if __name__ == "__main__":`` block does not run): that module is reused. Any other
    file (``papy run file.py``) is executed once under its driver-side name, with its real
    file name so tracebacks show its lines.
    """
    namespace = _FILES.get(path)
    if namespace is None:
        main = sys.modules.get("__main__")
        main_file = getattr(main, "__file__", None)
        known = sys.modules.get(mod_name)  # imported by name already (``papy run``'s shim)
        known_file = None if isinstance(known, _FileModule) else getattr(known, "__file__", None)
        if main is not None and main_file and os.path.abspath(main_file) == path:
            namespace = main.__dict__
        elif known is not None and known_file and os.path.abspath(known_file) == path:
            namespace = known.__dict__
        else:
            module = types.ModuleType(mod_name)
            module.__file__ = path
            namespace = module.__dict__
            _FILES[path] = namespace
            # A view inherited through ``fork`` names the driver's copy: this one is used.
            existing = sys.modules.get(mod_name)
            if existing is None or isinstance(existing, _FileModule):
                sys.modules[mod_name] = module
            with open(path, "rb") as fh:
                code = compile(fh.read(), path, "exec")
            sys.path.insert(0, os.path.dirname(path))
            exec(code, namespace)
        _FILES[path] = namespace
    return _resolve(namespace, qualname)


def view_from(buffer: Any, fmt: str, shape: tuple[int, ...]) -> memoryview:
    """Rebuild a ``memoryview`` of format ``fmt`` and ``shape`` over ``buffer`` (no copy).

    An empty one comes back one-dimensional (``cast`` refuses a zero in a shape).
    """
    if 0 in shape:
        return memoryview(buffer).cast("B").cast(fmt)  # type: ignore[call-overload]
    return memoryview(buffer).cast("B").cast(fmt, shape)  # type: ignore[call-overload]


def reduce_view(obj: memoryview) -> Any:
    """Reduce a ``memoryview`` to a memoryview of the same format, shape and writability.

    cloudpickle sends a memoryview as ``bytes``, so a node's memoryview would arrive as
    a memoryview only when it went through shared memory. A contiguous one goes as a
    :class:`pickle.PickleBuffer` of itself (out of band when the pickler takes buffers),
    another as a copy of its bytes. NotImplemented for a format ``cast`` cannot rebuild
    (a struct or an explicit byte order): those still arrive as ``bytes``.
    """
    try:
        view_from(bytes(obj.itemsize), obj.format, (1,) if obj.ndim else ())
    except (TypeError, ValueError):
        return NotImplemented
    if obj.c_contiguous:
        return view_from, (pickle.PickleBuffer(obj), obj.format, obj.shape)
    data = obj.tobytes()
    return view_from, (data if obj.readonly else bytearray(data), obj.format, obj.shape)


class FilePickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle, except that functions and classes of a user file go by reference, and
    a ``memoryview`` stays one (:func:`reduce_view`)."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (types.FunctionType, type)):
            home = file_home(obj)
            if home is not None:
                return (from_file, home)
        if type(obj) is memoryview:
            return reduce_view(obj)
        return super().reducer_override(obj)


def dumps_code(
    obj: Any, buffer_callback: Callable[[pickle.PickleBuffer], Any] | None = None
) -> bytes:
    """Pickle functions (a step spec, an initializer) for a worker process.

    Like cloudpickle, but a function defined in the user's own file travels as a reference
    to that file, so in the worker it lives in the file's module namespace with its
    module-level state (locks, connections, caches) instead of a private copy of it.
    ``buffer_callback`` is pickle's (protocol 5): it may take large buffers out of band.
    """
    buf = io.BytesIO()
    FilePickler(buf, protocol=pickle.HIGHEST_PROTOCOL, buffer_callback=buffer_callback).dump(obj)
    return buf.getvalue()
