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
- The user's own modules (files next to the script, a package that is not installed, a test
  module) are shipped to the workers by value with cloudpickle, so workers need only PaPy
  and the third-party libraries installed; what was shipped is logged and listed in
  :attr:`DaskPool.shipped`. A compiled extension cannot be shipped: the run stops with a
  :class:`~papy.PoolError` naming it.
- ``security=`` takes Dask's ``distributed.Security`` (TLS certificates), as
  ``distributed.Client`` does.
- A Dask cluster object works too, including a dask-jobqueue ``SLURMCluster`` or
  ``PBSCluster``: the pool checks that the queue accepts its job (SLURM: ``sbatch
  --test-only``), and stops the run with a :class:`~papy.PoolError` when work waits and no
  worker has joined for ``start_timeout`` seconds (a job pending for ever, a partition that
  is down). ``adapt=(lo, hi)`` sizes the number of jobs from the work waiting for this pool
  and gives the jobs back after ``idle_timeout`` seconds without work.

Install with ``pip install "papy[dask]"``; the rest of PaPy works without Dask.
"""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.metadata
import io
import logging
import os
import pickle
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import types
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from typing import Any

import cloudpickle

from papy._errors import PoolError, WorkerCrashed
from papy._pickling import CodePickler, registered_by_value
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
    spec_id: str,
    spec_blob: bytes,
    keys: Any,
    values: Any,
    jkeys: Any,
    dirty: bool = True,
    packed: bool = False,
) -> TaskResult:
    """Run a task on a Dask worker; the step's functions are unpickled once per worker.

    ``packed`` values are one pickle made by the driver (when user modules were shipped by
    value, items may be instances of their classes, which the worker cannot import).
    """
    spec = _spec_cache.get(spec_id)
    if spec is None:
        spec = _spec_cache[spec_id] = pickle.loads(spec_blob)
    if packed:
        values = pickle.loads(values)
    return run_task(spec, keys, values, jkeys, dirty)


# -- shipping the user's own modules -------------------------------------------------------

_ship_lock = threading.Lock()


@functools.cache
def _library_dirs() -> tuple[str, ...]:
    """Return the directories of the standard library and of installed packages."""
    dirs = {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    dirs.update(site.getsitepackages())
    dirs.add(site.getusersitepackages())
    return tuple(sorted(os.path.realpath(d) for d in dirs if d))


@functools.cache
def _installed_top_levels() -> frozenset[str]:
    """Return the top-level import names provided by installed distributions."""
    return frozenset(importlib.metadata.packages_distributions())


def _user_module(name: str) -> types.ModuleType | None:
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
    real = os.path.realpath(path)
    if any(real.startswith(d + os.sep) for d in _library_dirs()):
        return None
    return module


def _is_extension(module: types.ModuleType) -> bool:
    path = getattr(module, "__file__", "") or ""
    return path.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


def _can_import(name: str) -> bool:
    """Tell whether module ``name`` can be imported here (run on the workers)."""
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _dumps(obj: Any, shipped: set[str], importable: Callable[[str], bool] | None = None) -> bytes:
    """Pickle ``obj`` so that a worker needs none of the user's own modules.

    Modules found on the way are added to ``shipped`` and stay by value for this pool.
    Raises PoolError for a user module that cannot travel by value (a compiled extension).
    """
    with _ship_lock:
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
                    module = _user_module(name)
                    if module is None or registered_by_value(module):
                        continue
                    if _is_extension(module):
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


#: Seconds with fewer workers than jobs asked (and work waiting) before the jobs are asked
#: for again: a little more than Dask's default lost-worker-timeout (15 s).
_REPLACE_AFTER_S = 20.0


def _threads_per_job(cluster: Any) -> int:
    """Return the worker threads one job of a dask-jobqueue cluster brings (1 otherwise)."""
    try:
        job = cluster._dummy_job
        return max(1, int(job.worker_processes) * int(job.worker_process_threads))
    except Exception:
        return 1


def _job_ids(cluster: Any) -> list[str]:
    ids = []
    for w in list(getattr(cluster, "workers", {}).values()):
        jid = getattr(w, "job_id", None)
        if jid:
            ids.append(str(jid))
    return ids


def _queue_state(cluster: Any) -> str:
    """Return ``" (job 12 PENDING: Resources)"`` for the jobs of a SLURM cluster, or ''."""
    ids = _job_ids(cluster)
    if not ids or shutil.which("squeue") is None:
        return ""
    r = subprocess.run(
        ["squeue", "-h", "-j", ",".join(ids), "-o", "%i %T %r"],
        capture_output=True,
        text=True,
        check=False,
    )
    states = "; ".join(
        "job {} {}: {}".format(*[*line.split(None, 2), "", ""][:3])
        for line in r.stdout.splitlines()
        if line.strip()
    )
    return f" ({states})" if states else ""


def _check_queue(cluster: Any) -> None:
    """Ask SLURM whether it would run the cluster's job script at all (``--test-only``).

    A partition or account that does not exist is then an error before any work, instead
    of jobs that never start.
    """
    script = getattr(cluster, "job_script", None)
    submit = getattr(getattr(cluster, "job_cls", None), "submit_command", None)
    if script is None or submit != "sbatch" or shutil.which("sbatch") is None:
        return
    with tempfile.NamedTemporaryFile("w", suffix=".sh", delete=False) as f:
        f.write(script())
    try:
        r = subprocess.run(
            ["sbatch", "--test-only", f.name], capture_output=True, text=True, check=False
        )
    finally:
        os.unlink(f.name)
    if r.returncode != 0:
        why = " ".join((r.stderr or r.stdout).split())
        raise PoolError(
            f"SLURM refuses the job script of {type(cluster).__name__}: {why}; check the "
            "partition (queue=), account, memory, cores and walltime"
        )


def jobqueue_cluster(
    kind: str,
    *,
    cores: int = 1,
    memory: str = "2GB",
    walltime: str = "01:00:00",
    partition: str | None = None,
    account: str | None = None,
    resources: dict[str, float] | None = None,
    log_directory: str = "papy-job-logs",
    tls: bool = True,
    **extra: Any,
) -> Any:
    """Return a dask-jobqueue ``SLURMCluster`` (``kind="slurm"``) or ``PBSCluster`` (``"pbs"``).

    Each job runs ``cores`` single-threaded Dask workers (processes: Python code does not
    share a GIL) with ``memory`` in all, for at most ``walltime`` (``HH:MM:SS``); worker
    logs go to ``log_directory``. ``resources`` (Dask worker resources such as
    ``{"GPU": 1}``) are declared by every worker and asked of the queue: SLURM
    ``--gres=gpu:1`` per job, PBS ``-l ngpus=1`` for ``GPU``. No job starts until the
    cluster is scaled (:class:`DaskPool` with ``adapt=``, or ``cluster.scale(jobs=N)``).

    With ``tls`` (the default) the cluster's scheduler, which listens on the cluster's
    network, requires TLS with certificates made for this cluster alone
    (``Security.temporary()``): the workers' copies are written, mode 0600, to
    ``log_directory`` (which the compute nodes must share, as they write their logs
    there) and deleted when the cluster object goes; nobody else can send it code.
    """
    previous = signal.getsignal(signal.SIGINT)
    try:
        import dask_jobqueue
    except ImportError:  # pragma: no cover - depends on the environment
        raise PoolError(f'--{kind} needs dask-jobqueue: pip install "papy[jobqueue]"') from None
    finally:
        # dask_jobqueue.runner replaces the SIGINT handler on import with one that exits
        # with status 0: Ctrl-C would end the run as a success, skipping clean-up.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)
    cls = {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster}[kind]
    kw: dict[str, Any] = {
        "cores": cores,
        "processes": cores,
        "memory": memory,
        "walltime": walltime,
        "log_directory": log_directory,
        "python": sys.executable,
        **extra,
    }
    if tls and "security" not in kw:
        os.makedirs(log_directory, mode=0o700, exist_ok=True)
        kw["security"] = True
        kw.setdefault("shared_temp_directory", os.path.abspath(log_directory))
    if partition:
        kw["queue"] = partition
    if account:
        kw["account"] = account
    if resources:
        spec = ",".join(f"{k}={v:g}" for k, v in resources.items())
        kw["worker_extra_args"] = [*kw.get("worker_extra_args", []), "--resources", spec]
        if kind == "slurm":
            gres = ",".join(f"{k.lower()}:{v:g}" for k, v in resources.items())
            kw["job_extra_directives"] = [*kw.get("job_extra_directives", []), f"--gres={gres}"]
        elif "GPU" in resources:
            kw["job_extra_directives"] = [
                *kw.get("job_extra_directives", []),
                f"-l ngpus={resources['GPU']:g}",
            ]
    return cls(**kw)


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
        self._stop = threading.Event()
        self._watch: threading.Thread | None = None
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
        distributed = _import_distributed()
        if self._parent is not None:
            self._parent.start()
            self.client = self._parent.client
        elif isinstance(self._target, distributed.Client):
            self.client = self._target
        elif hasattr(self._target, "scheduler_address"):  # a Cluster: local, SLURM, PBS...
            self._cluster = self._target
            try:
                self._start_on_cluster(distributed)
            except BaseException:
                self._close()  # the pool never started: release the client (and jobs) now
                raise
            if self.adapt is not None:
                return
        else:
            address = str(self._target)
            if address.startswith("tls://") and self.security is None:
                sec = distributed.Security()  # from the Dask configuration, if it has TLS
                if sec.tls_client_cert is None and sec.tls_ca_file is None:
                    raise PoolError(
                        f"the Dask scheduler at {address} uses TLS and no certificates were "
                        "given: pass security=distributed.Security(tls_ca_file=..., "
                        "tls_client_cert=..., tls_client_key=...) (papy run: --tls-ca-file, "
                        "--tls-cert, --tls-key), or set them in the Dask configuration"
                    )
            try:
                self.client = distributed.Client(
                    address,
                    timeout=self.connect_timeout,
                    set_as_default=False,
                    security=self.security,
                )
            except (OSError, TimeoutError) as exc:
                hint = (
                    "are the TLS certificates the cluster's?"
                    if address.startswith("tls://")
                    else "is it running, and is the address right?"
                )
                raise PoolError(
                    f"cannot reach the Dask scheduler at {address} within "
                    f"{self.connect_timeout:g} s ({type(exc).__name__}: {exc}); {hint}"
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
            cluster = self._cluster or (self._parent._cluster if self._parent else None)
            if cluster is not None and hasattr(cluster, "job_script"):
                # Jobs start one by one: plan for all the jobs asked, not the first one.
                asked = len(getattr(cluster, "worker_spec", {}) or {})
                self.workers = max(self.workers, asked * _threads_per_job(cluster))

    def _start_on_cluster(self, distributed: Any) -> None:
        """Connect to a Cluster object, check its queue, start watching it."""
        _check_queue(self._cluster)
        try:
            self.client = distributed.Client(
                self._cluster, timeout=self.connect_timeout, set_as_default=False
            )
        except (OSError, TimeoutError) as exc:
            raise PoolError(f"cannot connect to {self._cluster!r}: {exc}") from None
        self._own_client = True
        if self.adapt is not None:
            self.workers = self.adapt[1] * _threads_per_job(self._cluster)
            self._scale(self.adapt[0])
        self._watch = threading.Thread(
            target=self._watch_cluster, name="papy-dask-watch", daemon=True
        )
        self._watch.start()
        if self.adapt is not None:
            return
        if getattr(self._cluster, "worker_spec", None) == {}:
            raise PoolError(
                f"{type(self._cluster).__name__} has no jobs or workers: call "
                "cluster.scale(jobs=N) before starting the pool, or pass adapt=(lo, hi)"
            )
        self._wait_first_worker()

    def _scale(self, n: int, record: bool = True) -> None:
        """Ask the cluster for ``n`` jobs (dask-jobqueue) or ``n`` workers (others)."""
        try:
            self._cluster.scale(jobs=n)
        except TypeError:
            self._cluster.scale(n)
        if record:
            self.scaled.append(n)
        log.info("DaskPool asks %r for %d job(s)", self._cluster, n)

    def _wait_first_worker(self) -> None:
        """Wait up to ``start_timeout`` s for a worker of a cluster that starts jobs."""
        try:
            self.client.wait_for_workers(1, timeout=self.start_timeout)
        except TimeoutError:
            raise PoolError(self._no_worker_message()) from None

    def _no_worker_message(self) -> str:
        return (
            f"no worker of {type(self._cluster).__name__} joined within "
            f"{self.start_timeout:g} s (DaskPool start_timeout){_queue_state(self._cluster)}; "
            "the queue cannot start the job: check the partition/queue, account, walltime "
            "and resources asked, or raise start_timeout if the queue is just busy"
        )

    def _watch_cluster(self) -> None:
        """Size the jobs from waiting work (``adapt``) and fail the run if none can start."""
        lo, hi = self.adapt or (0, 0)
        per_job = _threads_per_job(self._cluster)
        target = lo if self.adapt else len(getattr(self._cluster, "worker_spec", {}) or {})
        idle_since = time.monotonic()
        starving_since: float | None = None
        short_since: float | None = None
        while not self._stop.wait(1.0):
            with self._lock:
                waiting = len(self._live)
            try:
                nworkers = sum(self.client.nthreads().values())
            except Exception:
                continue
            now = time.monotonic()
            if waiting and not nworkers:
                starving_since = starving_since or now
                if now - starving_since > self.start_timeout:
                    self._fail_waiting(PoolError(self._no_worker_message()))
                    starving_since = None
            else:
                starving_since = None
            if waiting and target and nworkers < target * per_job:
                # A job ended (walltime, preemption, scancel): once Dask has given up on
                # its workers (distributed.deploy.lost-worker-timeout), ask for the jobs
                # again, so the cluster submits replacements.
                short_since = short_since or now
                if now - short_since > _REPLACE_AFTER_S:
                    log.info(
                        "DaskPool: %d of %d worker threads; asking again for %d job(s)",
                        nworkers,
                        target * per_job,
                        target,
                    )
                    self._scale(target, record=False)
                    short_since = now
            else:
                short_since = None
            if self.adapt is None:
                continue
            if waiting:
                idle_since = now
                want = min(hi, max(lo, -(-waiting // (self.prefetch * per_job))))
                if want > target:
                    target = want
                    self._scale(target)
            elif target > lo and now - idle_since > self.idle_timeout:
                target = lo
                self._scale(target)

    def _fail_waiting(self, exc: PoolError) -> None:
        """Stop the run: every task still waiting for this pool fails with ``exc``."""
        self._broken = exc
        with self._lock:
            outs = list(self._outs)
            live = list(self._live.values())
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
        self._stop.set()
        if self._watch is not None:
            self._watch.join(timeout=5)
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
        if self._cluster is not None and self.own_cluster:
            try:
                self._cluster.close()  # cancels every job it submitted
            except Exception:
                log.warning("could not close %r", self._cluster, exc_info=True)
        elif self._cluster is not None and self.adapt is not None:
            try:
                self._scale(self.adapt[0])  # give the jobs back now
            except Exception:
                pass

    # -- submitting --------------------------------------------------------------------------

    def _spec_blob(self, spec: StepSpec) -> bytes:
        # Pickled once per run; a few kilobytes that travel with each task, so a task can
        # run on any worker, including one that joined after a crash.
        blob = self._specs.get(spec.id)
        if blob is None:
            blob = self._specs[spec.id] = _dumps(spec, self.shipped, self._workers_can_import)
        return blob

    def _workers_can_import(self, name: str) -> bool:
        """Tell whether every worker connected now can import module ``name`` (cached)."""
        known = self._importable.get(name)
        if known is None:
            try:
                found = self.client.run(_can_import, name)
            except Exception:
                found = {}
            known = self._importable[name] = bool(found) and all(found.values())
        return known

    def _submit(self, task: Task) -> Future[TaskResult]:
        out: Future[TaskResult] = Future()
        out.set_running_or_notify_cancel()
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
            if not out.done():
                try:
                    out.set_result(result)
                except InvalidStateError:
                    pass  # failed by _fail_waiting meanwhile

        self._send(task, done)
        return out

    def _send(self, task: Task, done: Any) -> None:
        distributed = _import_distributed()
        try:
            spec_blob = self._spec_blob(task.spec)
            packed = bool(self.shipped)
            values: Any = (
                _dumps(task.values, self.shipped, self._workers_can_import)
                if packed
                else task.values
            )
            dfut = self.client.submit(
                _run_on_worker,
                task.spec.id,
                spec_blob,
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
