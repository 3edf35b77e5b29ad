"""Local and remote pools in one pipeline: cheap I/O on threads, heavy work on a cluster.

Starts a small local Dask cluster so it runs anywhere; on a real cluster, pass the
scheduler's address instead: ``DaskPool("tcp://scheduler:8786")``.

    python examples/dask_pool.py
"""

from distributed import LocalCluster

from papy import DaskPool, Pipeline, ThreadPool


def score(n: int) -> int:
    return sum(i * i for i in range(n * 1000))


def build(remote: DaskPool, io: ThreadPool) -> Pipeline:
    pipe = Pipeline("hybrid")
    parsed = pipe.add(int, pool=io, name="parse")
    scored = pipe.add(score, after=parsed, pool=remote)
    pipe.add(lambda s: f"score {s}", after=scored, pool=io, name="format")
    return pipe


if __name__ == "__main__":
    with (
        LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as cluster,
        DaskPool(cluster.scheduler_address) as remote,
        ThreadPool(4) as io,
    ):
        for line in build(remote, io).map(["1", "2", "3", "4"]):
            print(line)
