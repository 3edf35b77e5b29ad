"""Load the pipeline a command names (``FILE.py[:NAME]``) and check the paths it writes."""

from __future__ import annotations

import atexit
import os
import runpy
import shutil
import sys
import tempfile
import traceback
from pathlib import Path

import click

from papy._errors import _last_frame
from papy._pipeline import Pipeline
from papy.cli.exits import InputError
from papy.pools._functions import register_file_module

#: the module a child process imports for ``__papy__``: the user's file, run again there
#: as multiprocessing runs a script's ``__main__`` again in the processes it spawns
_SHIM = """\"\"\"The pipeline file {path!r}, for processes its nodes start (made by papy run).\"\"\"

__file__ = {path!r}
with open(__file__, "rb") as _fh:
    exec(compile(_fh.read(), __file__, "exec"))
del _fh
"""


def load_pipeline(target: str) -> Pipeline:
    """Load ``FILE.py[:NAME]`` and return the Pipeline object it defines.

    Without ``:NAME``: the file's only Pipeline object, whatever its variable is called;
    with several, the one called ``pipeline`` (an object or a factory function). The file
    runs with ``__name__ == "__papy__"``, so its ``if __name__ == "__main__":`` block does
    not run. Raise :class:`InputError` (exit 2) for a missing file or no such pipeline.

    Functions and classes of the file then belong to a module named ``__papy__``, which
    processes that nodes start with ``multiprocessing`` (``spawn``, ``forkserver``) or
    ``concurrent.futures`` import to unpickle them: :func:`_importable_by_children` makes
    that name importable there.
    """
    path_text, _, name = target.partition(":")
    path = Path(path_text)
    if not path.is_file():
        raise InputError(f"file not found: {path_text}")
    sys.path.insert(0, str(path.resolve().parent))
    try:
        namespace = runpy.run_path(str(path), run_name="__papy__")
    except Exception as exc:
        where = _last_frame("".join(_format_tb(exc)))
        raise click.ClickException(
            f"{path_text} raised {type(exc).__name__} while loading: {exc}"
            + (f" (at {where})" if where else "")
        ) from exc
    register_file_module("__papy__", namespace)
    _importable_by_children(path.resolve())
    found: dict[int, str] = {}
    for key, value in namespace.items():
        if isinstance(value, Pipeline) and not key.startswith("__"):
            found.setdefault(id(value), key)
    if not name:
        if len(found) == 1 and not callable(namespace.get("pipeline")):
            name = next(iter(found.values()))
        else:
            name = "pipeline"
    obj = namespace.get(name)
    if obj is None:
        names = list(found.values())
        if len(names) > 1:
            hint = f"; it defines several ({', '.join(names)}): pick one with {path_text}:NAME"
        elif names:
            hint = f"; pipelines in it: {', '.join(names)}"
        else:
            hint = "; it defines none"
        raise InputError(f"{path_text} has no object named {name!r}{hint}")
    if callable(obj) and not isinstance(obj, Pipeline):
        obj = obj()  # a factory function
    if not isinstance(obj, Pipeline):
        raise InputError(f"{path_text}:{name} is a {type(obj).__name__}, not a Pipeline")
    return obj


def _importable_by_children(path: Path) -> None:
    """Make ``import __papy__`` run the file at ``path`` in processes started from here.

    A node that hands a function of the file to a ``multiprocessing`` pool pickles it by
    reference, ``__papy__.name``; a spawned process knows no such module and failed with
    ``ModuleNotFoundError`` (``Pool.map`` then waits forever). A private directory
    (mode 0700, removed at exit) holding a ``__papy__.py`` that runs the file goes at the
    end of ``sys.path``, which ``multiprocessing`` hands to the processes it starts. This
    process and PaPy's workers hold their own ``__papy__`` and never import it.
    """
    home = tempfile.mkdtemp(prefix="papy-file-")
    atexit.register(shutil.rmtree, home, True)
    Path(home, "__papy__.py").write_text(_SHIM.format(path=str(path)), encoding="utf-8")
    sys.path.append(home)


def _format_tb(exc: BaseException) -> list[str]:
    return traceback.format_exception(type(exc), exc, exc.__traceback__)


def check_writable(path_text: str, option: str) -> None:
    """Raise InputError unless a file can be written at ``path_text`` (tested, not made)."""
    path = Path(path_text)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise InputError(f"cannot write {option} {path_text}: it is a directory")
    if not parent.is_dir():
        raise InputError(f"cannot write {option} {path_text}: no directory {parent}")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"cannot write {option} {path_text}: permission denied")
