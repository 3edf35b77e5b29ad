"""DaskPool: run tasks on a Dask distributed cluster, beside local pools.

A pipeline moves from a laptop to a cluster by giving some nodes (or the whole pipeline)
a ``DaskPool``; nothing else changes. PaPy does not speak its own protocol to remote
hosts: Dask schedules the tasks, moves the data, and re-runs a task whose worker died.

- Each task is one batch through a fused chain of nodes, so consecutive nodes on the same
  DaskPool run in one Dask task and their data stays on the worker between them.
- The step's functions are sent to the cluster once per run (``client.scatter``), not with
  every task.
- ``resources={"GPU": 1}`` makes every task of the pool wait for a worker that declares
  that resource; :meth:`DaskPool.with_resources` makes a pool for one node that shares the
  same client.
- A task whose workers keep dying (Dask's ``KilledWorker``) is split in halves until the
  item that kills them is found and reported as a :class:`~papy.WorkerCrashed` failure.
- ``timeout`` on a node is enforced from the driver: the task's items fail with
  ``TimeoutError`` and the Dask task is cancelled.

Install with ``pip install "papy[dask]"``; the rest of PaPy works without Dask.
"""

from __future__ import annotations

import logging
import pickle
import threading
from concurrent.futures import Future
from typing import Any

import cloudpickle

from papy._errors import PoolError, WorkerCrashed
from papy._task import StepSpec, TaskResult, run_task
from papy.pools._base import Pool, Task, merge_parts


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError:  # pragma: no cover - depends on the environment
        raise PoolError('DaskPool needs Dask distributed: pip install "papy[dask]"') from None
    return distributed


log = logging.getLogger("papy")

_spec_cache: dict[str, StepSpec] = {}


def _run_on_worker(
    spec_id: str, spec_blob: bytes, keys: Any, values: list[Any], jkeys: Any, dirty: bool = True
) -> TaskResult:
    """Run a task on a Dask worker; the step's functions are unpickled once per worker."""
    spec = _spec_cache.get(spec_id)
    if spec is None:
        spec = _spec_cache[spec_id] = pickle.loads(spec_blob)
    return run_task(spec, keys, values, jkeys, dirty)


