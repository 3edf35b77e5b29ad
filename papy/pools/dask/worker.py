"""What a DaskPool runs inside Dask workers: its tasks, and its per-pool state there.

Each :class:`~papy.DaskPool` registers one :class:`StepCache` worker plugin under a name of
its own, so every worker (also one that joins later) holds, for that pool only:

- the steps' functions, unpickled once per worker and step rather than with every task,
  dropped by :meth:`DaskPool.release <papy.pools.dask.DaskPool.release>` at the end of each
  run and with the plugin when the pool closes;
- which of the pool's tasks started here (``claim``) and which the driver withdrew before
  they started (``withdraw``): a task starts only if not withdrawn, and is withdrawn only
  if not started, so a cancelled run loses no item that ran.

A task's result travels back pickled by the worker itself (:func:`encode_result`), so an
output that cannot be pickled is that item's ``TypeError`` Failure, never a result Dask
cannot send. A node's ``timeout`` is enforced here, on the worker, from each item's own
start (:func:`run_timed`), so time a task waits in Dask's queue never counts against it.

This module imports Dask distributed, so it is imported only where Dask runs.
"""

from __future__ import annotations

import contextvars
import pickle
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import cloudpickle
from distributed import WorkerPlugin, get_worker

from papy._items import NO_INPUT, Failure, Key, failure_from_exception, qualified_type
from papy._task import StepSpec, TaskResult, Tracker, run_task
from papy.pools._messages import fail_unpicklable
from papy.pools.dask.shipping import cloud_unpicklable

#: Seconds between two looks of a timed task's watchdog at its current item: a late item
#: fails within its node's timeout plus this.
TICK_S = 0.05


class StepCache(WorkerPlugin):
    """One pool's state on one worker: its steps, and the tasks started or withdrawn.

    Tasks are numbered by the pool (``number``), per step (``spec_id``). The numbers of
    the tasks that started stay until the step is forgotten, so the driver can tell a
    task that already finished (whose result may still be on its way) from one that
    never started. A copy sent to a worker starts empty.
    """

    idempotent = False

    def __init__(self, name: str) -> None:
        self.name = name
        self._reset()

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self.specs: dict[str, StepSpec] = {}
        self.started: dict[str, set[int]] = {}
        self.withdrawn: dict[str, set[int]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.name = state["name"]
        self._reset()

    def teardown(self, worker: Any) -> None:
        """Drop everything when the pool closes (the plugin is unregistered)."""
        with self._lock:
            self.specs.clear()
            self.started.clear()
            self.withdrawn.clear()

    def sizes(self) -> dict[str, int]:
        """Return how many steps, started and withdrawn task numbers are held."""
        with self._lock:
            return {
                "specs": len(self.specs),
                "started": sum(len(s) for s in self.started.values()),
                "withdrawn": sum(len(s) for s in self.withdrawn.values()),
            }

    def claim(self, spec_id: str, number: int) -> bool:
        """Mark task ``number`` started; return False (do not run it) if it was withdrawn."""
        with self._lock:
            if number in self.withdrawn.get(spec_id, ()):
                return False
            self.started.setdefault(spec_id, set()).add(number)
            return True

    def withdraw(self, tasks: Mapping[str, Collection[int]]) -> set[int]:
        """Withdraw the tasks that did not start here; return the numbers that did."""
        started: set[int] = set()
        with self._lock:
            for spec_id, numbers in tasks.items():
                here = self.started.get(spec_id, set())
                started.update(n for n in numbers if n in here)
                self.withdrawn.setdefault(spec_id, set()).update(
                    n for n in numbers if n not in here
                )
        return started

    def spec(self, spec_id: str, blob: bytes) -> StepSpec:
        """Return step ``spec_id``, unpickling ``blob`` the first time."""
        with self._lock:
            spec = self.specs.get(spec_id)
        if spec is None:
            spec = pickle.loads(blob)
            with self._lock:
                spec = self.specs.setdefault(spec_id, spec)
        return spec

    def forget(self, spec_ids: Collection[str]) -> None:
        """Drop the steps ``spec_ids`` (a run ended) and the numbers of their tasks."""
        with self._lock:
            for spec_id in spec_ids:
                self.specs.pop(spec_id, None)
                self.started.pop(spec_id, None)
                self.withdrawn.pop(spec_id, None)


def _cache(name: str, worker: Any = None) -> StepCache | None:
    plugin = (worker or get_worker()).plugins.get(name)
    return plugin if isinstance(plugin, StepCache) else None


def run_on_worker(
    cache: str,
    spec_id: str,
    spec_blob: bytes,
    number: int,
    keys: Any,
    values: Any,
    jkeys: Any,
    dirty: bool = True,
    packed: bool = False,
) -> bytes | None:
    """Run task ``number`` of a pool whose StepCache plugin is called ``cache``.

    Returns the pickled :class:`~papy._task.TaskResult` (see :func:`encode_result`), or
    None, running nothing, when the driver withdrew the task before it started.
    ``packed`` values are one pickle made by the driver (when user modules were shipped by
    value, items may be instances of their classes, which the worker cannot import).
    """
    plugin = _cache(cache)
    if plugin is None:  # not registered here (yet): run uncached; it cannot be withdrawn
        spec: StepSpec = pickle.loads(spec_blob)
    elif not plugin.claim(spec_id, number):
        return None
    else:
        spec = plugin.spec(spec_id, spec_blob)
    if packed:
        values = pickle.loads(values)
    if any(s.timeout is not None for s in spec.stages):
        result = run_timed(spec, keys, list(values), jkeys, dirty)
    else:
        result = run_task(spec, keys, values, jkeys, dirty)
    return encode_result(result, spec, keys)


def encode_result(result: TaskResult, spec: StepSpec, keys: Sequence[Key]) -> bytes:
    """Pickle ``result`` for the driver; an output that cannot be pickled fails its item.

    Such an output becomes a ``TypeError`` Failure of the step's last node (whose output
    the task returns), naming the item; its batch-mates travel as they are. Pickled here
    rather than by Dask, which would leave a result it cannot send on the worker and the
    driver's future waiting for it.
    """
    try:
        return cloudpickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        pass
    st = result.stats[-1] if result.stats else None
    values = fail_unpicklable(
        spec.stages[-1].name,
        keys,
        result.values,
        lambda value, exc: (
            f"the result of type {qualified_type(value)} cannot be sent back from "
            f"the Dask worker ({qualified_type(exc)}: {exc}); return plain data, "
            "or use a ThreadPool for this node"
        ),
        check=cloud_unpicklable,
        inputs=False,
    )
    if st is not None:
        for old, new in zip(result.values, values):
            if new is not old:
                st.failed(new)
    result.values = values
    result.dirty = True  # the driver must see (and deliver as failed) the Failures made here
    for stats in result.stats:
        stats.keep_firsts(lambda f: cloud_unpicklable(f) is None)
    return cloudpickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)


