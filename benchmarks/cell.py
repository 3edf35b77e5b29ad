"""Run one benchmark cell (a workload on a contestant) in this process; print JSON.

Each cell runs in a fresh interpreter so pools, caches and memory of one contestant never
affect another. Pools are created and warmed before the clock starts, for every contestant
that has a reusable pool; the timed region is "items in, all outputs out".
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import psutil

from benchmarks import workloads as w

CHAINS: dict[str, list[Callable[[Any], Any]]] = {
    "W1": [w.w1_a, w.w1_b, w.w1_c],
    "W2": [w.w2_a, w.w2_b],
    "W3": [w.w3_a, w.w3_b],
    "W4": [w.w4_a, w.w4_b],
    "W5": [w.w5_a, w.w5_b],
    "W6": [w.w6_a, w.w6_b],
    "W8": [w.w2_a, w.w2_b],
    "J1": [w.w1_a, w.w1_b, w.w1_c],
    "W9": [w.w9_a, w.w9_b],
}
FUSED: dict[str, Callable[[Any], Any]] = {
    "W1": w.w1_fused,
    "W2": w.w2_fused,
    "W3": w.w3_fused,
    "W4": w.w4_fused,
    "W5": w.w5_fused,
    "W6": w.w6_fused,
    "W8": w.w2_fused,
    "J1": w.w1_fused,
    "W9": w.w9_fused,
}
# The CPU part of each workload: what the two plain processes of the "limit" row (and the
# "serial_cpu" row) run. W9's I/O stage only sleeps, so threads can hide it entirely.
CPU_WORK: dict[str, Callable[[Any], Any]] = {
    **FUSED,
    "W7": w.w7_item,
    "W9": w.w9_b,
}
#: the number of items the cell will run (set by main): lets a contestant prepare outside
#: the clock (papy_journal_resume fills its journal first)
N_ITEMS = 0


def expected(workload: str, n: int) -> Any:
    if workload in ("W1", "J1"):
        return [(x + 1) * 2 - 3 for x in range(n)]
    if workload in ("W2", "W3", "W4", "W8", "W9"):
        return [x + 1 for x in range(n)]
    if workload == "W5":
        return n * (n + 1)  # sum of 2 * (x + 1)
    if workload == "W6":
        return [2.0 * x for x in range(n)]
    if workload == "W7":
        return [sum(x * 100 + i for i in range(40)) for x in range(n)]
    if workload == "W10":
        return [3 * x + 3 for x in range(n)]
    raise ValueError(workload)


def items(workload: str, n: int) -> Iterable[int]:
    return (x for x in range(n)) if workload == "W5" else range(n)


def collect(workload: str, outputs: Iterable[Any]) -> Any:
    """Consume outputs: W5 sums them (holding 2M results would measure the consumer)."""
    if workload == "W5":
        return sum(outputs)
    return list(outputs)


def regroup(flat: Iterable[int], n_items: int) -> list[int]:
    sums = [0] * n_items
    for s in flat:
        sums[s // 100] += s
    return sums


def chunk(n: int, workers: int, cap: int = 2000) -> int:
    return max(1, min(cap, n // (workers * 16)))


class Sampler:
    """Sample the RSS of this process and all its descendants; keep the peak."""

    def __init__(self, interval: float = 0.01) -> None:
        self.peak = 0
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> None:
        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        self.peak = max(self.peak, total)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


# -- contestants ------------------------------------------------------------------------------
# Each is a context manager factory: set up (and warm) outside the clock, then a run function.


def serial(workload: str, workers: int) -> Iterator[Callable[[int], Any]]:
    if workload == "W7":
        yield lambda n: collect(workload, (w.w7_item(x) for x in range(n)))
        return
    stages = CHAINS[workload]

    def run(n: int) -> Any:
        def gen() -> Iterator[Any]:
            for x in items(workload, n):
                for f in stages:
                    x = f(x)
                yield x

        return collect(workload, gen())

    yield run


def mp_fused(workload: str, workers: int) -> Iterator[Callable[[int], Any]]:
    import multiprocessing as mp

    with mp.Pool(workers) as pool:
        pool.map(abs, range(workers * 4))
        if workload == "W7":

            def run7(n: int) -> Any:
                flat = (s for x in range(n) for s in w.w7_split(x))
                return regroup(pool.imap(w.w7_work, flat, chunk(n * 40, workers)), n)

            yield run7
            return
        fused = FUSED[workload]
        yield lambda n: collect(workload, pool.imap(fused, items(workload, n), chunk(n, workers)))


def mp_nested(workload: str, workers: int) -> Iterator[Callable[[int], Any]]:
    import multiprocessing as mp

    with mp.Pool(workers) as pool:
        pool.map(abs, range(workers * 4))

        def run(n: int) -> Any:
            it: Iterable[Any] = items(workload, n)
            for f in CHAINS[workload]:
                it = pool.imap(f, it, chunk(n, workers))
            return collect(workload, it)

        yield run


def mp_pools(workload: str, workers: int) -> Iterator[Callable[[int], Any]]:
    """W9 with multiprocessing's default sizes: ``ThreadPool()`` (one thread per core)
    feeding ``Pool()`` (one process per core) through ``imap``."""
    import multiprocessing as mp
    from multiprocessing.pool import ThreadPool

    with ThreadPool() as io, mp.Pool() as cpu:
        cpu.map(abs, range(workers * 4))
        yield lambda n: list(cpu.imap(w.w9_b, io.imap(w.w9_a, range(n))))


def concurrent_futures(workload: str, workers: int) -> Iterator[Callable[[int], Any]]:
    from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

    if workload == "W9":  # default sizes: min(32, cores + 4) threads, one process per core
        with ThreadPoolExecutor() as io, ProcessPoolExecutor() as cpu:
            list(cpu.map(abs, range(workers * 4)))
            yield lambda n: list(cpu.map(w.w9_b, io.map(w.w9_a, range(n))))
        return
    with ProcessPoolExecutor(workers) as ex:
        list(ex.map(abs, range(workers * 4)))
        if workload == "W7":

            def run7(n: int) -> Any:
                flat = [s for x in range(n) for s in w.w7_split(x)]
                return regroup(ex.map(w.w7_work, flat, chunksize=chunk(n * 40, workers)), n)

            yield run7
            return
        fused = FUSED[workload]
        yield lambda n: collect(
            workload, ex.map(fused, items(workload, n), chunksize=chunk(n, workers))
        )


def mpire(workload: str, workers: int) -> Iterator[Callable[[int], Any]]:
    from mpire import WorkerPool

    with WorkerPool(n_jobs=workers, keep_alive=True) as pool:
        pool.map(abs, range(workers * 4))
        if workload == "W7":

            def run7(n: int) -> Any:
                flat = [s for x in range(n) for s in w.w7_split(x)]
                return regroup(pool.imap(w.w7_work, flat, chunk_size=chunk(n * 40, workers)), n)

            yield run7
            return
        fused = FUSED[workload]  # mpire cannot nest maps on one pool: the chain is fused
        yield lambda n: collect(
            workload, pool.imap(fused, items(workload, n), chunk_size=chunk(n, workers))
        )


def pypeln(workload: str, workers: int) -> Iterator[Callable[[int], Any]]:
    import pypeln as pl

    if workload == "W7":

        def run7(n: int) -> Any:
            stage = pl.process.flat_map(w.w7_split, range(n), workers=workers)
            stage = pl.process.map(w.w7_work, stage, workers=workers)
            return regroup(stage, n)

        yield run7
        return

    def run(n: int) -> Any:
        stage: Any = items(workload, n)
        for f in CHAINS[workload]:
            stage = pl.process.map(f, stage, workers=workers, maxsize=workers * 4)
        out = collect(workload, stage)
        return out if workload == "W5" else sorted(out)  # pypeln does not keep order

    yield run


def dask_bag(workload: str, workers: int) -> Iterator[Callable[[int], Any]]:
    import dask
    import dask.bag as db

    dask.config.set(scheduler="processes", num_workers=workers)
    db.from_sequence(range(8), npartitions=workers).map(abs).compute()

    def run(n: int) -> Any:
        bag = db.from_sequence(range(n), npartitions=workers * 8)
        if workload == "W7":
            flat = bag.map(w.w7_split).flatten().map(w.w7_work).compute()
            return regroup(flat, n)
        for f in CHAINS[workload]:
            bag = bag.map(f)
        if workload == "W5":
            return bag.sum().compute()
        return bag.compute()

    yield run


def papy(workload: str, workers: int, journal: bool = False) -> Iterator[Callable[[int], Any]]:
    import tempfile

    from papy import Pipeline, ProcessPool, ThreadPool

    if workload == "W9":  # no worker counts: the pools size themselves
        with ThreadPool() as io, ProcessPool() as cpu:
            pipe = Pipeline(workload)
            a = pipe.add(w.w9_a, pool=io)
            pipe.add(w.w9_b, after=a, pool=cpu)
            list(pipe.map(range(workers * 4), progress=False))
            yield lambda n: list(pipe.map(range(n), progress=False))
        return
    with ProcessPool(workers) as pool:
        pipe = Pipeline(workload, pool=pool)
        if workload == "W7":
            s = pipe.add(w.w7_split, scatter=True)
            k = pipe.add(w.w7_work, after=s)
            pipe.add(w.w7_sum, after=k, gather=True)
        else:
            prev = None
            for f in CHAINS[workload]:
                prev = pipe.add(f, after=prev)
        list(pipe.map(range(workers * 4), progress=False))

        def run(n: int) -> Any:
            if not journal:
                return collect(workload, pipe.map(items(workload, n), progress=False))
            with tempfile.TemporaryDirectory() as tmp:
                return collect(
                    workload,
                    pipe.map(items(workload, n), progress=False, journal=os.path.join(tmp, "j.db")),
                )

        yield run


def papy_journal(workload: str, workers: int) -> Iterator[Callable[[int], Any]]:
    yield from papy(workload, workers, journal=True)


def _journal_pipe(workload: str, pool: Any, cache: bool) -> Any:
    from papy import Pipeline

    pipe = Pipeline(workload, pool=pool)
    prev = None
    for f in CHAINS[workload]:
        prev = pipe.add(f, after=prev, cache=cache)
    return pipe


def papy_journal_resume(workload: str, workers: int) -> Iterator[Callable[[int], Any]]:
    """Every item finished in an earlier run: the time to skip and replay them."""
    import tempfile

    from papy import ProcessPool

    with ProcessPool(workers) as pool, tempfile.TemporaryDirectory() as tmp:
        pipe = _journal_pipe(workload, pool, cache=False)
        journal = os.path.join(tmp, "j.db")
        list(pipe.map(range(N_ITEMS), progress=False, journal=journal))  # outside the clock
        yield lambda n: collect(workload, pipe.map(range(n), progress=False, journal=journal))


def papy_journal_cache(workload: str, workers: int) -> Iterator[Callable[[int], Any]]:
    """A first run with ``cache=True`` on every node: every node's outputs are recorded."""
    import tempfile

    from papy import ProcessPool

    with ProcessPool(workers) as pool:
        pipe = _journal_pipe(workload, pool, cache=True)
        list(pipe.map(range(workers * 4), progress=False))

        def run(n: int) -> Any:
            with tempfile.TemporaryDirectory() as tmp:
                journal = os.path.join(tmp, "j.db")
                return collect(workload, pipe.map(range(n), progress=False, journal=journal))

        yield run


