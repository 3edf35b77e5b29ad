"""Reaching a Dask cluster: schedulers, dask-jobqueue SLURM/PBS clusters, their jobs.

- :func:`connect` connects to a scheduler's address (TLS or not) with a clear error.
- :func:`jobqueue_cluster` makes a ``SLURMCluster`` or ``PBSCluster`` with TLS on by default.
- :func:`check_queue` asks SLURM whether it would run the job script at all (``sbatch
  --test-only``), so a wrong partition is an error before any work.
- :class:`ClusterWatch` watches one Cluster object for one pool: it sizes the jobs from the
  work waiting (``adapt``), asks again for jobs that ended, and stops the run with a
  :class:`~papy.PoolError` when work waits and no worker has joined for ``start_timeout``.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from papy._errors import PoolError

log = logging.getLogger("papy")

#: Seconds with fewer workers than jobs asked (and work waiting) before the jobs are asked
#: for again: a little more than Dask's default lost-worker-timeout (15 s).
REPLACE_AFTER_S = 20.0


def import_distributed() -> Any:
    """Return the ``distributed`` module, or raise PoolError saying how to install it.

    Imported here, when a pool starts, rather than with PaPy: Dask is an optional
    dependency and takes about a second to import.
    """
    try:
        import distributed
    except ImportError:  # pragma: no cover - depends on the environment
        raise PoolError('DaskPool needs Dask distributed: pip install "papy[dask]"') from None
    return distributed


def threads_per_job(cluster: Any) -> int:
    """Return the worker threads one job of a dask-jobqueue cluster brings (1 otherwise)."""
    try:
        job = cluster._dummy_job
        return max(1, int(job.worker_processes) * int(job.worker_process_threads))
    except Exception:
        return 1


def connect(distributed: Any, address: str, security: Any, timeout: float) -> Any:
    """Return a ``distributed.Client`` of the scheduler at ``address``.

    ``security`` is a ``distributed.Security`` or None; ``timeout`` is in seconds. Raises
    PoolError saying why not (no certificates for a ``tls://`` address, unreachable).
    """
    if address.startswith("tls://") and security is None:
        sec = distributed.Security()  # from the Dask configuration, if it has TLS
        if sec.tls_client_cert is None and sec.tls_ca_file is None:
            raise PoolError(
                f"the Dask scheduler at {address} uses TLS and no certificates were "
                "given: pass security=distributed.Security(tls_ca_file=..., "
                "tls_client_cert=..., tls_client_key=...) (papy run: --tls-ca-file, "
                "--tls-cert, --tls-key), or set them in the Dask configuration"
            )
    try:
        return distributed.Client(address, timeout=timeout, set_as_default=False, security=security)
    except (OSError, TimeoutError) as exc:
        hint = (
            "are the TLS certificates the cluster's?"
            if address.startswith("tls://")
            else "is it running, and is the address right?"
        )
        raise PoolError(
            f"cannot reach the Dask scheduler at {address} within "
            f"{timeout:g} s ({type(exc).__name__}: {exc}); {hint}"
        ) from None


def worker_threads(client: Any, resources: dict[str, float] | None, cluster: Any) -> int:
    """Return the worker threads that can run tasks needing ``resources`` (at least 1).

    For a dask-jobqueue ``cluster``, count the threads of every job asked, not only of
    those started: jobs start one by one.
    """
    nthreads = client.nthreads()
    if resources:
        info = client.scheduler_info()["workers"]
        nthreads = {
            w: n
            for w, n in nthreads.items()
            if all(
                info.get(w, {}).get("resources", {}).get(r, 0) >= q for r, q in resources.items()
            )
        }
    count = max(1, sum(nthreads.values()))
    if cluster is not None and hasattr(cluster, "job_script"):
        asked = len(getattr(cluster, "worker_spec", {}) or {})
        count = max(count, asked * threads_per_job(cluster))
    return count


def job_ids(cluster: Any) -> list[str]:
    """Return the batch-system ids of the cluster's jobs (empty for other clusters)."""
    ids = []
    for w in list(getattr(cluster, "workers", {}).values()):
        jid = getattr(w, "job_id", None)
        if jid:
            ids.append(str(jid))
    return ids


def queue_state(cluster: Any) -> str:
    """Return ``" (job 12 PENDING: Resources)"`` for the jobs of a SLURM cluster, or ''."""
    ids = job_ids(cluster)
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


def check_queue(cluster: Any) -> None:
    """Ask SLURM whether it would run the cluster's job script at all (``--test-only``).

    A partition or account that does not exist is then an error before any work, instead
    of jobs that never start. Raises PoolError with SLURM's reason.
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
        # dask-jobqueue is an optional dependency, imported only when asked for.
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


class ClusterWatch:
    """Size one Cluster object's jobs for one pool, and stop a run no job can serve.

    ``waiting()`` returns how many of the pool's tasks wait or run; ``fail(exc)`` stops
    the run (every waiting task fails with ``exc``). ``scaled`` (the pool's public list)
    gets every number of jobs asked by ``adapt``. The watching thread wakes once a second.
    """

    def __init__(
        self,
        cluster: Any,
        client: Any,
        *,
        adapt: tuple[int, int] | None,
        idle_timeout: float,
        start_timeout: float,
        prefetch: int,
        waiting: Callable[[], int],
        fail: Callable[[PoolError], None],
        scaled: list[int],
    ) -> None:
        self.cluster = cluster
        self.client = client
        self.adapt = adapt
        self.idle_timeout = idle_timeout
        self.start_timeout = start_timeout
        self.prefetch = prefetch
        self._waiting = waiting
        self._fail = fail
        self.scaled = scaled
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def begin(self) -> None:
        """Ask for the first jobs (``adapt``), start watching, wait for a first worker.

        Without ``adapt``, raises PoolError when the cluster has no jobs at all, or when
        no worker joins within ``start_timeout`` seconds.
        """
        if self.adapt is not None:
            self.scale(self.adapt[0])
        self._thread = threading.Thread(target=self._watch, name="papy-dask-watch", daemon=True)
        self._thread.start()
        if self.adapt is not None:
            return
        if getattr(self.cluster, "worker_spec", None) == {}:
            raise PoolError(
                f"{type(self.cluster).__name__} has no jobs or workers: call "
                "cluster.scale(jobs=N) before starting the pool, or pass adapt=(lo, hi)"
            )
        try:
            self.client.wait_for_workers(1, timeout=self.start_timeout)
        except TimeoutError:
            raise PoolError(self.no_worker_message()) from None

    def stop(self) -> None:
        """Stop watching (waits up to 5 s for the thread)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def scale(self, n: int, record: bool = True) -> None:
        """Ask the cluster for ``n`` jobs (dask-jobqueue) or ``n`` workers (others)."""
        try:
            self.cluster.scale(jobs=n)
        except TypeError:
            self.cluster.scale(n)
        if record:
            self.scaled.append(n)
        log.info("DaskPool asks %r for %d job(s)", self.cluster, n)

    def watch_only(self) -> None:
        """Only watch (a cluster PaPy does not size: an address, a Client): fail the run
        when work has waited ``start_timeout`` seconds with no worker at all."""
        self._thread = threading.Thread(target=self._watch, name="papy-dask-watch", daemon=True)
        self._thread.start()

    def no_worker_message(self) -> str:
        """Say that no worker joined, with the jobs' state in the queue when known."""
        if self.cluster is None:
            return (
                f"the Dask cluster has had no worker for {self.start_timeout:g} s while work "
                "waited (DaskPool start_timeout): its workers died or left (a node that "
                "kills its worker, again and again, can exhaust a cluster's nannies)"
            )
        return (
            f"no worker of {type(self.cluster).__name__} joined within "
            f"{self.start_timeout:g} s (DaskPool start_timeout){queue_state(self.cluster)}; "
            "the queue cannot start the job: check the partition/queue, account, walltime "
            "and resources asked, or raise start_timeout if the queue is just busy"
        )

    def _watch(self) -> None:
        """Size the jobs from waiting work (``adapt``) and fail the run if none can start."""
        lo, hi = self.adapt or (0, 0)
        per_job = threads_per_job(self.cluster)
        target = lo if self.adapt else len(getattr(self.cluster, "worker_spec", {}) or {})
        idle_since = time.monotonic()
        starving_since: float | None = None
        short_since: float | None = None
        while not self._stop.wait(1.0):
            waiting = self._waiting()
            try:
                nworkers = sum(self.client.nthreads().values())
            except Exception:
                continue
            now = time.monotonic()
            if waiting and not nworkers:
                starving_since = starving_since or now
                if now - starving_since > self.start_timeout:
                    self._fail(PoolError(self.no_worker_message()))
                    starving_since = None
            else:
                starving_since = None
            if waiting and target and nworkers < target * per_job:
                # A job ended (walltime, preemption, scancel): once Dask has given up on
                # its workers (distributed.deploy.lost-worker-timeout), ask for the jobs
                # again, so the cluster submits replacements.
                short_since = short_since or now
                if now - short_since > REPLACE_AFTER_S:
                    log.info(
                        "DaskPool: %d of %d worker threads; asking again for %d job(s)",
                        nworkers,
                        target * per_job,
                        target,
                    )
                    self.scale(target, record=False)
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
                    self.scale(target)
            elif target > lo and now - idle_since > self.idle_timeout:
                target = lo
                self.scale(target)
