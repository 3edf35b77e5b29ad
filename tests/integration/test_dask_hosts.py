"""DaskPool across separate hosts (network namespaces): a worker host is cut off mid-run."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
from helpers import unavailable

from integration.cluster import Hosts, have_netns, start_scheduler, start_worker, wait_for_workers
from papy import Failure, Pipeline
from papy.pools.dask import DaskPool

_why_not = have_netns()


@pytest.fixture(autouse=True)
def _needs_netns() -> None:
    if _why_not is not None:
        unavailable(f"network namespaces: {_why_not}")


def slow_square(x: int) -> tuple[int, str]:
    from distributed import get_worker

    time.sleep(0.05)
    return x * x, get_worker().name


def test_worker_host_cut_off_mid_run_loses_nothing(tmp_path):
    hosts = Hosts(["papy-sched", "papy-h1", "papy-h2"])
    hosts.up()
    cluster = None
    try:
        cluster = start_scheduler(
            tmp_path, host=hosts.address["papy-sched"], prefix=hosts.prefix("papy-sched")
        )
        for h in ("papy-h1", "papy-h2"):
            start_worker(cluster, h, host=hosts.address[h], prefix=hosts.prefix(h))
        wait_for_workers(cluster, 2)
        with DaskPool(cluster.address) as remote:
            pipe = Pipeline("hosts", pool=remote)
            pipe.add(lambda x: (x, slow_square(x)), batch=2, name="square")
            out = []
            cut_at = None
            for value in pipe.map(range(200), errors="yield"):
                out.append(value)
                if len(out) == 30 and cut_at is None:
                    cut_at = time.monotonic()
                    threading.Thread(target=hosts.cut, args=("papy-h1",)).start()
        assert not [o for o in out if isinstance(o, Failure)]
        assert [x for x, _ in out] == list(range(200))
        assert [sq for _, (sq, _) in out] == [x * x for x in range(200)]
        assert max(Counter(x for x, _ in out).values()) == 1
        workers = Counter(name for _, (_, name) in out)
        assert set(workers) == {"papy-h1", "papy-h2"}  # both hosts worked before the cut
        assert workers["papy-h2"] > workers["papy-h1"]  # and h2 took over h1's share
    finally:
        if cluster is not None:
            cluster.stop()
        hosts.down()
