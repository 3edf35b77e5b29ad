"""The differential fuzzer with a DaskPool among the pools, on a real two-worker cluster.

The graphs, faults and reference are ``tests/test_fuzz.py``'s; here one of a graph's pools
is a ``DaskPool`` on a cluster this module starts (a scheduler and two workers, one thread
each, under nannies, as separate processes). A node killing its worker (``os._exit``) kills
a Dask worker, which its nanny replaces: the item must fail with ``papy.WorkerCrashed`` and
every other item complete, as on a ProcessPool. The journaled fuzzer
(``tests/test_fuzz_journal.py``) runs here too, with a DaskPool. ``PAPY_FUZZ_DASK_EXAMPLES``
sets the number of examples of each.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import test_fuzz as fz
import test_fuzz_journal as fzj
from hypothesis import example, given, settings
from hypothesis import strategies as st

from integration.cluster import Cluster, start_scheduler, start_worker, wait_for_workers
from papy.pools.dask import DaskPool

EXAMPLES = int(os.environ.get("PAPY_FUZZ_DASK_EXAMPLES", "6"))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = start_scheduler(tmp_path_factory.mktemp("dask-fuzz"))
    try:
        start_worker(c, "fuzz-a")
        start_worker(c, "fuzz-b")
        wait_for_workers(c, 2)
        yield c
    finally:
        c.stop()


def with_dask(draw: st.DrawFn, graph: dict[str, Any]) -> dict[str, Any]:
    """Make one of a graph's pools (a process pool's place if it has one) a DaskPool."""
    kinds = [p[0] for p in graph["pools"]]
    spots = [i for i, k in enumerate(kinds) if k == "process"] or list(range(len(kinds)))
    spot = draw(st.sampled_from(spots))
    graph["pools"][spot] = ["dask", 2]
    for node in graph["nodes"]:
        # A process pool's worker-death faults: on Dask, the plain crash (a worker that
        # closed its descriptors and sleeps would hold a Dask worker's slot for 30 s).
        fault = node["fault"]
        if (
            (node["pool"] or 0) == spot
            and fault is not None
            and fault[0] in ("crash_fork", "hangup", "kill_siblings")
        ):
            node["fault"] = ["crash", *fault[1:]]
    return graph


@st.composite
def dask_graphs(draw: st.DrawFn) -> dict[str, Any]:
    """A fuzzer graph with a DaskPool among its pools."""
    return with_dask(draw, draw(fz.graphs()))


@st.composite
def journaled_dask_graphs(draw: st.DrawFn) -> dict[str, Any]:
    """A journaled fuzzer graph (see tests/test_fuzz_journal.py) with a DaskPool.

    In ``make test`` its items do not kill workers: a crash on Dask costs several worker
    restarts per run, four runs per example (the first test covers crashes; ``make fuzz``
    has them here too).
    """
    graph = with_dask(draw, draw(fzj.journaled()))
    if fz.PROFILE != "papy-fuzz":
        for node in graph["nodes"]:
            if node["fault"] is not None and node["fault"][0].startswith("crash"):
                node["fault"] = ["ValueError", *node["fault"][1:]]
    return graph


@pytest.fixture
def others(cluster: Cluster) -> Iterator[Any]:
    """Make the fuzzer's "dask" pools DaskPools on ``cluster``; yield what returns the pids
    of the cluster's processes (a nanny restarts the workers items kill: not leftovers)."""

    def pids() -> set[int]:
        started = [cluster.scheduler, *cluster.workers]  # the nannies: their workers below
        return {p.pid for p in started} | {p.pid for p in cluster.worker_processes()}

    fz.POOL_FACTORIES["dask"] = lambda workers: DaskPool(cluster.address)
    try:
        yield pids
    finally:
        del fz.POOL_FACTORIES["dask"]


@pytest.mark.timeout(0 if fz.PROFILE == "papy-fuzz" else 900)
@settings(settings.get_profile(fz.PROFILE), max_examples=EXAMPLES)
@example(
    # A crash on Dask: the item fails with papy.WorkerCrashed, its batch-mates complete.
    graph={"pools": [["dask", 2]], "nodes": [{"fault": ["crash", 3, 1]}], "inputs": [0, 1, 2]}
)
@given(graph=dask_graphs())
def test_fuzz_pipelines_with_a_dask_pool_match_the_reference(
    others: Any, graph: dict[str, Any]
) -> None:
    """Random graphs with a DaskPool give exactly what the reference evaluator says."""
    fz.check(graph, others=others)


@pytest.mark.timeout(0 if fz.PROFILE == "papy-fuzz" else 900)
@settings(settings.get_profile(fz.PROFILE), max_examples=EXAMPLES)
@given(graph=journaled_dask_graphs())
def test_fuzz_journaled_runs_with_a_dask_pool_match_a_fresh_run(
    others: Any, graph: dict[str, Any]
) -> None:
    """Journaled runs with a DaskPool, resumed and retried, give what a fresh run gives."""
    fzj.check(graph, others=others)