def papy_split_pools(workload: str, workers: int) -> Iterator[Callable[[int], Any]]:
    """W6 with stage A and B on two process pools: the array must cross processes."""
    from papy import Pipeline, ProcessPool

    with ProcessPool(workers) as p1, ProcessPool(workers) as p2:
        pipe = Pipeline(workload)
        a = pipe.add(CHAINS[workload][0], pool=p1)
        pipe.add(CHAINS[workload][1], after=a, pool=p2)
        list(pipe.map(range(workers * 4), progress=False))
        yield lambda n: collect(workload, pipe.map(items(workload, n), progress=False))


def papy_split_files(workload: str, workers: int) -> Iterator[Callable[[int], Any]]:
    """W6 on two process pools, the arrays passed as files (papy.io.dump_item/load_item)."""
    from papy import Pipeline, ProcessPool

    with ProcessPool(workers) as p1, ProcessPool(workers) as p2:
        pipe = Pipeline(workload)
        a = pipe.add(w.w6_a_file, pool=p1)
        pipe.add(w.w6_b_file, after=a, pool=p2)
        list(pipe.map(range(workers * 4), progress=False))
        yield lambda n: collect(workload, pipe.map(items(workload, n), progress=False))


# -- the machine's limit and the CPU part alone ----------------------------------------------


