"""ProcessPool: run tasks in worker processes, surviving crashes and stuck items.

Worker lifecycle:

- **Start.** Workers are started by ``forkserver`` on Linux (``spawn`` elsewhere), with the
  worker module preloaded in the fork server, so a new worker never inherits the driver's
  threads or the locks they hold, and starts in milliseconds. ``start_method="fork"`` is
  faster still but copies the driver's locks: a lock held by another driver thread (a
  logging handler, say) at that moment deadlocks the worker. Each worker leads its own
  process group and may start processes of its own (``multiprocessing``, a nested pool).
- **Run.** Each worker has a private pipe, its own sender thread (so a large task sent to
  one worker never waits on another), and holds at most two tasks (one running, one
  queued), so the pool always knows what a worker was doing when it died. A shared-memory
  slot per worker tells which item of which node it is running, and since when, and which
  task it took up last (the worker claims each task there before starting it, so
  ``cancel`` can withdraw one still waiting in its pipe).
- **Timeouts.** An item of a node with ``timeout=T`` that runs longer than ``T`` seconds
  from its own start (``k*T`` for a call of a ``batched=True`` node on ``k`` items) fails
  with ``TimeoutError``; the driver notices within :data:`TIMEOUT_GRACE` seconds, kills the
  worker's process group and replaces the worker, and the item's batch-mates run again.
- **Crashes.** A worker that dies (SIGKILL, segfault, ``os._exit``, the OOM killer) is
  noticed through its process sentinel at once and replaced. The task it ran is run again
  with every item announced in its slot, so a second crash names the item; that item
  alone is run once more to confirm, then reported as a :class:`~papy.WorkerCrashed`
  failure; its batch-mates complete normally. Queued tasks are re-sent unchanged.
- **Failure to start.** A failing ``initializer`` stops the run with a
  :class:`~papy.PoolError` carrying its exception and traceback; workers that die before
  doing anything are replaced at most a few times, then the pool gives up the same way.
  A node function that cannot be loaded in a worker (an ``ImportError``) makes that node's
  items Failures carrying the error.
- **End.** ``close()``, garbage collection of the pool, and interpreter exit all stop the
  workers and their children. A worker whose driver dies (even by SIGKILL) kills its
  process group and exits within a fraction of a second.

Functions are shipped once per worker (cloudpickle, except that functions and classes of the
user's own file travel by reference and live in that file's module namespace in the
worker, as under ``python file.py``); items and results use pickle.

- **Large data.** A buffer of :data:`SHM_THRESHOLD` bytes (1 MiB) or more in an item or a
  result (a NumPy array, ``bytes``, ``bytearray``, a ``memoryview``) travels through shared
  memory, not through the pipes: the worker that makes it writes it once, the driver maps
  it and passes on only a handle, and the worker that consumes it maps it (see
  :mod:`papy.pools._shm`). A process that dies frees what it held; nothing is left in
  ``/dev/shm``.
"""

from __future__ import annotations

import atexit
import functools
import multiprocessing as mp
import multiprocessing.spawn as mp_spawn
import multiprocessing.util  # its exit handler must be registered before ours
import os
import sys
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any

from papy._task import TaskResult
from papy.pools import _functions
from papy.pools._base import Pool, Task
from papy.pools._driver import TIMEOUT_GRACE, State
from papy.pools._functions import dumps_code
from papy.pools._heap import HEAP_KEEP, prepare_worker
from papy.pools._shm import SHM_THRESHOLD

__all__ = ["SHM_THRESHOLD", "TIMEOUT_GRACE", "ProcessPool"]

_PRELOAD = ["papy.pools._worker", "cloudpickle"]


def _prepare_without_unguarded_main(get: Callable[[str], dict[str, Any]]) -> Any:
    """Wrap multiprocessing's preparation data so workers skip an unguarded ``__main__``.

    See :func:`papy.pools._functions.main_is_guarded`: only processes named ``papy-worker``
    and only when the driver's script has no ``if __name__ == "__main__":`` block; the
    fork server's warm-up process (``papy-warm-up``, which runs nothing) never loads it.
    """

    def get_preparation_data(name: str) -> dict[str, Any]:
        data = get(name)
        if name == "papy-warm-up" or (name == "papy-worker" and not _functions.main_is_guarded()):
            data.pop("init_main_from_path", None)
            data.pop("init_main_from_name", None)
        return data

    get_preparation_data.__wrapped__ = get  # type: ignore[attr-defined]
    return get_preparation_data


if not hasattr(mp_spawn.get_preparation_data, "__wrapped__"):
    mp_spawn.get_preparation_data = _prepare_without_unguarded_main(mp_spawn.get_preparation_data)


def _default_start_method() -> str:
    """Return ``forkserver`` where it exists (Linux and most POSIX systems), else ``spawn``.

    Neither copies the driver's threads or locks into a worker; with the worker module
    preloaded in the fork server, a worker starts in a few milliseconds.
    """
    if sys.platform.startswith("linux") and "forkserver" in mp.get_all_start_methods():
        return "forkserver"
    return "spawn"


_OPEN: weakref.WeakSet[State] = weakref.WeakSet()


def _close_all_at_exit() -> None:
    """Close every open process pool before multiprocessing's own exit handler runs.

    That handler joins child processes; closing first means it finds none, and no pool
    thread is left to start a replacement worker while it waits.
    """
    for state in list(_OPEN):
        state.close()


