"""DaskPool against a real cluster: scheduler and workers started by the test itself."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.cluster import Cluster, start_scheduler, start_worker, wait_for_workers
from papy import Failure, Pipeline, PoolError, ProcessPool, ThreadPool
from papy.pools.dask import DaskPool


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("dask")
    c = start_scheduler(tmp)
    try:
        start_worker(c, "cpu-worker")
        start_worker(c, "gpu-worker", resources="GPU=1")
        wait_for_workers(c, 2)
        yield c
    finally:
        c.stop()


def worker_name(x: int) -> tuple[int, str]:
    from distributed import get_worker

    return x, get_worker().name


def parse(line: str) -> list[int]:
    return [int(t) for t in line.split()]


def score(xs: list[int]) -> int:
    return sum(x * x for x in xs)


def cpu_ms(x: int, ms: float = 20.0) -> int:
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        pass
    return x


def _build(read_pool, parse_pool, score_pool) -> Pipeline:
    pipe = Pipeline("mixed")
    read = pipe.add(str.strip, pool=read_pool, name="read")
    nums = pipe.add(parse, after=read, pool=parse_pool)
    each = pipe.add(lambda xs: xs, after=nums, pool=parse_pool, scatter=True, name="each")
    sq = pipe.add(lambda x: [x, x + 1], after=each, pool=score_pool, name="pair")
    scored = pipe.add(score, after=sq, pool=score_pool)
    pipe.add(sum, after=scored, gather=True, pool=read_pool, name="total")
    return pipe


def test_mixed_local_and_remote_pipeline_equals_all_local(cluster):
    lines = [" ".join(str(i + j) for j in range(i % 7)) for i in range(200)]
    with ThreadPool(4) as io, ProcessPool(2) as cpu, DaskPool(cluster.address) as remote:
        local = list(_build(io, cpu, cpu).map(lines))
        mixed = list(_build(io, cpu, remote).map(lines))
        assert remote.workers == 2
    assert mixed == local
    assert local[3] == sum(x * x + (x + 1) ** 2 for x in range(3, 6))


def test_two_nodes_share_one_dask_pool(cluster):
    with DaskPool(cluster.address) as remote:
        pipe = Pipeline("shared", pool=remote)
        a = pipe.add(lambda x: x + 1, name="a")
        b = pipe.add(lambda x: x * 2, after=a, name="b")
        c = pipe.add(lambda x: x * 3, after=a, name="c")
        pipe.add(lambda x, y: (x, y), after=[b, c], name="join")
        assert list(pipe.map(range(50))) == [((x + 1) * 2, (x + 1) * 3) for x in range(50)]
        report = pipe.last_report
        assert report is not None
        assert {report.nodes[n].pool for n in "abc"} == {remote.describe()}


def test_resources_are_honoured(cluster):
    with DaskPool(cluster.address) as remote:
        gpu = remote.with_resources({"GPU": 1})
        with gpu:
            pipe = Pipeline("gpu")
            anywhere = pipe.add(lambda x: x, pool=ThreadPool(2), name="local")
            pipe.add(worker_name, after=anywhere, pool=gpu, batch=1)
            out = list(pipe.map(range(40)))
        assert gpu.workers == 1
    assert [x for x, _ in out] == list(range(40))
    assert {name for _, name in out} == {"gpu-worker"}


def test_worker_sigkilled_mid_run_loses_nothing(cluster):
    with DaskPool(cluster.address) as remote:
        pipe = Pipeline("kill", pool=remote)
        pipe.add(cpu_ms, batch=2)
        out = []
        killed = False
        for value in pipe.map(range(300), errors="yield"):
            out.append(value)
            if len(out) == 40 and not killed:
                victim = cluster.worker_processes()[0]
                os.kill(victim.pid, signal.SIGKILL)
                killed = True
        assert killed
    assert not [o for o in out if isinstance(o, Failure)]
    assert out == list(range(300))
    assert Counter(out).most_common(1)[0][1] == 1
    wait_for_workers(cluster, 2)  # the nanny restored the worker


def test_dead_address_fails_fast_with_a_clear_message():
    t0 = time.monotonic()
    pipe = Pipeline("dead", pool=DaskPool("tcp://127.0.0.1:9", connect_timeout=2))
    pipe.add(abs)
    with pytest.raises(PoolError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"):
        list(pipe.map([1]))
    assert time.monotonic() - t0 < 10


def test_cli_dask_option(cluster, tmp_path):
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "papy",
            "run",
            str(root / "examples" / "chain.py"),
            "--dask",
            cluster.address,
            "--no-progress",
        ],
        input="1\n2\n3\n",
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    assert r.returncode == 0, r.stderr
    assert [json.loads(x)["square"] for x in r.stdout.splitlines()] == [1, 4, 9]
    assert "daskx2" in r.stderr