def _limit_worker(conn: Any, workload: str, index: int, workers: int) -> None:
    """Wait for ``n``; run the CPU work of items ``index, index + workers, ...``; send the
    outputs back in one message. Loop until ``None``."""
    fn = CPU_WORK[workload]
    while True:
        n = conn.recv()
        if n is None:
            return
        conn.send([fn(x) for x in range(index, n, workers)])


def limit(workload: str, workers: int) -> Iterator[Callable[[int], Any]]:
    """The machine's limit: the same CPU work split over ``workers`` plain processes.

    The processes are started (and have imported the workload) before the clock; the timed
    region sends each one ``n`` and receives its outputs once at the end: no IPC per item,
    no scheduling, no pickling of inputs. On a quiet 2-core machine this reaches 0.92-1.04
    of the 2-core ideal; what it reaches in the same round is what the machine gave.
    """
    import multiprocessing as mp

    ctx = mp.get_context()
    conns: list[Any] = []
    procs: list[Any] = []
    for i in range(workers):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_limit_worker, args=(child, workload, i, workers), daemon=True)
        proc.start()
        conns.append(parent)
        procs.append(proc)
    for c in conns:  # warm: every process has imported the workload and run it once
        c.send(workers)
    for c in conns:
        c.recv()

    def run(n: int) -> Any:
        for c in conns:
            c.send(n)
        out: list[Any] = [None] * n
        for i, c in enumerate(conns):
            out[i::workers] = c.recv()
        return out

    try:
        yield run
    finally:
        for c in conns:
            c.send(None)
        for proc in procs:
            proc.join(timeout=10)