atexit.register(_close_all_at_exit)


class ProcessPool(Pool):
    """Run tasks in ``workers`` processes (default: one per core).

    ``start_method`` is ``"forkserver"`` on Linux by default (``"spawn"`` elsewhere): a
    worker does not inherit the driver's threads or locks. ``"fork"`` starts workers a
    little faster, but a lock held by any other thread of the driver when a worker is
    forked (a logging handler, a database driver) stays locked forever in that worker.
    ``initializer`` runs once in each worker before any task; if it raises, the run stops
    with a :class:`~papy.PoolError` carrying its exception and traceback.

    ``shm_threshold`` (bytes, default :data:`SHM_THRESHOLD`, 1 MiB) is the size from which a
    buffer in an item or a result (a NumPy array, ``bytes``, ``bytearray``, a
    ``memoryview``) travels between processes through shared memory instead of the pipes;
    ``None`` sends every byte through the pipes. Values received from workers are then
    views over shared memory that stay valid as long as they are referenced.

    ``heap_keep`` (an int of bytes, default :data:`~papy.pools._heap.HEAP_KEEP`, 64 MiB;
    glibc only) is how much freed memory a worker's heap may hold before the worker gives
    it back to the system, and allocations below half of it come from the heap: a node
    that makes large arrays batch after batch then reuses their pages instead of faulting
    fresh ones in (see :mod:`papy.pools._heap`). ``None`` leaves the C library's own
    behaviour; 0 gives freed memory back at once. Each thread that allocates may have a
    heap of its own, so a worker whose node runs many threads may hold that much per
    thread; never more than the worker once used at its peak. Raises TypeError for a
    value that is not an int, ValueError for a negative one.
    """

    kind = "process"
    groups_scatter = False  # a sub-item's crash must name the sub-item (see Pool)
    target_task_s = 0.05
    item_timeouts = True  # the worker's slot times every item from its own start

    def __init__(
        self,
        workers: int | None = None,
        start_method: str | None = None,
        *,
        initializer: Callable[[], Any] | None = None,
        shm_threshold: int | None = SHM_THRESHOLD,
        heap_keep: int | None = HEAP_KEEP,
    ) -> None:
        super().__init__()
        if workers is not None and workers < 1:
            raise ValueError(f"ProcessPool needs at least one worker, got {workers}")
        self.workers = workers or os.cpu_count() or 1
        self.start_method = start_method or _default_start_method()
        self._ctx: Any = mp.get_context(self.start_method)
        if self.start_method == "forkserver":
            self._ctx.set_forkserver_preload(_PRELOAD)
        if shm_threshold is not None and shm_threshold < 1:
            raise ValueError(f"shm_threshold must be at least 1 byte or None, got {shm_threshold}")
        self.shm_threshold = shm_threshold
        self.heap_keep = _bytes_or_none("heap_keep", heap_keep)
        self._initializer = initializer
        self._state: State | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def restarts(self) -> int:
        """Return how many workers were replaced after a crash or a timeout."""
        return self._state.restarts if self._state is not None else 0

    def _start(self) -> None:
        init = None
        if self._initializer is not None or self.heap_keep is not None:
            init = dumps_code(functools.partial(prepare_worker, self.heap_keep, self._initializer))
        state = State(self.workers, self._ctx, init, self.shm_threshold)
        state.start()
        _OPEN.add(state)
        self._state = state
        # The pool's threads only know the state, so an unclosed pool is collected, and
        # closing the state then stops its workers.
        self._finalizer = weakref.finalize(self, state.close)

    def _submit(self, task: Task) -> Future[TaskResult]:
        assert self._state is not None
        return self._state.submit(task)

    def _close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()

    def cancel(self, futures: Iterable[Future[TaskResult]]) -> int:
        """Withdraw the given tasks that have not started; return how many were withdrawn.

        A task waits in the driver until a worker has room for it, then in the worker's
        pipe (each worker holds one running task and one waiting); both are withdrawn:
        the future is cancelled and the items never run. The worker claims a task in its
        slot, under a lock it shares with the driver, before starting it, so a task is
        either withdrawn or run, never both. Tasks already running complete as usual.
        """
        futures = list(futures)
        if self._state is None:
            return super().cancel(futures)
        return self._state.cancel(futures)

    @property
    def shared_bytes(self) -> int:
        """Return the bytes that crossed between processes through shared memory."""
        return self._state.shared_bytes if self._state is not None else 0

    def release(self, spec_ids: Iterable[str]) -> None:
        """Forget the functions of steps whose run ended, here and in every worker."""
        if self._state is not None and not self._closed:
            self._state.release(spec_ids)

    def codec_seconds(self) -> dict[str, float]:
        """Return seconds this pool's threads spent pickling tasks and unpickling results."""
        s = self._state
        return {"pickle": s.pickle_s if s else 0.0, "unpickle": s.unpickle_s if s else 0.0}

    def pids(self) -> list[int]:
        """Return the process ids of the live workers (for monitoring and tests)."""
        return self._state.pids() if self._state is not None else []


if sys.platform == "win32":  # pragma: no cover
    raise ImportError("papy.pools.process needs a POSIX system")


def _bytes_or_none(name: str, value: object) -> int | None:
    """Return ``value``, a size in bytes (an int, not a bool) or None; raise otherwise."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int number of bytes or None, not {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be at least 0 bytes or None, got {value}")
    return value
