"""Ship the user's own code to Dask workers by value, so workers need only installed packages.

A pipeline's functions often live in files next to the script, in a package that is not
installed, or in a test module: the workers of a cluster cannot import those. :func:`dumps`
pickles a step (or a batch of values) with cloudpickle, registering each such module "by
value" for the time of the pickling, so the bytes carry the module's code. A compiled
extension cannot travel this way: :func:`dumps` raises a :class:`~papy.PoolError` naming it,
unless every worker can import it already.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.metadata
import importlib.util
import io
import logging
import pickle
import sys
import threading
import types
from collections.abc import Callable
from typing import Any

import cloudpickle

from papy._errors import PoolError
from papy._pickling import CodePickler, in_library, registered_by_value

log = logging.getLogger("papy")

#: cloudpickle's by-value registry is one per process, shared by every pool and run: the
#: modules registered for one pickling must not leak into another made at the same time.
_SHIP_LOCK = threading.Lock()


@functools.cache
def _installed_top_levels() -> frozenset[str]:
    """Return the top-level import names provided by installed distributions."""
    return frozenset(importlib.metadata.packages_distributions())


def user_module(name: str) -> types.ModuleType | None:
    """Return the module ``name`` when it is the user's own code, else None.

    The user's own code is a module loaded from a file outside the standard library and
    site-packages, and not part of an installed distribution (an editable install counts
    as installed): the workers of a cluster cannot be expected to import it.
    """
    module = sys.modules.get(name)
    if module is None or name == "__main__":
        return None  # cloudpickle already sends these by value
    top = name.partition(".")[0]
    if top == "papy" or top in sys.stdlib_module_names or top in sys.builtin_module_names:
        return None
    path = getattr(module, "__file__", None)
    if not path:
        return None
    if top in _installed_top_levels():
        return None
    if in_library(path):
        return None
    return module


def is_extension(module: types.ModuleType) -> bool:
    """Tell whether ``module`` is compiled (a ``.so``/``.pyd``), which cannot be shipped."""
    path = getattr(module, "__file__", "") or ""
    return path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def can_import(name: str) -> bool:
    """Tell whether module ``name`` can be imported here (run on the workers)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def dumps(obj: Any, shipped: set[str], importable: Callable[[str], bool] | None = None) -> bytes:
    """Pickle ``obj`` so that a worker needs none of the user's own modules.

    Modules found on the way are added to ``shipped`` (the pool's set) and stay by value
    for that pool. ``importable(name)`` tells whether every worker can import a compiled
    module already. Raises PoolError for a user module that cannot travel by value (a
    compiled extension the workers lack).
    """
    with _SHIP_LOCK:
        registered: list[str] = []
        try:
            for name in sorted(shipped):
                module = sys.modules.get(name)
                if module is not None and not registered_by_value(module):
                    cloudpickle.register_pickle_by_value(module)
                    registered.append(name)
            while True:
                buf = io.BytesIO()
                pickler = CodePickler(buf)
                pickler.dump(obj)
                new = []
                for name in sorted(pickler.referenced - shipped):
                    module = user_module(name)
                    if module is None or registered_by_value(module):
                        continue
                    if is_extension(module):
                        if importable is not None and importable(name):
                            continue  # the workers have it (a shared filesystem, say)
                        raise PoolError(
                            f"module {name!r} ({module.__file__}) is a compiled extension that "
                            "is not installed on the Dask workers, and DaskPool can only ship "
                            "Python source; install it in the workers' environment (pip "
                            "install it there, or add it to their image or conda environment)"
                        )
                    cloudpickle.register_pickle_by_value(module)
                    registered.append(name)
                    new.append(name)
                if not new:
                    return buf.getvalue()
                shipped.update(new)
                log.info(
                    "DaskPool ships the module(s) %s to the workers by value (they are not "
                    "installed there)",
                    ", ".join(new),
                )
        finally:
            for name in registered:
                module = sys.modules.get(name)
                if module is not None:
                    cloudpickle.unregister_pickle_by_value(module)


def cloud_unpicklable(value: Any) -> Exception | None:
    """Return why cloudpickle cannot pickle ``value``, or None when it can."""
    try:
        cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        return exc
    return None
