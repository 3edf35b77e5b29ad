"""DaskPool: run tasks on a Dask distributed cluster, beside local pools.

Dask schedules the tasks, moves the data, and re-runs a task whose worker died. A task is
one batch through a fused chain of nodes, whose functions are pickled once per run and kept,
per pool, in each worker's cache until the run ends. A task whose workers keep dying is split
until the item at fault is found; a node's ``timeout`` is enforced from the driver;
:meth:`DaskPool.cancel` withdraws a stopped run's tasks that have not started.
"""

from __future__ import annotations

import itertools
import logging
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, InvalidStateError
from typing import Any

from papy._errors import PoolError, WorkerCrashed
from papy._task import StepSpec, TaskResult
from papy.pools._base import Pool, Task, merge_parts
from papy.pools.dask.cluster import (
    ClusterWatch,
    check_queue,
    connect,
    import_distributed,
    threads_per_job,
    worker_threads,
)
from papy.pools.dask.inflight import Sent, marks, withdrawable
from papy.pools.dask.shipping import can_import, dumps

log = logging.getLogger("papy")


class DaskPool(Pool):
    """Run tasks on a Dask cluster: an address (``tcp://host:port``), a Client or a Cluster.

    - ``resources``: Dask worker resources every task of this pool needs (``{"GPU": 1}``).
    - ``workers``: how many tasks to plan for at once (default: the cluster's threads).
    - ``connect_timeout``: seconds to reach the scheduler before a :class:`~papy.PoolError`.
    - ``security``: a ``distributed.Security`` (TLS certificates) for a ``tls://`` address;
      a Dask scheduler runs any code a client sends, so a cluster that others can reach
      must require certificates.
    - ``adapt=(lo, hi)`` (a Cluster object only): PaPy asks for between ``lo`` and ``hi``
      jobs (dask-jobqueue) or workers, as many as the tasks waiting for this pool need
      (three per worker thread), and goes back to ``lo`` after ``idle_timeout`` seconds
      without waiting work.
    - ``start_timeout``: seconds that work may wait with no worker at all (jobs pending in
      the queue) before the run stops with a :class:`~papy.PoolError`.

    ``own_cluster = True`` makes :meth:`close` close the Cluster too (cancelling its jobs).
    :attr:`shipped` names the user's modules sent to the workers by value.
    """

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
        security: Any = None,
        adapt: tuple[int, int] | None = None,
        idle_timeout: float = 60.0,
        start_timeout: float = 300.0,
    ) -> None:
        super().__init__()
        self._target = address_or_client
        self.security = security
        if adapt is not None and not (0 <= adapt[0] <= adapt[1] and adapt[1] >= 1):
            raise ValueError(f"adapt=(lo, hi) needs 0 <= lo <= hi and hi >= 1, not {adapt!r}")
        self.adapt = adapt
        self.idle_timeout = idle_timeout
        self.start_timeout = start_timeout
        self._cluster: Any = None
        #: close the cluster (and cancel its jobs) with the pool
        self.own_cluster = False
        self._outs: set[Future[TaskResult]] = set()
        self._broken: PoolError | None = None
        self._watch: ClusterWatch | None = None
        #: the number of jobs (or workers) asked of the cluster by ``adapt``, over time
        self.scaled: list[int] = []
        #: names of the user's modules this pool sent to the workers by value
        self.shipped: set[str] = set()
        self._importable: dict[str, bool] = {}
        self.resources = dict(resources) if resources else None
        self._workers_hint = workers
        self.workers = workers or 1
        self.connect_timeout = connect_timeout
        self.client: Any = None
        self._own_client = False
        #: pickled steps of the runs in progress, by step id (dropped by :meth:`release`)
        self._specs: dict[str, bytes] = {}
        #: Dask tasks in flight, by number
        self._live: dict[int, Sent] = {}
        #: futures whose task was split (workers died): cancel() leaves them alone
        self._split: set[Future[TaskResult]] = set()
        self._numbers = itertools.count()
        self._lock = threading.Lock()
        self._parent: DaskPool | None = None
        #: the name of this pool's StepCache plugin on the workers
        self._cache_name = f"papy-steps-{uuid.uuid4().hex}"
        self._registered = False
        self._on_worker: Any = None  # papy.pools.dask.worker, once Dask is imported

    def with_resources(self, resources: dict[str, float]) -> DaskPool:
        """Return a pool on the same cluster whose tasks need ``resources`` (per node)."""
        child = DaskPool(
            self._target,
            resources=resources,
            workers=self._workers_hint,
            connect_timeout=self.connect_timeout,
            security=self.security,
        )
        child._parent = self
        child.shipped = self.shipped
        return child

    def describe(self) -> str:
        label = f"dask x{self.workers}".replace(" x", "x")
        if self.resources:
            label += " " + ",".join(f"{k}={v:g}" for k, v in self.resources.items())
        return label

    # -- lifecycle ---------------------------------------------------------------------------

    def _start(self) -> None:
        distributed = import_distributed()
        # The worker side imports Dask's worker API: imported only now that Dask is known
        # to be installed (PaPy itself starts without Dask).
        from papy.pools.dask import worker

        self._on_worker = worker
        if self._parent is not None:
            self._parent.start()
            self.client = self._parent.client
        elif isinstance(self._target, distributed.Client):
            self.client = self._target
        elif hasattr(self._target, "scheduler_address"):  # a Cluster: local, SLURM, PBS...
            self._cluster = self._target
        else:
            self.client = connect(
                distributed, str(self._target), self.security, self.connect_timeout
            )
            self._own_client = True
        try:
            if self._cluster is not None:
                check_queue(self._cluster)
                try:
                    self.client = distributed.Client(
                        self._cluster, timeout=self.connect_timeout, set_as_default=False
                    )
                except (OSError, TimeoutError) as exc:
                    raise PoolError(f"cannot connect to {self._cluster!r}: {exc}") from None
                self._own_client = True
            self.client.register_plugin(worker.StepCache(self._cache_name), name=self._cache_name)
            self._registered = True
            if self._cluster is not None:
                self._watch_cluster()
        except BaseException:
            self._close()  # the pool never started: release the client (and jobs) now
            raise
        if self._workers_hint is None and (self._cluster is None or self.adapt is None):
            cluster = self._cluster or (self._parent._cluster if self._parent else None)
            self.workers = worker_threads(self.client, self.resources, cluster)

    def _watch_cluster(self) -> None:
        """Start watching the Cluster object (sizing its jobs); wait for a first worker."""
        if self.adapt is not None:
            self.workers = self.adapt[1] * threads_per_job(self._cluster)
        self._watch = ClusterWatch(
            self._cluster,
            self.client,
            adapt=self.adapt,
            idle_timeout=self.idle_timeout,
            start_timeout=self.start_timeout,
            prefetch=self.prefetch,
            waiting=lambda: len(self._live),
            fail=self._fail_waiting,
            scaled=self.scaled,
        )
        self._watch.begin()

    def _fail_waiting(self, exc: PoolError) -> None:
        """Stop the run: every task still waiting for this pool fails with ``exc``."""
        self._broken = exc
        with self._lock:
            outs = list(self._outs)
            live = [s.dfut for s in self._live.values()]
        if live:
            try:
                self.client.cancel(live)
            except Exception:
                pass
        for out in outs:
            if not out.done():
                try:
                    out.set_exception(exc)
                except InvalidStateError:
                    pass

    def _close(self) -> None:
        if self._watch is not None:
            self._watch.stop()
        with self._lock:
            live = [s.dfut for s in self._live.values()]
            self._live.clear()
        if self.client is not None and live:
            try:
                self.client.cancel(live)
            except Exception:
                pass
        if self._registered:
            self._registered = False
            try:  # drops this pool's steps from every worker
                self.client.unregister_worker_plugin(self._cache_name)
            except Exception:
                log.debug("could not unregister %s", self._cache_name, exc_info=True)
        self._specs.clear()
        if self._own_client and self.client is not None:
            try:
                self.client.close(timeout=5)
            except Exception:
                pass
        if self._cluster is not None and self.own_cluster:
            try:
                self._cluster.close()  # cancels every job it submitted
            except Exception:
                log.warning("could not close %r", self._cluster, exc_info=True)
        elif self._watch is not None and self.adapt is not None:
            try:
                self._watch.scale(self.adapt[0])  # give the jobs back now
            except Exception:
                pass

    def release(self, spec_ids: Sequence[str]) -> None:
        """Forget the steps of a run that ended, here and in every worker's cache."""
        with self._lock:
            held = [i for i in spec_ids if self._specs.pop(i, None) is not None]
        if not held or not self._registered or self.closed:
            return
        try:
            self.client.run(self._on_worker.forget, self._cache_name, held, on_error="ignore")
        except Exception:
            log.warning("could not drop the steps of a run from the Dask workers", exc_info=True)

    def cache_sizes(self) -> dict[str, Any]:
        """Return what this pool holds for runs in progress, to check that runs leave none.

        ``{"driver": steps pickled here, "workers": {address: {"specs": steps,
        "started": task numbers, "withdrawn": task numbers}}}``.
        """
        with self._lock:
            out: dict[str, Any] = {"driver": len(self._specs), "workers": {}}
        if self._registered:
            out["workers"] = self.client.run(self._on_worker.sizes, self._cache_name)
        return out

    # -- submitting --------------------------------------------------------------------------

    def _spec_blob(self, spec: StepSpec) -> bytes:
        # Pickled once per run; a few kilobytes that travel with each task, so a task can
        # run on any worker, including one that joined after a crash.
        with self._lock:
            blob = self._specs.get(spec.id)
        if blob is None:
            blob = dumps(spec, self.shipped, self._workers_can_import)
            with self._lock:
                blob = self._specs.setdefault(spec.id, blob)
        return blob

    def _workers_can_import(self, name: str) -> bool:
        """Tell whether every worker connected now can import module ``name`` (cached)."""
        known = self._importable.get(name)
        if known is None:
            try:
                found = self.client.run(can_import, name)
            except Exception:
                found = {}
            known = self._importable[name] = bool(found) and all(found.values())
        return known

    def _submit(self, task: Task) -> Future[TaskResult]:
        # The future stays pending until its result is in, so that cancel() can cancel it.
        out: Future[TaskResult] = Future()
        if self._broken is not None:
            out.set_exception(self._broken)
            return out
        try:
            self._spec_blob(task.spec)
        except PoolError as exc:
            out.set_exception(exc)  # the run cannot work on this cluster: stop it, once
            return out
        with self._lock:
            self._outs.add(out)

        def done(result: TaskResult) -> None:
            with self._lock:
                self._outs.discard(out)
                self._split.discard(out)
            if not out.done():
                try:
                    out.set_result(result)
                except InvalidStateError:
                    pass  # failed by _fail_waiting, or withdrawn by cancel, meanwhile

        self._send(task, done, out)
        return out

    def _send(
        self, task: Task, done: Callable[[TaskResult], None], out: Future[TaskResult]
    ) -> None:
        """Submit ``task`` (all or part of the task behind ``out``) as one Dask task."""
        number = next(self._numbers)
        try:
            spec_blob = self._spec_blob(task.spec)
            packed = bool(self.shipped)
            values: Any = (
                dumps(task.values, self.shipped, self._workers_can_import)
                if packed
                else task.values
            )
            dfut = self.client.submit(
                self._on_worker.run_on_worker,
                self._cache_name,
                task.spec.id,
                spec_blob,
                number,
                task.keys,
                values,
                task.jkeys,
                task.dirty,
                packed,
                pure=False,
                resources=self.resources,
            )
        except Exception as exc:
            done(task.fail_all(PoolError(f"could not submit to Dask: {exc}")))
            return
        sent = Sent(number, task, done, out, dfut)
        with self._lock:
            self._live[number] = sent
        if task.timeout is not None:
            sent.timer = threading.Timer(
                task.timeout * max(1, len(task)), self._expire, args=(sent,)
            )
            sent.timer.daemon = True
            sent.timer.start()
        dfut.add_done_callback(lambda f: self._landed(sent, f))

    def _expire(self, sent: Sent) -> None:
        """Fail a task that ran past its node's timeout, and cancel it on the cluster."""
        if sent.finished.is_set():
            return
        sent.finished.set()
        sent.dfut.cancel()
        sent.done(
            sent.task.fail_all(
                TimeoutError(
                    f"item exceeded the node's timeout of {sent.task.timeout:g} s on the Dask "
                    "cluster; the task was cancelled"
                )
            )
        )

    def _landed(self, sent: Sent, f: Any) -> None:
        """Hand on the outcome of a Dask task (Dask calls this in a thread of its own)."""
        with self._lock:
            self._live.pop(sent.number, None)
        if sent.finished.is_set():
            return  # timed out, withdrawn, or the pool failed: already answered
        sent.finished.set()
        if sent.timer is not None:
            sent.timer.cancel()
        task, done = sent.task, sent.done
        if f.status == "finished":
            result = f.result()
            if result is None:
                # Withdrawn on the worker by a cancel() that then kept the task (another
                # part of it had started): it must run after all.
                self._send(task, done, sent.out)
            else:
                done(result)
            return
        if f.status == "cancelled":
            done(task.fail_all(PoolError("the Dask task was cancelled")))
            return
        try:
            f.result()
        except import_distributed().KilledWorker as exc:
            self._killed(sent, exc)
        except Exception as exc:
            done(task.fail_all(PoolError(f"the Dask task failed: {exc!r}")))

    def _killed(self, sent: Sent, exc: BaseException) -> None:
        """Split a task whose workers kept dying until the guilty item is alone."""
        task, done = sent.task, sent.done
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
        with self._lock:
            # One part may be delivered while the other waits: the task is no longer
            # withdrawable as a whole.
            self._split.add(sent.out)
        for part, on_done in zip((task.slice(0, half), task.slice(half, n)), merge_parts(2, done)):
            self._send(part, on_done, sent.out)

    def cancel(self, futures: Iterable[Future[TaskResult]]) -> int:
        """Withdraw the given tasks that have not started on the cluster; return how many.

        Every worker is asked, in one round trip, to mark the tasks withdrawn unless they
        started there; a worker never starts a task marked so. A task none of whose parts
        started is withdrawn: its future is cancelled and its Dask tasks are cancelled. A
        task that started anywhere runs on and is delivered (a part of it that was marked
        is sent again). If a worker cannot answer, nothing is withdrawn.
        """
        wanted = {id(f) for f in futures}
        with self._lock:
            outs = {
                id(o): o
                for o in self._outs
                if id(o) in wanted and not o.done() and o not in self._split
            }
            parts = [s for s in self._live.values() if id(s.out) in outs]
        if not parts or not self._registered:
            return 0
        try:
            replies = self.client.run(
                self._on_worker.withdraw, self._cache_name, marks(parts), on_error="return"
            )
        except Exception:
            log.warning("could not withdraw tasks from the Dask workers", exc_info=True)
            return 0
        if any(isinstance(r, BaseException) for r in replies.values()):
            log.warning("a Dask worker did not answer; no task was withdrawn: %r", replies)
            return 0
        started = {n for r in replies.values() for n in r}
        with self._lock:
            withdrawn = withdrawable(parts, self._live.values(), started, self._split)
            for s in withdrawn:
                s.finished.set()
                del self._live[s.number]
                self._outs.discard(s.out)
        for s in withdrawn:
            if s.timer is not None:
                s.timer.cancel()
        if withdrawn:
            try:
                self.client.cancel([s.dfut for s in withdrawn])
            except Exception:
                pass  # the workers will not start them anyway
        return sum(1 for o in {id(s.out): s.out for s in withdrawn}.values() if o.cancel())
