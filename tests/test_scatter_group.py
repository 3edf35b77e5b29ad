"""A scatter, the 1:1 nodes after it and its gather run as one task while enough items wait.

Results, failures and counts must be those of the plain evaluation; the last items go the
plain way so their sub-items spread over the workers.
"""

from __future__ import annotations

import os
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from papy import Failure, Pipeline, ProcessPool, ThreadPool


def split(x: int) -> list[tuple[int, int, int]]:
    if x % 11 == 7:
        raise ValueError(f"cannot split {x}")
    return [(x, threading.get_ident(), j) for j in range(x % 4)]


def work(sub: tuple[int, int, int]) -> tuple[int, int, int]:
    x, pid, j = sub
    if (x + j) % 13 == 5:
        raise KeyError(sub)
    return (x * 10 + j, pid, threading.get_ident())


def total(subs: list[tuple[int, int, int]]) -> tuple[int, bool]:
    return sum(v for v, _, _ in subs), all(a == b for _, a, b in subs)


def expected(x: int) -> object:
    if x % 11 == 7 or any((x + j) % 13 == 5 for j in range(x % 4)):
        return None
    return sum(x * 10 + j for j in range(x % 4))


def _pipe(pool: object) -> Pipeline:
    pipe = Pipeline("group", pool=pool)  # type: ignore[arg-type]
    s = pipe.add(split, scatter=True)
    k = pipe.add(work, after=s)
    pipe.add(total, after=k, gather=True)
    return pipe


@pytest.mark.parametrize("kind", [ThreadPool, ProcessPool])
def test_results_and_failures_are_the_plain_ones(kind: type) -> None:
    with kind(2) as pool:
        pipe = _pipe(pool)
        out = list(pipe.map(range(300), errors="yield"))
    got = [None if isinstance(v, Failure) else v[0] for v in out]
    assert got == [expected(x) for x in range(300)]
    report = pipe.last_report
    assert report is not None
    subs = sum(x % 4 for x in range(300) if x % 11 != 7) + sum(1 for x in range(300) if x % 11 == 7)
    assert report.nodes["split"].items_out == subs
    assert report.nodes["work"].items_in == subs
    assert report.nodes["total"].items_in == 300
    assert report.nodes["split"].failed == sum(1 for x in range(300) if x % 11 == 7)


def test_sub_items_stay_in_their_worker_while_enough_items_wait() -> None:
    with ThreadPool(2) as pool:
        pipe = _pipe(pool)
        out = list(pipe.map(range(200), errors="skip"))
    same = [together for _, together in out]
    # Items taken as a group run split, work and total in one worker; only the last few
    # (fewer than two per worker waiting) go the plain way.
    assert sum(same) >= len(same) - 8


def test_a_crash_in_a_sub_item_fails_only_its_item() -> None:
    def crash(sub: tuple[int, int, int]) -> tuple[int, int, int]:
        if sub[0] == 22 and sub[2] == 1:
            os._exit(3)
        return work(sub)

    with ProcessPool(2) as pool:
        pipe = Pipeline("crash", pool=pool)
        s = pipe.add(split, scatter=True)
        k = pipe.add(crash, after=s)
        pipe.add(total, after=k, gather=True)
        out = list(pipe.map(range(60), errors="yield"))
    bad = [x for x, v in enumerate(out) if isinstance(v, Failure)]
    assert 22 in bad
    # The crash names the sub-item and the node, as the plain evaluation does.
    crashed = out[22]
    assert (crashed.node, crashed.item, crashed.exc_type) == (
        "crash",
        (22, 1),
        "papy.WorkerCrashed",
    )
    assert [None if isinstance(v, Failure) else v[0] for v in out] == [
        None if x == 22 else expected(x) for x in range(60)
    ]


@settings(max_examples=25, deadline=None)
@given(
    counts=st.lists(st.integers(0, 6), min_size=0, max_size=40),
    fail_at=st.sets(st.integers(0, 40), max_size=4),
    batch=st.sampled_from([None, 1, 3]),
)
def test_any_scatter_sizes_on_threads(
    counts: list[int], fail_at: set[int], batch: int | None
) -> None:
    def scatter(x: int) -> list[int]:
        return [x * 100 + j for j in range(counts[x])]

    def sub(y: int) -> int:
        if y // 100 in fail_at and y % 100 == 0:
            raise RuntimeError(y)
        return y + 1

    with ThreadPool(2) as pool:
        pipe = Pipeline("sizes", pool=pool)
        s = pipe.add(scatter, scatter=True, batch=batch)
        k = pipe.add(sub, after=s)
        pipe.add(lambda ys: list(ys), after=k, gather=True, name="regroup")
        out = list(pipe.map(range(len(counts)), errors="yield"))
    want = [
        None if (x in fail_at and counts[x]) else [x * 100 + j + 1 for j in range(counts[x])]
        for x in range(len(counts))
    ]
    assert [None if isinstance(v, Failure) else v for v in out] == want
