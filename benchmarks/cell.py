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
}
#: the number of items the cell will run (set by main): lets a contestant prepare outside
#: the clock (papy_journal_resume fills its journal first)
N_ITEMS = 0


def expected(workload: str, n: int) -> Any:
    if workload in ("W1", "J1"):
        return [(x + 1) * 2 - 3 for x in range(n)]
    if workload in ("W2", "W3", "W4", "W8"):
        return [x + 1 for x in range(n)]
    if workload == "W5":
        return n * (n + 1)  # sum of 2 * (x + 1)
    if workload == "W6":
        return [2.0 * x for x in range(n)]
    if workload == "W7":
        return [sum(x * 100 + i for i in range(40)) for x in range(n)]
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


def concurrent_futures(workload: str, workers: int) -> Iterator[Callable[[int], Any]]:
    from concurrent.futures import ProcessPoolExecutor

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

    from papy import Pipeline, ProcessPool

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


# -- threads (W3) --------------------------------------------------------------------------


def threads_nested(workload: str, workers: int) -> Iterator[Callable[[int], Any]]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as ex:

        def run(n: int) -> Any:
            it: Iterable[Any] = range(n)
            for f in CHAINS[workload]:
                it = ex.map(f, it)
            return list(it)

        yield run


def mp_threads_nested(workload: str, workers: int) -> Iterator[Callable[[int], Any]]:
    from multiprocessing.pool import ThreadPool

    with ThreadPool(workers) as pool:

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
        for f in CHAINS[workload]:
            bag = bag.map(f)
        return bag.compute(scheduler="threads", num_workers=workers)

    yield run


def papy_threads(workload: str, workers: int) -> Iterator[Callable[[int], Any]]:
    from papy import Pipeline, ThreadPool

    with ThreadPool(workers) as pool:
        pipe = Pipeline(workload, pool=pool)
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
    )
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workload")
    ap.add_argument("contestant")
    ap.add_argument("n", type=int)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    args = ap.parse_args()
    global N_ITEMS
    N_ITEMS = args.n
    want = expected(args.workload, args.n)
    times = []
    ok = True
    with Sampler() as sampler:
        gen = CONTESTANTS[args.contestant](args.workload, args.workers)
        run = next(gen)
        for _ in range(args.repeats):
            sampler.sample()
            t0 = time.perf_counter()
            got = run(args.n)
            times.append(time.perf_counter() - t0)
            sampler.sample()
            if args.workload in ("W3",) or args.contestant.startswith("pypeln"):
                ok = ok and (got == want or sorted(got) == sorted(want))
            else:
                ok = ok and got == want
        gen.close()
    print(json.dumps({"times": times, "peak_rss": sampler.peak, "ok": ok}))


if __name__ == "__main__":
    main()