def serial_cpu(workload: str, workers: int) -> Iterator[Callable[[int], Any]]:
    """The CPU part of the workload alone, in this process (W9: stage B without the sleep)."""
    fn = CPU_WORK[workload]
    yield lambda n: [fn(x) for x in range(n)]


# -- joblib ----------------------------------------------------------------------------------


def joblib_(workload: str, workers: int) -> Iterator[Callable[[int], Any]]:
    """joblib ``Parallel(n_jobs=workers)`` on loky processes, generator input and output,
    ``batch_size="auto"`` (its default). W9: a threading ``Parallel(n_jobs=-1)`` feeding a
    process one, as a user gives no counts."""
    from joblib import Parallel, delayed

    if workload == "W9":
        with (
            Parallel(n_jobs=-1, prefer="threads", return_as="generator") as io,
            Parallel(n_jobs=-1, return_as="generator") as cpu,
        ):
            list(cpu(delayed(abs)(i) for i in range(workers * 4)))
            yield lambda n: list(
                cpu(delayed(w.w9_b)(y) for y in io(delayed(w.w9_a)(x) for x in range(n)))
            )
        return
    with Parallel(n_jobs=workers, return_as="generator") as par:
        list(par(delayed(abs)(i) for i in range(workers * 4)))
        if workload == "W7":

            def run7(n: int) -> Any:
                flat = (s for x in range(n) for s in w.w7_split(x))
                return regroup(par(delayed(w.w7_work)(s) for s in flat), n)

            yield run7
            return
        fused = FUSED[workload]  # one Parallel call cannot feed another on the same workers
        yield lambda n: collect(workload, par(delayed(fused)(x) for x in items(workload, n)))


