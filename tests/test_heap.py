"""A process pool's workers keep freed heap for reuse (``ProcessPool(heap_keep=...)``)."""

from __future__ import annotations

import platform
import resource

import pytest

from papy import Pipeline, PoolError, ProcessPool
from papy.pools._heap import HEAP_KEEP, keep_freed_heap

GLIBC = platform.libc_ver()[0] == "glibc"  # mallopt is glibc's; elsewhere: no effect


def page_faults_remaking_arrays(rounds: int) -> int:
    """Make and free eight 1 MiB arrays ``rounds`` times; return the page faults it took
    after a first round (which faults the pages in once in any case)."""
    import numpy as np

    def batch() -> None:
        arrays = [np.full(131_072, 1.0) for _ in range(8)]
        del arrays

    batch()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        batch()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def _faults(pool: ProcessPool) -> int:
    with pool:
        pipe = Pipeline("heap", pool=pool)
        pipe.add(page_faults_remaking_arrays)
        (faults,) = pipe.map([5], progress=False)
        return faults


def test_workers_reuse_freed_arrays_pages_instead_of_faulting_them_in_again() -> None:
    if not GLIBC:  # documented: the setting does nothing without glibc, and says so
        assert keep_freed_heap(HEAP_KEEP) is False
        return
    kept = _faults(ProcessPool(1))
    given_back = _faults(ProcessPool(1, heap_keep=None))
    # 5 rounds x 8 MiB: 10,240 pages each time they are fresh, none when they are reused.
    assert given_back > 5_000, given_back
    assert kept < 500, kept


marker: list[str] = []


def mark() -> None:
    marker.append("ran")


def initialized(_: int) -> int:
    return len(marker)


def test_the_initializer_still_runs_in_each_worker_after_the_heap_is_set_up() -> None:
    with ProcessPool(2, initializer=mark) as pool:
        pipe = Pipeline("init", pool=pool)
        pipe.add(initialized)
        assert list(pipe.map(range(8), progress=False)) == [1] * 8


def broken_initializer() -> None:
    raise RuntimeError("no database")


def test_a_failing_initializer_still_stops_the_run_with_its_error() -> None:
    with ProcessPool(1, initializer=broken_initializer) as pool:
        pipe = Pipeline("init", pool=pool)
        pipe.add(initialized)
        with pytest.raises(PoolError, match="no database"):
            list(pipe.map(range(2), progress=False))


def test_heap_keep_must_be_a_size() -> None:
    with pytest.raises(ValueError, match="heap_keep"):
        ProcessPool(1, heap_keep=-1)
    for wrong in (256e6, "64", True, float("nan")):
        with pytest.raises(TypeError, match="heap_keep"):
            ProcessPool(1, heap_keep=wrong)  # type: ignore[arg-type]


def test_heap_keep_zero_gives_freed_memory_back_at_once() -> None:
    if not GLIBC:
        assert keep_freed_heap(0) is False
        return
    assert _faults(ProcessPool(1, heap_keep=0)) > 5_000
