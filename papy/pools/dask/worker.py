"""What a DaskPool runs inside Dask workers: its tasks, and its per-pool state there.

Each :class:`~papy.DaskPool` registers one :class:`StepCache` worker plugin under a name of
its own, so every worker (also one that joins later) holds, for that pool only:

- the steps' functions, unpickled once per worker and step rather than with every task,
  dropped by :meth:`DaskPool.release <papy.pools.dask.DaskPool.release>` at the end of each
  run and with the plugin when the pool closes;
- which of the pool's tasks started here (``claim``) and which the driver withdrew before
  they started (``withdraw``): a task starts only if not withdrawn, and is withdrawn only
  if not started, so a cancelled run loses no item that ran.

This module imports Dask distributed, so it is imported only where Dask runs.
"""

from __future__ import annotations

import pickle
import threading
from collections.abc import Collection, Mapping
from typing import Any

from distributed import WorkerPlugin, get_worker

from papy._task import StepSpec, TaskResult, run_task


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
) -> TaskResult | None:
    """Run task ``number`` of a pool whose StepCache plugin is called ``cache``.

    Returns None, running nothing, when the driver withdrew the task before it started.
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
    return run_task(spec, keys, values, jkeys, dirty)


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