def joblib_threads(workload: str, workers: int) -> Iterator[Callable[[int], Any]]:
    """joblib on ``workers`` threads, the chain fused (W3)."""
    from joblib import Parallel, delayed

    with Parallel(n_jobs=workers, prefer="threads", return_as="generator") as par:
        fused = FUSED[workload]
        yield lambda n: list(par(delayed(fused)(x) for x in range(n)))


# -- Ray Data --------------------------------------------------------------------------------


class _RayStage:
    """A Ray Data ``map_batches`` callable class applying one stage function to a batch."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        return {"item": np.asarray([self.fn(v) for v in batch["item"].tolist()])}


def _ray_split(row: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"item": s} for s in w.w7_split(int(row["item"]))]


def ray_data(workload: str, workers: int) -> Iterator[Callable[[int], Any]]:
    """Ray Data: ``from_items`` then one ``map_batches`` per stage, each on an autoscaling
    actor pool (``ActorPoolStrategy(min_size=1, max_size=workers)``), a local Ray instance
    of ``workers`` CPUs started before the clock. Ray Data does not keep the input order,
    so the outputs are sorted (W7: regrouped) outside the clock's meaning of work."""
    try:
        import ray
        import ray.data
    except ImportError as exc:  # no wheel for this Python or platform
        raise SystemExit(f"Ray Data is not installed ({exc}): pip install 'ray[data]'") from exc

    # The raylet must register within a fixed 30 s, which a loaded 2-core machine can miss:
    # try three times, then say why.
    for attempt in range(3):
        try:
            ray.init(
                num_cpus=workers,
                include_dashboard=False,
                log_to_driver=False,
                logging_level=40,  # logging.ERROR
                runtime_env={
                    "env_vars": {
                        "PAPY_BENCH_LOOPS": os.environ.get("PAPY_BENCH_LOOPS", ""),
                        "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
                    }
                },
            )
            break
        except Exception as exc:
            ray.shutdown()
            if attempt == 2:
                raise SystemExit(
                    f"Ray could not start: {exc} (3 tries, load average {os.getloadavg()[0]:.1f})"
                ) from exc
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    stages = [w.w7_work] if workload == "W7" else CHAINS[workload]

    def run(n: int) -> Any:
        ds: Any = ray.data.from_items(list(range(n)))
        if workload == "W7":
            ds = ds.flat_map(_ray_split)
        for f in stages:
            ds = ds.map_batches(
                _RayStage,
                fn_constructor_args=(f,),
                compute=ray.data.ActorPoolStrategy(min_size=1, max_size=workers),
                batch_format="numpy",
            )
        out: list[Any] = []
        for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
            out.extend(batch["item"].tolist())
        if workload == "W7":
            return regroup(out, n)
        return sorted(out)

    # No warm-up run here: the check run before the clock starts Ray's worker processes.
    try:
        yield run
    finally:
        ray.shutdown()


# -- threads (W3, W10) --------------------------------------------------------------------------


