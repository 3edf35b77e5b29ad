"""The main loop of a ProcessPool worker process, and how functions travel to it.

Messages are pickled tuples on a private pipe, one per task, so the driver always knows
which task each worker holds: that is what lets the pool re-run exactly the batch a dead
worker lost and pin down an item that kills its worker. (This is why the engine keeps its
own small process pool instead of ``multiprocessing.Pool``, which hangs when a worker dies,
or ``ProcessPoolExecutor``, which breaks the whole pool.)

A worker:

- leads its own process group, so the driver can kill it together with any processes its
  node functions started (a node may use ``multiprocessing`` or a nested PaPy pool);
- watches the driver's process from a thread and exits, with its whole group, within a
  fraction of a second of the driver's death, whatever it is running;
- publishes which item of which stage it is running in a small shared-memory *slot*
  (:class:`SlotTracker`), so the driver can enforce per-item timeouts and name the item
  that killed a worker;
- imports the user's file once (see :func:`from_file`), so node functions, the
  initializer and module-level state share one namespace, as under ``python file.py``.
"""

from __future__ import annotations

import ast
import io
import os
import pickle
import select
import signal
import struct
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from papy._items import Failure, failure_from_exception, qualified_type
from papy._task import StageStats, StepSpec, TaskResult, Tracker, critical, run_task

# -- functions whose home is a file, not an importable module --------------------------------

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
        sys.modules[mod_name] = _FileModule(mod_name, namespace)
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
        if main is not None and main_file and os.path.abspath(main_file) == path:
            namespace = main.__dict__
        else:
            module = types.ModuleType(mod_name)
            module.__file__ = path
            namespace = module.__dict__
            _FILES[path] = namespace
            if mod_name not in sys.modules:
                sys.modules[mod_name] = module
            with open(path, "rb") as fh:
                code = compile(fh.read(), path, "exec")
            sys.path.insert(0, os.path.dirname(path))
            exec(code, namespace)
        _FILES[path] = namespace
    return _resolve(namespace, qualname)


def _make_pickler() -> type:
    import cloudpickle

    class FilePickler(cloudpickle.Pickler):  # type: ignore[misc,name-defined]
        """cloudpickle, except that functions and classes of a user file go by reference."""

        def reducer_override(self, obj: Any) -> Any:
            if isinstance(obj, (types.FunctionType, type)):
                home = file_home(obj)
                if home is not None:
                    return (from_file, home)
            return super().reducer_override(obj)

    return FilePickler


_PICKLER: type | None = None


def dumps_code(obj: Any) -> bytes:
    """Pickle functions (a step spec, an initializer) for a worker process.

    Like cloudpickle, but a function defined in the user's own file travels as a reference
    to that file, so in the worker it lives in the file's module namespace with its
    module-level state (locks, connections, caches) instead of a private copy of it.
    """
    global _PICKLER
    if _PICKLER is None:
        _PICKLER = _make_pickler()
    buf = io.BytesIO()
    _PICKLER(buf, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buf.getvalue()


# -- items and results -----------------------------------------------------------------------


def dumps(obj: Any) -> bytes:
    """Pickle ``obj`` fast; fall back to cloudpickle for lambdas and ``__main__`` objects."""
    try:
        return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        return dumps_code(obj)


def unpicklable(value: Any) -> Exception | None:
    """Return why ``value`` cannot be pickled, or None when it can."""
    try:
        dumps(value)
    except Exception as exc:
        return exc
    return None


def fail_unpicklable(
    node: str, keys: Any, values: list[Any], why: Callable[[Any, Exception], str]
) -> list[Any]:
    """Return ``values`` with the ones that cannot be pickled replaced by Failures.

    Used on both sides of a process boundary (items going out, results coming back), so
    only the offending items fail and the message names their type.
    """
    out = []
    for key, value in zip(keys, values):
        exc = None if type(value) is Failure else unpicklable(value)
        if exc is None:
            out.append(value)
        else:
            out.append(failure_from_exception(node, key, TypeError(why(value, exc)), value))
    return out


def _encode_result(result: TaskResult, spec: StepSpec, keys: Any) -> bytes:
    try:
        return dumps(result)
    except Exception:
        pass
    result.values = fail_unpicklable(
        spec.stages[-1].name,
        keys,
        result.values,
        lambda value, exc: (
            f"the result of type {qualified_type(value)} cannot be sent back from the worker "
            f"process ({qualified_type(exc)}: {exc}); return plain data, or use a ThreadPool"
        ),
    )
    for st in result.stats:
        if st.first_failure is not None and unpicklable(st.first_failure) is not None:
            st.first_failure = None
    return dumps(result)


def frame(header: Any, body: bytes) -> bytes:
    """Join a small header and a pickled body into one message.

    The header (ids and keys) always unpickles, so a body that cannot be rebuilt on the
    other side still tells which task and which items it was about.
    """
    head = pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL)
    return struct.pack("!I", len(head)) + head + body


