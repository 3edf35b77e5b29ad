"""Oldest items first: sibling branches on one pool advance together, a cheap join behind
them delivers a steady stream instead of holding its items for a full batch, and a step
takes the items admitted first even when its parent's tasks finish out of order."""

from __future__ import annotations

import os
import random
import threading
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from papy import Pipeline, ProcessPool, ThreadPool
from papy._plan import compile_plan
from papy._queues import StepQueue, pick_batch

N = 600


class Progress:
    """Calls made per sibling, and the slowest sibling's count at each call of the fastest."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls = {"a": 0, "b": 0, "c": 0}
        self.lag = 0  # largest lead of sibling a over sibling c, in items

    def call(self, name: str, seconds: float, x: int) -> int:
        time.sleep(seconds)
        with self.lock:
            self.calls[name] += 1
            self.lag = max(self.lag, self.calls["a"] - self.calls["c"])
        return x


def _pipeline(progress: Progress, pool: ThreadPool) -> Pipeline:
    pipe = Pipeline("siblings", pool=pool)

    def a(x: int) -> int:
        return progress.call("a", 0.001, x)

    def b(x: int) -> int:
        return progress.call("b", 0.002, x)

    def c(x: int) -> int:
        return progress.call("c", 0.003, x)

    def join(x: int, y: int, z: int) -> int:
        return x + y + z

    sibs = [pipe.add(f) for f in (a, b, c)]
    pipe.add(join, after=sibs)
    return pipe


def test_cheap_join_behind_busy_siblings_delivers_a_tenth_before_half_the_work() -> None:
    progress = Progress()
    with ThreadPool(4) as pool:
        pipe = _pipeline(progress, pool)
        it = iter(pipe.map(range(N), progress=False))
        first = [next(it) for _ in range(N // 10)]  # the first tasks run one item each
        with progress.lock:
            c_done_at_first = progress.calls["c"]
        rest = list(it)
    assert [*first, *rest] == [3 * x for x in range(N)]
    # The join is trivially cheap, so its learned batch is huge; its items must still go
    # out once they have waited a task's time, not when the siblings run out of work.
    assert c_done_at_first < N // 2, c_done_at_first


def test_siblings_sharing_a_pool_advance_together() -> None:
    progress = Progress()
    with ThreadPool(4) as pool:
        out = list(_pipeline(progress, pool).map(range(N), progress=False))
    assert out == [3 * x for x in range(N)]
    assert progress.calls == {"a": N, "b": N, "c": N}
    # Sibling a is 3x cheaper than c; served by age, it may not run far ahead of c.
    assert progress.lag < N // 4, progress.lag


def _queue() -> StepQueue:
    pipe = Pipeline("one", pool=ThreadPool(1))
    pipe.add(lambda x: x, name="a")
    plan = compile_plan(pipe, {"a": pipe.pool})  # type: ignore[arg-type, dict-item]
    return StepQueue(plan.steps[0])


def test_a_queue_takes_the_oldest_items_first_whatever_order_they_arrived_in() -> None:
    q = _queue()
    q.push(range(3329, 7425), list(range(3329, 7425)))  # a parent's later task, done first
    keys, _, _ = q.take(10)
    assert keys == range(3329, 3339)
    q.push(range(4, 3329), list(range(4, 3329)))  # its earlier, smaller task, done later
    assert q.oldest() == 4
    keys, values, _ = q.take(1)
    assert list(keys) == [4] and values == [4]
    keys, _, _ = q.take(10_000)
    assert list(keys) == [*range(5, 3329), *range(3339, 7425)]
    assert q.ready == 0


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 30), min_size=1, max_size=12),
    order=st.randoms(use_true_random=False),
    takes=st.lists(st.integers(1, 40), min_size=1, max_size=30),
)
def test_every_item_is_taken_once_and_each_batch_starts_at_the_oldest(
    sizes: list[int], order: random.Random, takes: list[int]
) -> None:
    # Chunks of consecutive keys (a parent's tasks), pushed in a random order between takes.
    chunks: list[range] = []
    start = 0
    for n in sizes:
        chunks.append(range(start, start + n))
        start += n
    order.shuffle(chunks)
    q = _queue()
    waiting: set[int] = set()
    taken: list[Any] = []
    for i, size in enumerate(takes * 2):
        if chunks and (i % 2 == 0 or not waiting):
            c = chunks.pop()
            q.push(c, [k * 10 for k in c])
            waiting.update(c)
        if not waiting:
            continue
        assert q.oldest() == min(waiting)
        got, values, _ = q.take(size)
        keys = list(got)
        assert keys[0] == min(waiting)
        assert values == [k * 10 for k in keys]
        assert len(keys) == min(size, len(waiting))
        waiting.difference_update(keys)
        taken.extend(keys)
        assert q.ready == len(waiting)
    while chunks:
        c = chunks.pop()
        q.push(c, [k * 10 for k in c])
        waiting.update(c)
    if waiting:
        taken.extend(q.take(len(waiting))[0])
    assert sorted(taken) == list(range(start))


def slow(x: int) -> int:
    time.sleep(0.02)
    return x


def cheap(x: int) -> int:
    return x + 1


def pair(a: int, b: int) -> int:
    return a * 1000 + b


def test_an_ordered_output_keeps_flowing_when_a_parents_tasks_finish_out_of_order() -> None:
    # A cheap source feeding a slow node and a cheap one joined after them, on one process
    # pool, from an endless input: the source's tasks finish out of order, and the slow
    # node must still take the items admitted first, or the fourth output waits for
    # thousands of later items (it stalled here for about 100 s).
    with ProcessPool(2) as pool:
        pipe = Pipeline("out-of-order", pool=pool)
        s = pipe.add(cheap, name="s")
        a = pipe.add(slow, after=s, name="slow")
        b = pipe.add(cheap, after=s, name="c1")
        pipe.add(pair, after=[a, b], name="j")
        for trial in range(12):
            k = 3 + trial % 5
            it = pipe.map(iter(range(10**6)), progress=False)
            t0 = time.monotonic()
            got = [v for _, v in zip(range(k), it)]
            it.close()
            assert got == [pair(x + 1, x + 2) for x in range(k)]
            took = time.monotonic() - t0
            assert took < 30, f"trial {trial}: {k} outputs took {took:.0f} s"


def test_a_partial_batch_waits_for_an_idle_worker_or_its_due_time() -> None:
    q = _queue()  # one step on a ThreadPool(1): one worker, two task slots
    q.batch.value = 100
    q.push(range(10), list(range(10)))
    since = q.waiting_since()
    due_at = since + q.pool.target_task_s
    busy = {id(q.pool): 1}  # the one worker has a task: a slot is free, no worker idle
    best, _, due = pick_batch([q], busy, True, since)
    assert best is None and due == due_at  # held, and the scheduler wakes up then
    best, size, _ = pick_batch([q], busy, True, due_at + 0.001)
    assert best is q and size == 10  # waited a task's time: it goes
    idle = {id(q.pool): 0}
    best, size, _ = pick_batch([q], idle, True, since)
    assert best is q and size == 10  # an idle worker takes it at once
    best, _, _ = pick_batch([q], idle, False, since)
    assert best is None  # but full batches go first
    full = {id(q.pool): 2}
    assert pick_batch([q], full, True, due_at + 1)[0] is None  # no free slot at all


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    item_time=st.floats(1e-6, 0.5),
    target=st.sampled_from([0.02, 0.05, 0.2]),
    cap=st.integers(1, 8192),
    workers=st.integers(1, 32),
    ready=st.integers(1, 200_000),
)
def test_the_last_batches_shrink_to_a_share_of_what_waits_but_not_below_the_floor(
    item_time: float, target: float, cap: int, workers: int, ready: int
) -> None:
    """Once the input is all in, tasks take a share of what waits (so the workers end
    together), never more than a task of the target time, never more than an even share
    of what waits (every worker gets some of the last items) and otherwise never less
    than an eighth of the target; the share shrinks as fewer items wait."""
    batch = _queue().batch
    batch.learn(10, 10 * item_time, target, cap)
    size = batch.tail(ready, workers)
    assert 1 <= size <= batch.value <= cap
    per_task = min(batch.value, max(1, int(target / 8 / item_time)))
    even = -(-ready // workers)
    assert size >= min(per_task, even)  # the floor: an eighth of the target, or a share
    assert size <= max(min(per_task, even), -(-ready // (2 * workers)))  # a share
    assert size <= even  # never more than an even share: no worker is left without
    assert batch.tail(max(1, ready // 2), workers) <= size  # fewer waiting: no larger


def test_a_fixed_batch_stays_fixed_at_the_end() -> None:
    pipe = Pipeline("fixed", pool=ThreadPool(1))
    pipe.add(lambda x: x, name="a", batch=7)
    plan = compile_plan(pipe, {"a": pipe.pool})  # type: ignore[arg-type, dict-item]
    batch = StepQueue(plan.steps[0]).batch
    batch.learn(10, 1.0, 0.05, 100)
    assert batch.tail(3, 4) == 7 and batch.tail(100_000, 1) == 7


def slow_at_the_end(x: int) -> tuple[int, int, int]:
    """Cheap for items >= 0; 0.2 s for the others, which say where they ran."""
    if x < 0:
        time.sleep(0.2)
        return (x, threading.get_ident(), os.getpid())
    return (x, 0, 0)


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_costly_last_items_are_spread_over_the_workers(kind: str) -> None:
    # The tail's floor comes from the cheap items' time (an eighth of the target is
    # thousands of them), so the four costly items at the end went in one task, to one
    # worker: 0.81 s instead of 0.41 s on two. A task never takes more than an even share
    # of what waits now.
    pool = ThreadPool(2) if kind == "thread" else ProcessPool(2)
    with pool:
        pipe = Pipeline("costly-tail", pool=pool)
        pipe.add(slow_at_the_end)
        out = list(pipe.map([*range(4996), -1, -2, -3, -4]))
    assert [o[0] for o in out] == [*range(4996), -1, -2, -3, -4]
    assert len({(o[1], o[2]) for o in out if o[0] < 0}) == 2