def threads_nested(workload: str, workers: int) -> Iterator[Callable[[int], Any]]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as ex:
        if workload == "W10":  # one map per sibling, joined by zip: the obvious way
            yield lambda n: map(
                w.w10_join, *(ex.map(f, range(n)) for f in (w.w10_a, w.w10_b, w.w10_c))
            )
            return

        def run(n: int) -> Any:
            it: Iterable[Any] = range(n)
            for f in CHAINS[workload]:
                it = ex.map(f, it)
            return list(it)

        yield run


def mp_threads_nested(workload: str, workers: int) -> Iterator[Callable[[int], Any]]:
    from multiprocessing.pool import ThreadPool

    with ThreadPool(workers) as pool:
        if workload == "W10":
            yield lambda n: map(
                w.w10_join, *(pool.imap(f, range(n)) for f in (w.w10_a, w.w10_b, w.w10_c))
            )
            return

        def run(n: int) -> Any:
            it: Iterable[Any] = range(n)
            for f in CHAINS[workload]:
                it = pool.imap(f, it)
            return list(it)

        yield run


def mpire_threads(workload: str, workers: int) -> Iterator[Callable[[int], Any]]:
    from mpire import WorkerPool

    with WorkerPool(n_jobs=workers, start_method="threading", keep_alive=True) as pool:
        pool.map(abs, range(workers))
        yield lambda n: pool.map(FUSED[workload], range(n), chunk_size=1)


def pypeln_threads(workload: str, workers: int) -> Iterator[Callable[[int], Any]]:
    import pypeln as pl

    per_stage = max(1, workers // len(CHAINS[workload]))

    def run(n: int) -> Any:
        stage: Any = range(n)
        for f in CHAINS[workload]:
            stage = pl.thread.map(f, stage, workers=per_stage)
        return sorted(stage)

    yield run


def dask_bag_threads(workload: str, workers: int) -> Iterator[Callable[[int], Any]]:
    import dask.bag as db

    def run(n: int) -> Any:
        bag = db.from_sequence(range(n), npartitions=workers)
        if workload == "W10":  # a DAG, but every output arrives at the end
            sibs = [bag.map(f) for f in (w.w10_a, w.w10_b, w.w10_c)]
            return db.map(w.w10_join, *sibs).compute(scheduler="threads", num_workers=workers)
        for f in CHAINS[workload]:
            bag = bag.map(f)
        return bag.compute(scheduler="threads", num_workers=workers)

    yield run


def papy_threads(workload: str, workers: int) -> Iterator[Callable[[int], Any]]:
    from papy import Pipeline, ThreadPool

    with ThreadPool(workers) as pool:
        pipe = Pipeline(workload, pool=pool)
        if workload == "W10":  # three sibling sources on the shared pool, joined per item
            sibs = [pipe.add(f) for f in (w.w10_a, w.w10_b, w.w10_c)]
            pipe.add(w.w10_join, after=sibs)
            yield lambda n: pipe.map(range(n), progress=False)
            return
        prev = None
        for f in CHAINS[workload]:
            prev = pipe.add(f, after=prev)
        yield lambda n: list(pipe.map(range(n), progress=False))


# -- Dask distributed (W8) ----------------------------------------------------------------


def _local_cluster(workers: int) -> Any:
    from distributed import LocalCluster

    return LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None
    )


def dask_futures(workload: str, workers: int) -> Iterator[Callable[[int], Any]]:
    from distributed import Client

    with _local_cluster(workers) as cluster, Client(cluster) as client:
        client.gather(client.map(abs, range(8)))
        yield lambda n: client.gather(client.map(FUSED[workload], range(n), pure=False))


def dask_bag_distributed(workload: str, workers: int) -> Iterator[Callable[[int], Any]]:
    import dask.bag as db
    from distributed import Client

    with _local_cluster(workers) as cluster, Client(cluster) as client:

        def run(n: int) -> Any:
            bag = db.from_sequence(range(n), npartitions=workers * 8)
            for f in CHAINS[workload]:
                bag = bag.map(f)
            return client.compute(bag).result()

        yield run