def unframe(data: bytes) -> tuple[Any, memoryview]:
    """Split a message made by :func:`frame` into its header and its body."""
    (n,) = struct.unpack_from("!I", data)
    view = memoryview(data)
    return pickle.loads(view[4 : 4 + n]), view[4 + n :]


# -- the slot: which item the worker runs, for the driver to read ----------------------------

#: layout of a worker's slot (doubles): sequence, job id, stage, index, count, start time
SLOT_SIZE = 6
SEQ, JOB, STAGE, INDEX, COUNT, START = range(SLOT_SIZE)
IDLE = -2.0  # INDEX when no task runs
UNBORN = -3.0  # INDEX until the worker has started (imported, initialized)


class SlotTracker(Tracker):
    """Publish (job, stage, item, start time) to shared memory before each tracked item.

    The driver reads it without asking the worker: ``time.monotonic()`` is system-wide on
    Linux (CLOCK_MONOTONIC), so the start time means the same on both sides. A sequence
    number, odd while a write is in progress, lets the reader discard a torn read.
    Costs about a microsecond per call; the engine only calls it per item for stages with a
    ``timeout`` or for a batch that already killed a worker once.
    """

    def __init__(self, slot: Any) -> None:
        self.slot = slot

    def begin(self, stage: int, index: int, count: int = 1) -> None:
        """Record that item ``index`` of the task entered stage ``stage`` now."""
        s = self.slot
        s[SEQ] += 1.0
        s[STAGE] = stage
        s[INDEX] = index
        s[COUNT] = count
        s[START] = time.monotonic()
        s[SEQ] += 1.0

    def start_job(self, job_id: int) -> None:
        """Record that a new task starts (no stage yet)."""
        s = self.slot
        s[SEQ] += 1.0
        s[JOB] = job_id
        s[STAGE] = -1
        s[INDEX] = -1
        s[COUNT] = 0
        s[START] = time.monotonic()
        s[SEQ] += 1.0

    def idle(self) -> None:
        """Record that no task is running."""
        s = self.slot
        s[SEQ] += 1.0
        s[INDEX] = IDLE
        s[SEQ] += 1.0


def read_slot(slot: Any) -> tuple[int, int, int, int, float] | None:
    """Return ``(job, stage, index, count, start)`` from a slot, or None if mid-write."""
    seq = slot[SEQ]
    if int(seq) % 2:
        return None
    values = (int(slot[JOB]), int(slot[STAGE]), int(slot[INDEX]), int(slot[COUNT]), slot[START])
    if slot[SEQ] != seq:
        return None
    return values


# -- the worker process ----------------------------------------------------------------------


def _on_sigterm(signum: int, frame: Any) -> None:
    """Exit now, unless a journaled task is committing: then right after it (30 s at most)."""
    if critical.depth:
        type(critical).deferred = True
        signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(30)
        return
    _exit_group(128 + signum)


def _exit_group(code: int) -> None:
    """Exit at once, taking along every process the node functions started.

    Called from the driver-watching thread too, where ``signal.signal`` is not allowed:
    then this process may get the polite SIGTERM as well, which ends it just the same.
    """
    try:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.killpg(os.getpid(), signal.SIGTERM)  # children first, politely...
    except (OSError, ValueError):
        pass
    try:
        os.killpg(os.getpid(), signal.SIGKILL)  # ...then for sure (this process included)
    except OSError:
        pass
    os._exit(code)


def _watch_driver(driver_pid: int) -> None:
    """Exit with the whole process group when the driver process dies.

    Linux's parent-death signal follows the *thread* that started a process, and a worker
    started by a fork server is not the driver's child at all, so the worker watches the
    driver itself: with a pidfd where the kernel has them, else by polling its pid.
    """
    try:
        fd = os.pidfd_open(driver_pid)
    except (AttributeError, OSError):
        fd = -1
    if fd >= 0:
        while True:
            try:
                ready, _, _ = select.select([fd], [], [])
            except InterruptedError:
                continue
            if ready:
                break
    else:
        while True:
            time.sleep(0.2)
            try:
                os.kill(driver_pid, 0)
            except ProcessLookupError:
                break
            except OSError:
                pass
    # A journaled task commits its outputs before the worker goes (30 s at most): the
    # journal then holds exactly what was done when the driver died.
    deadline = time.monotonic() + 30
    while critical.depth and time.monotonic() < deadline:
        type(critical).deferred = True
        time.sleep(0.02)
    _exit_group(70)