class ItemClock(Tracker):
    """Which item of which stage a timed task runs, and since when (read by its watchdog).

    ``now`` is ``(stage, index, count, since)``, ``since`` from ``time.monotonic()``.
    ``lock`` decides, once, whether the task finished or was abandoned.
    """

    def __init__(self) -> None:
        self.now: tuple[int, int, int, float] = (0, -1, 0, 0.0)
        self.abandoned = False
        self.finished = False
        self.lock = threading.Lock()

    def begin(self, stage: int, index: int, count: int = 1) -> None:
        self.now = (stage, index, count, time.monotonic())


def run_timed(
    spec: StepSpec, keys: Sequence[Key], values: list[Any], jkeys: Any, dirty: bool
) -> TaskResult:
    """Run a task with a timed stage, failing each item that overruns its node's timeout.

    The task runs in a thread of its own, watched from the Dask task's thread every
    ``TICK_S`` seconds; each item is timed from its own start (``k * timeout`` for one
    call of a ``batched=True`` node on ``k`` items). A thread cannot be stopped, so when
    an item overruns, its thread is abandoned (it never reports, nor commits to a
    journal; its call goes on in the background on the worker until it returns), that
    item becomes a ``TimeoutError`` Failure, and the task runs again for its batch-mates.
    """
    while True:
        clock = ItemClock()
        box: list[Any] = []
        ended = threading.Event()
        context = contextvars.copy_context()

        def body(values: list[Any] = values, dirty: bool = dirty, clock: ItemClock = clock) -> None:
            try:
                out: Any = context.run(run_task, spec, keys, values, jkeys, dirty, clock)
            except BaseException as exc:  # handed to the Dask task's thread
                out = exc
            with clock.lock:
                if not clock.abandoned:
                    clock.finished = True
                    box.append(out)
            ended.set()

        threading.Thread(target=body, name="papy-dask-timed", daemon=True).start()
        overran: tuple[int, int, int] | None = None
        while not ended.wait(TICK_S):
            stage, index, count, since = clock.now
            limit = spec.stages[stage].timeout
            if index < 0 or limit is None or time.monotonic() - since <= limit * max(1, count):
                continue
            with clock.lock:
                if not clock.finished:
                    clock.abandoned = True
                    overran = (stage, index, count)
            break
        if overran is None:
            ended.wait()
            out = box[0]
            if isinstance(out, BaseException):
                raise out
            result: TaskResult = out  # its stages count the late items they were given
            return result
        stage, index, count = overran
        node = spec.stages[stage].name
        limit = spec.stages[stage].timeout or 0.0
        values = list(values)
        for i in range(index, min(len(values), index + max(1, count))):
            if type(values[i]) is Failure:
                continue
            error = TimeoutError(
                f"item exceeded the node's timeout of {limit:g} s on the Dask worker (its "
                "call was abandoned; it may still be running there)"
            )
            given = values[i] if stage == 0 else NO_INPUT  # a later node's input is not held
            values[i] = failure_from_exception(node, keys[i], error, given)
        dirty = True  # the re-run must skip the late items


def withdraw(cache: str, tasks: Mapping[str, Collection[int]], dask_worker: Any) -> list[int]:
    """Run by ``client.run``: withdraw ``tasks`` on this worker; return those that started."""
    plugin = _cache(cache, dask_worker)
    return sorted(plugin.withdraw(tasks)) if plugin is not None else []


def forget(cache: str, spec_ids: Collection[str], dask_worker: Any) -> None:
    """Run by ``client.run``: drop the steps ``spec_ids`` from this worker's cache."""
    plugin = _cache(cache, dask_worker)
    if plugin is not None:
        plugin.forget(spec_ids)


def sizes(cache: str, dask_worker: Any) -> dict[str, int] | None:
    """Run by ``client.run``: return the sizes of the pool's cache on this worker."""
    plugin = _cache(cache, dask_worker)
    return plugin.sizes() if plugin is not None else None