def papy_dask(workload: str, workers: int) -> Iterator[Callable[[int], Any]]:
    from papy import Pipeline
    from papy.pools.dask import DaskPool

    with _local_cluster(workers) as cluster, DaskPool(cluster.scheduler_address) as pool:
        pipe = Pipeline(workload, pool=pool)
        prev = None
        for f in CHAINS[workload]:
            prev = pipe.add(f, after=prev)
        list(pipe.map(range(8), progress=False))
        yield lambda n: list(pipe.map(range(n), progress=False))


CONTESTANTS = {
    f.__name__: f
    for f in (
        serial,
        mp_fused,
        mp_nested,
        concurrent_futures,
        mpire,
        pypeln,
        dask_bag,
        papy,
        papy_journal,
        papy_journal_resume,
        papy_journal_cache,
        papy_split_pools,
        papy_split_files,
        threads_nested,
        mp_threads_nested,
        mpire_threads,
        pypeln_threads,
        dask_bag_threads,
        papy_threads,
        dask_futures,
        dask_bag_distributed,
        papy_dask,
        limit,
        serial_cpu,
        mp_pools,
        joblib_threads,
        ray_data,
    )
}
CONTESTANTS["joblib"] = joblib_
# Contestants whose outputs come in another order than the inputs'.
UNORDERED = ("pypeln", "pypeln_threads", "ray_data")


def drain(out: Any, first: int) -> tuple[Any, float | None]:
    """Consume an iterable of outputs (W10); return them and when output ``first`` arrived
    (``time.perf_counter()``). Anything else is returned as it is, with no time."""
    if isinstance(out, (list, int)):
        return out, None
    got: list[Any] = []
    t_first = None
    for v in out:
        got.append(v)
        if len(got) == first:
            t_first = time.perf_counter()
    return got, t_first


def correct(workload: str, contestant: str, got: Any, want: Any) -> bool:
    """Whether ``got`` is the workload's output (in any order where order is not kept)."""
    if got == want:
        return True
    if workload == "W3" or contestant in UNORDERED:
        return isinstance(got, list) and sorted(got) == sorted(want)
    return False


def main() -> None:
    """Run one cell: a correctness run of a tenth of the items, then the timed runs, each
    checked; print one JSON line with the times (none when any output was wrong)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("workload")
    ap.add_argument("contestant")
    ap.add_argument("n", type=int)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    global N_ITEMS
    N_ITEMS = args.n
    wl, who = args.workload, args.contestant
    want = expected(wl, args.n)
    first = max(1, -(-args.n // 10))  # the first 10% of the outputs
    load = [os.getloadavg()[0]]
    times: list[float] = []
    firsts: list[float] = []
    wrong = ""
    with Sampler() as sampler:
        gen: Any = CONTESTANTS[who](wl, args.workers)
        run = next(gen)
        # Correctness in front of the clock: a wrong contestant is never timed.
        n_check = max(1, args.n // 10)
        got, _ = drain(run(n_check), n_check)
        if not correct(wl, who, got, expected(wl, n_check)):
            wrong = f"wrong output on a check run of {n_check} items"
        for _ in range(args.repeats if not wrong else 0):
            sampler.sample()
            t0 = time.perf_counter()
            got, t_first = drain(run(args.n), first)
            t1 = time.perf_counter()
            sampler.sample()
            if not correct(wl, who, got, want):
                wrong = f"wrong output on a timed run of {args.n} items"
                break
            times.append(t1 - t0)
            firsts.append((t_first if t_first is not None else t1) - t0)
        gen.close()
    load.append(os.getloadavg()[0])
    result: dict[str, Any] = {
        "times": [] if wrong else times,
        "peak_rss": sampler.peak,
        "ok": not wrong,
        "load": load,
    }
    if wrong:
        result["wrong"] = wrong
    if wl == "W10" and not wrong:
        result["first_10pct"] = firsts
    print(json.dumps(result))


if __name__ == "__main__":
    main()