def _allow_children() -> None:
    """Let node functions start processes of their own.

    The driver starts workers as daemonic processes, so that multiprocessing's exit
    handler never waits for them; multiprocessing forbids children to daemonic processes,
    for the reason that they could be orphaned. A worker cleans up its own children (its
    process group dies with it), so it marks itself non-daemonic from the inside.
    """
    import multiprocessing

    multiprocessing.current_process()._config["daemon"] = False  # type: ignore[attr-defined]


def _task_failure(spec: StepSpec, keys: Any, values: Any, exc: BaseException) -> TaskResult:
    """Return a result in which every item failed in the first stage with ``exc``."""
    name = spec.stages[0].name
    n = len(keys)
    vals = values if isinstance(values, list) and len(values) == n else [None] * n
    out = [
        v if type(v) is Failure else failure_from_exception(name, k, exc, v)
        for k, v in zip(keys, vals)
    ]
    failed = [f for f, v in zip(out, vals) if type(v) is not Failure]
    stats = [StageStats(n_in=n) for _ in spec.stages]
    stats[0].n_failed = len(failed)
    stats[0].first_failure = failed[0] if failed else None
    return TaskResult(out, stats, dirty=True)


def _redirect_output(outputs: tuple[Connection, Connection] | None) -> None:
    """Send this process's stdout and stderr (file descriptors 1 and 2) to the driver.

    The driver prints what arrives line by line, above its live display, so output of
    node functions (and of anything they start) reaches the terminal whole.
    """
    if outputs is None:
        return
    for fd, conn, stream in ((1, outputs[0], sys.stdout), (2, outputs[1], sys.stderr)):
        try:
            if stream is not None:
                stream.flush()
            os.dup2(conn.fileno(), fd)
            conn.close()
            if isinstance(stream, io.TextIOWrapper):
                stream.reconfigure(line_buffering=True)
        except (OSError, ValueError):  # pragma: no cover - keep the inherited streams
            pass


def worker_main(
    conn: Connection,
    initializer: bytes | None = None,
    slot: Any = None,
    driver_pid: int | None = None,
    outputs: tuple[Connection, Connection] | None = None,
) -> None:
    """Receive tasks, run them, send results back, until the pipe closes.

    A failing initializer is reported to the driver once, with its traceback, and the
    worker exits with code 1: the driver then fails the run with a PoolError instead of
    restarting workers that cannot start.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        os.setpgid(0, 0)
    except OSError:  # pragma: no cover - already a group leader
        pass
    _redirect_output(outputs)
    _allow_children()
    if driver_pid is not None:
        threading.Thread(
            target=_watch_driver, args=(driver_pid,), name="papy-watch-driver", daemon=True
        ).start()
    if initializer is not None:
        try:
            pickle.loads(initializer)()
        except BaseException as exc:
            text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
            try:
                conn.send_bytes(frame(("init-failed", text), _pickled_error(exc)))
            except OSError:
                pass
            os._exit(1)
    tracker = SlotTracker(slot) if slot is not None else None
    if tracker is not None:
        tracker.idle()  # started: from now on a death is the fault of a task, if any
    specs: dict[str, StepSpec | BaseException] = {}
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        header, body = unframe(data)
        if header[0] is None:  # ("release", spec ids): runs that ended
            for spec_id in header[1]:
                specs.pop(spec_id, None)
            continue
        job_id, spec_id, spec_blob, keys, jkeys, dirty, every_item, drop = header
        for old in drop:  # the driver's cache of this worker's functions is full
            specs.pop(old, None)
        if spec_blob is not None:
            try:
                specs[spec_id] = pickle.loads(spec_blob)
            except BaseException as exc:
                specs[spec_id] = exc
        spec = specs[spec_id]
        if isinstance(spec, BaseException):
            # The node's function cannot be loaded here (an ImportError, say): the driver
            # fails the task's items with that error; the worker itself is fine.
            header_out: Any = (job_id, "unloadable")
            payload = _pickled_error(spec)
        else:
            header_out = job_id
            if tracker is not None:
                tracker.every_item = bool(every_item)
                tracker.start_job(job_id)
            try:
                values = pickle.loads(body)
            except Exception as exc:
                err = TypeError(
                    f"the item could not be rebuilt in the worker process "
                    f"({qualified_type(exc)}: {exc}); is its type importable there?"
                )
                result = _task_failure(spec, keys, None, err)
            else:
                result = run_task(spec, keys, values, jkeys, dirty, tracker)
            if tracker is not None:
                tracker.idle()
            payload = _encode_result(result, spec, keys)
        try:
            conn.send_bytes(frame(header_out, payload))
        except (BrokenPipeError, OSError):
            return


def _pickled_error(exc: BaseException) -> bytes:
    """Pickle an exception for the driver, as itself when it travels, else as text."""
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        body = dumps(exc)
        pickle.loads(body)
        return body
    except Exception:
        return dumps(RuntimeError(f"{qualified_type(exc)}: {exc}\n{text}"))
