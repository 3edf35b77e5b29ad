"""DaskPool: run tasks on a Dask distributed cluster, beside local pools.

Dask schedules the tasks, moves the data, and re-runs a task whose worker died. A task is
one batch through a fused chain of nodes, whose functions are pickled once per run and kept,
per pool, in each worker's cache until the run ends. A task whose workers keep dying is split
until the item at fault is found; a node's ``timeout`` is enforced on the worker, from each
item's own start; :meth:`DaskPool.cancel` withdraws a stopped run's tasks that have not
started.

An input that cannot be pickled fails that item (``TypeError``) and its batch-mates run; an
output that cannot be pickled is failed the same way on the worker. :meth:`DaskPool.close`
fails every unfinished task with :class:`~papy.PoolError` before it returns, and a
``submit`` racing it raises ``PoolError``. The client, the workers' plugin and the Dask
tasks are held by an inner object that the pool's callbacks share, not by the pool, so a
pool nobody closed is closed when it is garbage-collected (or at interpreter exit).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import pickle
import uuid
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, InvalidStateError
from typing import Any

from papy._errors import PoolError
from papy._items import qualified_type
from papy._task import StepSpec, TaskResult
from papy.pools._base import Pool, Task
from papy.pools._messages import fail_unpicklable
from papy.pools.dask.cluster import (
    ClusterWatch,
    check_queue,
    connect,
    import_distributed,
    threads_per_job,
    worker_threads,
)
from papy.pools.dask.inflight import Sent, marks, withdrawable
from papy.pools.dask.isolate import Suspects, derived_from, killed
from papy.pools.dask.shipping import can_import, cloud_unpicklable, dumps
from papy.pools.dask.state import Shared, Submitted, fail, on_shared

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
    groups_scatter = False  # a sub-item's crash must name the sub-item (see Pool)
    target_task_s = 0.2  # Dask costs a few milliseconds per task: ship bigger batches
    prefetch = 3  # tasks per worker thread in flight, to hide the scheduler's latency
    item_timeouts = True  # the workers time each item from its own start

    client = on_shared("client", "The ``distributed.Client`` the pool submits through.")
    own_cluster = on_shared("own_cluster", "Close the cluster (and cancel its jobs) with the pool.")
    _cache_name = on_shared("cache_name", "The name of the workers' StepCache plugin.")

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
        self._shared = Shared(f"papy-steps-{uuid.uuid4().hex}")
        self._suspects = Suspects()
        self._target = address_or_client
        self.security = security
        if adapt is not None and not (0 <= adapt[0] <= adapt[1] and adapt[1] >= 1):
            raise ValueError(f"adapt=(lo, hi) needs 0 <= lo <= hi and hi >= 1, not {adapt!r}")
        self.adapt = self._shared.adapt = adapt
        self.idle_timeout = idle_timeout
        self.start_timeout = start_timeout
        #: the number of jobs (or workers) asked of the cluster by ``adapt``, over time
        self.scaled: list[int] = []
        #: names of the user's modules this pool sent to the workers by value
        self.shipped: set[str] = set()
        self._importable: dict[str, bool] = {}
        self.resources = dict(resources) if resources else None
        self._workers_hint = workers
        self.workers = workers or 1
        self.connect_timeout = connect_timeout
        self._numbers = itertools.count()
        self._parent: DaskPool | None = None
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
        # A pool nobody closes is closed when collected: the finalizer holds only _shared.
        weakref.finalize(self, self._shared.close)
        if self._parent is not None:
            self._parent.start()
            self.client = self._parent.client
        elif isinstance(self._target, distributed.Client):
            self.client = self._target
        elif hasattr(self._target, "scheduler_address"):  # a Cluster: local, SLURM, PBS...
            self._shared.cluster = self._target
        else:
            self.client = connect(
                distributed, str(self._target), self.security, self.connect_timeout
            )
            self._shared.own_client = True
        try:
            if self._shared.cluster is not None:
                check_queue(self._shared.cluster)
                try:
                    self.client = distributed.Client(
                        self._shared.cluster, timeout=self.connect_timeout, set_as_default=False
                    )
                except (OSError, TimeoutError) as exc:
                    raise PoolError(f"cannot connect to {self._shared.cluster!r}: {exc}") from None
                self._shared.own_client = True
            self.client.register_plugin(worker.StepCache(self._cache_name), name=self._cache_name)
            self._shared.registered = True
            if self._shared.cluster is not None or self._parent is None:
                self._watch_cluster()
        except BaseException:
            self._shared.release()  # the pool never started: release the client (and jobs)
            raise
        if self._workers_hint is None and (self._shared.cluster is None or self.adapt is None):
            cluster = self._shared.cluster or (
                self._parent._shared.cluster if self._parent else None
            )
            self.workers = worker_threads(self.client, self.resources, cluster)

    def _watch_cluster(self) -> None:
        """Start watching the Cluster object (sizing its jobs); wait for a first worker."""
        adapt = self.adapt if self._shared.cluster is not None else None
        if adapt is not None:
            self.workers = adapt[1] * threads_per_job(self._shared.cluster)
        live = self._shared.live  # the watch thread must not hold the pool itself
        self._shared.watch = ClusterWatch(
            self._shared.cluster,
            self.client,
            adapt=adapt,
            idle_timeout=self.idle_timeout,
            start_timeout=self.start_timeout,
            prefetch=self.prefetch,
            waiting=lambda: len(live),
            fail=self._shared.fail_waiting,
            scaled=self.scaled,
        )
        if self._shared.cluster is None:
            self._shared.watch.watch_only()  # an address or a Client: nothing to size
        else:
            self._shared.watch.begin()

    def _fail_waiting(self, exc: PoolError) -> None:
        """Stop the run: every task still waiting for this pool fails with ``exc``."""
        self._shared.fail_waiting(exc)

    def _close(self) -> None:
        self._shared.close()

    def release(self, spec_ids: Sequence[str]) -> None:
        """Forget the steps of a run that ended, here and in every worker's cache."""
        self._suspects.reset()
        with self._shared.lock:
            ids = set(spec_ids)
            ids.update(i for i in self._shared.specs if derived_from(i, ids))
            held = [i for i in ids if self._shared.specs.pop(i, None) is not None]
        if not held or not self._shared.registered or self.closed:
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
        with self._shared.lock:
            out: dict[str, Any] = {"driver": len(self._shared.specs), "workers": {}}
        if self._shared.registered:
            out["workers"] = self.client.run(self._on_worker.sizes, self._cache_name)
        return out

    # -- submitting --------------------------------------------------------------------------

    def _spec_blob(self, spec: StepSpec) -> bytes:
        # Pickled once per run; a few kilobytes that travel with each task, so a task can
        # run on any worker, including one that joined after a crash.
        with self._shared.lock:
            blob = self._shared.specs.get(spec.id)
        if blob is None:
            blob = dumps(spec, self.shipped, self._workers_can_import)
            with self._shared.lock:
                blob = self._shared.specs.setdefault(spec.id, blob)
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
        if self._shared.broken is not None:
            out.set_exception(self._shared.broken)
            return out
        try:
            self._spec_blob(task.spec)
        except PoolError as exc:
            out.set_exception(exc)  # the run cannot work on this cluster: stop it, once
            return out
        shared = self._shared
        with shared.lock:
            # Under the lock close() takes: a task is either known to close(), which fails
            # it, or refused here; never left pending.
            if shared.closed:
                raise PoolError("the DaskPool is closed; make a new pool")
            shared.outs.add(out)

        def done(result: TaskResult) -> None:
            with shared.lock:
                shared.outs.discard(out)
                shared.split.discard(out)
            if not out.done():
                try:
                    out.set_result(result)
                except InvalidStateError:
                    pass  # failed by close or _fail_waiting, or withdrawn by cancel, meanwhile

        self._send(task, done, out)
        return out

    def _fail_out(self, out: Future[TaskResult], error: BaseException) -> None:
        """Fail the whole task behind ``out`` (the pool cannot run it)."""
        with self._shared.lock:
            self._shared.outs.discard(out)
            self._shared.split.discard(out)
        fail(out, error)

    def _send(
        self, task: Task, done: Callable[[TaskResult], None], out: Future[TaskResult]
    ) -> None:
        """Submit ``task`` (all or part of the task behind ``out``) as one Dask task.

        An item that cannot be pickled fails with ``TypeError`` and the others are sent; a
        task that cannot be sent at all fails ``out`` with a PoolError.
        """
        try:
            dfut = self._submit_to_dask(task)
        except PoolError as exc:
            self._fail_out(out, exc)  # a module the workers cannot get: stop the run
            return
        except Exception as exc:
            if self._shared.closed:
                fail(out, PoolError("the DaskPool was closed before the task was sent"))
                return
            cleaned = self._without_unpicklable(task)
            if cleaned is None:
                self._fail_out(out, PoolError(f"could not submit to Dask: {exc}"))
                return
            # Its stages (or the scheduler, from the values) count those Failures.
            task = cleaned
            try:
                dfut = self._submit_to_dask(task)
            except Exception as again:
                if self._shared.closed:
                    error = PoolError("the DaskPool was closed before the task was sent")
                elif isinstance(again, PoolError):
                    error = again
                else:
                    error = PoolError(f"could not submit to Dask: {again}")
                self._fail_out(out, error)
                return
        sent = Sent(dfut.number, task, done, out, dfut.future)
        with self._shared.lock:
            if self._shared.closed:
                sent.finished.set()
            else:
                self._shared.live[sent.number] = sent
        if sent.finished.is_set():
            fail(out, PoolError("the DaskPool was closed before the task was sent"))
            try:
                self.client.cancel([sent.dfut])
            except Exception:
                pass
            return
        sent.dfut.add_done_callback(lambda f: self._landed(sent, f))

    def _submit_to_dask(self, task: Task) -> Submitted:
        """Submit ``task`` to Dask; return its number and Dask future.

        Raises what pickling the values raises (Dask pickles them here, in this thread),
        and PoolError for a module that cannot be shipped to the workers.
        """
        number = next(self._numbers)
        spec_blob = self._spec_blob(task.spec)
        packed = bool(self.shipped)
        values: Any = (
            dumps(task.values, self.shipped, self._workers_can_import) if packed else task.values
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
        return Submitted(number, dfut)

    def _without_unpicklable(self, task: Task) -> Task | None:
        """Return ``task`` with each item that cannot be pickled a ``TypeError`` Failure.

        Returns None when every item pickles (the task failed to go for another reason).
        """
        values = fail_unpicklable(
            task.first_stage(),
            task.keys,
            task.values,
            lambda value, exc: (
                f"the item of type {qualified_type(value)} cannot be sent to a Dask "
                f"worker ({qualified_type(exc)}: {exc}); use a ThreadPool for this node"
            ),
            check=cloud_unpicklable,
        )
        bad = any(a is not b for a, b in zip(values, task.values))
        if not bad:
            return None
        return Task(task.spec, task.keys, values, task.timeout, task.jkeys, dirty=True)

    def _landed(self, sent: Sent, f: Any) -> None:
        """Hand on the outcome of a Dask task (Dask calls this in a thread of its own)."""
        with self._shared.lock:
            self._shared.live.pop(sent.number, None)
        if sent.finished.is_set():
            return  # withdrawn, or the pool closed or failed: already answered
        sent.finished.set()
        task, done = sent.task, sent.done
        try:
            blob = f.result()
        except (concurrent.futures.CancelledError, asyncio.CancelledError):
            if not self._shared.closed:  # close() already failed the future
                error = self._shared.broken or PoolError(
                    "the Dask task was cancelled on the cluster"
                )
                self._fail_out(sent.out, error)
            return
        except import_distributed().KilledWorker as exc:
            self._killed(sent, exc)
            return
        except Exception as exc:
            self._fail_out(sent.out, PoolError(f"the Dask task failed: {exc!r}"))
            return
        if blob is None:
            # Withdrawn on the worker by a cancel() that then kept the task (another part
            # of it had started): it must run after all.
            self._send(task, done, sent.out)
            return
        try:
            result = pickle.loads(blob)
        except Exception as exc:
            result = task.fail_all(
                TypeError(
                    f"a result could not be rebuilt in the driver ({qualified_type(exc)}: {exc})"
                ),
                task.last_stage(),
            )
        done(result)

    def _killed(self, sent: Sent, exc: BaseException) -> None:
        """Split a task whose workers kept dying until the guilty item is alone."""
        log.warning("Dask workers died running a task of %d item(s): %s", len(sent.task), exc)

        def split() -> None:  # one part may be delivered while another waits: the task
            with self._shared.lock:  # is no longer withdrawable as a whole
                self._shared.split.add(sent.out)

        killed(
            sent.task,
            sent.done,
            exc,
            lambda t, d: self._send(t, d, sent.out),
            split,
            self._suspects,
        )

    def cancel(self, futures: Iterable[Future[TaskResult]]) -> int:
        """Withdraw the given tasks that have not started on the cluster; return how many.

        Every worker is asked, in one round trip, to mark the tasks withdrawn unless they
        started there; a worker never starts a task marked so. A task none of whose parts
        started is withdrawn: its future is cancelled and its Dask tasks are cancelled. A
        task that started anywhere runs on and is delivered (a part of it that was marked
        is sent again). If a worker cannot answer, nothing is withdrawn.
        """
        wanted = {id(f) for f in futures}
        with self._shared.lock:
            outs = {
                id(o): o
                for o in self._shared.outs
                if id(o) in wanted and not o.done() and o not in self._shared.split
            }
            parts = [s for s in self._shared.live.values() if id(s.out) in outs]
        if not parts or not self._shared.registered:
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
        with self._shared.lock:
            withdrawn = withdrawable(parts, self._shared.live.values(), started, self._shared.split)
            for s in withdrawn:
                s.finished.set()
                del self._shared.live[s.number]
                self._shared.outs.discard(s.out)
        if withdrawn:
            try:
                self.client.cancel([s.dfut for s in withdrawn])
            except Exception:
                pass  # the workers will not start them anyway
        return sum(1 for o in {id(s.out): s.out for s in withdrawn}.values() if o.cancel())