class DaskPool(Pool):
    """Run tasks on a Dask cluster given by its address (``tcp://host:port``) or a Client."""

    kind = "dask"
    target_task_s = 0.05  # Dask costs a few milliseconds per task: ship bigger batches
    prefetch = 3  # tasks per worker thread in flight, to hide the scheduler's latency

    def __init__(
        self,
        address_or_client: Any,
        *,
        resources: dict[str, float] | None = None,
        workers: int | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        super().__init__()
        self._target = address_or_client
        self.resources = dict(resources) if resources else None
        self._workers_hint = workers
        self.workers = workers or 1
        self.connect_timeout = connect_timeout
        self.client: Any = None
        self._own_client = False
        self._specs: dict[str, bytes] = {}
        self._live: dict[int, Any] = {}
        self._lock = threading.Lock()
        self._parent: DaskPool | None = None

    def with_resources(self, resources: dict[str, float]) -> DaskPool:
        """Return a pool on the same cluster whose tasks need ``resources`` (per node)."""
        child = DaskPool(
            self._target,
            resources=resources,
            workers=self._workers_hint,
            connect_timeout=self.connect_timeout,
        )
        child._parent = self
        return child

    def describe(self) -> str:
        label = f"dask x{self.workers}".replace(" x", "x")
        if self.resources:
            label += " " + ",".join(f"{k}={v:g}" for k, v in self.resources.items())
        return label

    # -- lifecycle ---------------------------------------------------------------------------

    def _start(self) -> None:
        distributed = _import_distributed()
        if self._parent is not None:
            self._parent.start()
            self.client = self._parent.client
        elif isinstance(self._target, distributed.Client):
            self.client = self._target
        else:
            address = str(self._target)
            try:
                self.client = distributed.Client(
                    address, timeout=self.connect_timeout, set_as_default=False
                )
            except (OSError, TimeoutError) as exc:
                raise PoolError(
                    f"cannot reach the Dask scheduler at {address} within "
                    f"{self.connect_timeout:g} s ({type(exc).__name__}: {exc}); is it running, "
                    "and is the address right?"
                ) from None
            self._own_client = True
        if self._workers_hint is None:
            nthreads = self.client.nthreads()
            if self.resources:
                info = self.client.scheduler_info()["workers"]
                nthreads = {
                    w: n
                    for w, n in nthreads.items()
                    if all(
                        info.get(w, {}).get("resources", {}).get(r, 0) >= q
                        for r, q in self.resources.items()
                    )
                }
            self.workers = max(1, sum(nthreads.values()))

    def _close(self) -> None:
        with self._lock:
            live = list(self._live.values())
            self._live.clear()
        if self.client is not None and live:
            try:
                self.client.cancel(live)
            except Exception:
                pass
        if self._own_client and self.client is not None:
            try:
                self.client.close(timeout=5)
            except Exception:
                pass

    # -- submitting --------------------------------------------------------------------------

    def _spec_blob(self, spec: StepSpec) -> bytes:
        # Pickled once per run; a few kilobytes that travel with each task, so a task can
        # run on any worker, including one that joined after a crash.
        blob = self._specs.get(spec.id)
        if blob is None:
            blob = self._specs[spec.id] = cloudpickle.dumps(spec)
        return blob

    def _submit(self, task: Task) -> Future[TaskResult]:
        out: Future[TaskResult] = Future()
        out.set_running_or_notify_cancel()
        self._send(task, out.set_result)
        return out

    def _send(self, task: Task, done: Any) -> None:
        distributed = _import_distributed()
        try:
            dfut = self.client.submit(
                _run_on_worker,
                task.spec.id,
                self._spec_blob(task.spec),
                task.keys,
                task.values,
                task.jkeys,
                task.dirty,
                pure=False,
                resources=self.resources,
            )
        except Exception as exc:
            done(task.fail_all(PoolError(f"could not submit to Dask: {exc}")))
            return
        key = id(dfut)
        with self._lock:
            self._live[key] = dfut
        finished = threading.Event()
        timer = None
        if task.timeout is not None:
            limit = task.timeout * max(1, len(task))

            def expire() -> None:
                if finished.is_set():
                    return
                finished.set()
                dfut.cancel()
                done(
                    task.fail_all(
                        TimeoutError(
                            f"item exceeded the node's timeout of {task.timeout:g} s on the Dask "
                            "cluster; the task was cancelled"
                        )
                    )
                )

            timer = threading.Timer(limit, expire)
            timer.daemon = True
            timer.start()

        def callback(f: Any) -> None:
            with self._lock:
                self._live.pop(key, None)
            if finished.is_set():
                return
            finished.set()
            if timer is not None:
                timer.cancel()
            if f.status == "finished":
                done(f.result())
                return
            if f.status == "cancelled":
                done(task.fail_all(PoolError("the Dask task was cancelled")))
                return
            try:
                f.result()
            except distributed.KilledWorker as exc:
                self._killed(task, done, exc)
            except Exception as exc:
                done(task.fail_all(PoolError(f"the Dask task failed: {exc!r}")))

        dfut.add_done_callback(callback)

    def _killed(self, task: Task, done: Any, exc: BaseException) -> None:
        """Split a task whose workers kept dying until the guilty item is alone."""
        n = len(task)
        log.warning("Dask workers died running a task of %d item(s): %s", n, exc)
        if n == 1:
            done(
                task.fail_all(
                    WorkerCrashed(
                        f"Dask workers died running this item ({exc}); "
                        "it was tried on several workers"
                    )
                )
            )
            return
        half = n // 2
        for part, on_done in zip((task.slice(0, half), task.slice(half, n)), merge_parts(2, done)):
            self._send(part, on_done)
