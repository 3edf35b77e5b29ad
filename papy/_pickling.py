"""Pickling of node functions for other processes and hosts.

cloudpickle sends lambdas, closures and functions of ``__main__`` (or of a file run by
``papy run``) by value. One gap remains, common in pipelines: a module-level
``functools.cache`` loader (of a lookup table, a model) is pickled by name, and the name
cannot be imported on the other side when its module travels by value.
:class:`CodePickler` rebuilds such a cache around its function there, so each worker
process loads the data once.
"""

from __future__ import annotations

import functools
import io
import os
import site
import sys
import sysconfig
import types
from typing import Any

import cloudpickle


@functools.cache
def library_dirs() -> tuple[str, ...]:
    """Return the directories of the standard library and of installed packages (real
    paths; facts about this interpreter, computed once)."""
    dirs = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    dirs.update(site.getsitepackages())
    dirs.add(site.getusersitepackages())
    return tuple(sorted(os.path.realpath(d) for d in dirs if d))


@functools.lru_cache(maxsize=4096)
def in_library(path: str) -> bool:
    """Tell whether the file ``path`` is part of the standard library or of a package
    installed into site-packages (PaPy's own files included)."""
    real = os.path.realpath(path)
    own = os.path.dirname(os.path.realpath(__file__))
    return any(real.startswith(d + os.sep) for d in (*library_dirs(), own))


def registered_by_value(module: types.ModuleType) -> bool:
    """Tell whether cloudpickle sends ``module``'s functions and classes by value."""
    return module.__name__ in cloudpickle.list_registry_pickle_by_value() or any(
        module.__name__.startswith(m + ".") for m in cloudpickle.list_registry_pickle_by_value()
    )


def _cache_by_value(wrapper: Any) -> bool:
    """Tell whether a ``functools.cache`` wrapper cannot be found by name on a worker."""
    module = sys.modules.get(getattr(wrapper, "__module__", "") or "")
    if module is None or module.__name__ == "__main__" or registered_by_value(module):
        return True
    obj: Any = module
    for part in getattr(wrapper, "__qualname__", "").split("."):
        obj = getattr(obj, part, None)
    return obj is not wrapper


def _rebuild_cache(func: Any, maxsize: int | None, typed: bool) -> Any:
    """Wrap ``func`` in a fresh cache on the worker (one cache per worker process)."""
    return functools.lru_cache(maxsize=maxsize, typed=typed)(func)


class CodePickler(cloudpickle.Pickler):  # type: ignore[misc]
    """A cloudpickle pickler that records the modules it refers to by name.

    Functions, classes and modules are pickled by reference (an import on the other side)
    unless their module is registered by value; the names recorded here let
    :class:`~papy.DaskPool` find the user's modules among them and ship those. A module-level
    ``functools.cache`` wrapper of a by-value module is rebuilt around its function on the
    worker, since pickle would otherwise look it up by name there.
    """

    def __init__(self, file: io.BytesIO, protocol: int | None = None) -> None:
        super().__init__(file, protocol=protocol)
        self.referenced: set[str] = set()

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, functools._lru_cache_wrapper):
            self.referenced.add(getattr(obj, "__module__", "") or "")
            if _cache_by_value(obj):
                params = obj.cache_parameters()
                return _rebuild_cache, (obj.__wrapped__, params["maxsize"], params["typed"])
        elif isinstance(obj, (types.FunctionType, type, types.BuiltinFunctionType)):
            self.referenced.add(getattr(obj, "__module__", None) or "")
        elif isinstance(obj, types.ModuleType):
            self.referenced.add(obj.__name__)
        return super().reducer_override(obj)


def dumps(obj: Any, protocol: int | None = None) -> bytes:
    """Pickle ``obj`` (a step and its functions) for another process, with cloudpickle."""
    buf = io.BytesIO()
    CodePickler(buf, protocol).dump(obj)
    return buf.getvalue()
