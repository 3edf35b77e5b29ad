"""``async def`` nodes run on an event loop with a concurrency limit."""

from __future__ import annotations

import asyncio
import time

import pytest

from papy import Failure, Pipeline, ProcessPool, ThreadPool


async def fetch(x):
    await asyncio.sleep(0.05)
    return x * 2


def test_async_node_overlaps_waits_up_to_the_concurrency_limit():
    pipe = Pipeline("async", pool=ThreadPool(1))
    pipe.add(fetch, concurrency=50, batch=50)
    t0 = time.perf_counter()
    out = list(pipe.map(range(200)))
    elapsed = time.perf_counter() - t0
    assert out == [x * 2 for x in range(200)]
    # 200 sleeps of 50 ms on ONE thread: only concurrency makes this possible.
    assert elapsed < 200 * 0.05 / 4


def test_async_concurrency_limit_is_respected():
    running = 0
    peak = 0

    async def track(x):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        return x

    pipe = Pipeline("limit", pool=ThreadPool(1))
    pipe.add(track, concurrency=5, batch=40)
    assert list(pipe.map(range(40))) == list(range(40))
    assert peak == 5


def test_async_failures_timeouts_and_retries():
    attempts: dict[int, int] = {}

    async def flaky(x):
        attempts[x] = attempts.get(x, 0) + 1
        if x == 3:
            await asyncio.sleep(5)
        if x == 4 and attempts[x] == 1:
            raise ConnectionError("try again")
        if x == 5:
            raise ValueError("five")
        return x

    pipe = Pipeline("async-faults", pool=ThreadPool(1))
    pipe.add(flaky, timeout=0.2, retries=1, retry_on=ConnectionError, batch=8)
    out = list(pipe.map(range(8), errors="yield"))
    assert [o for o in out if not isinstance(o, Failure)] == [0, 1, 2, 4, 6, 7]
    assert isinstance(out[3], Failure) and out[3].exc_type == "TimeoutError"
    assert isinstance(out[5], Failure) and out[5].message == "five"
    assert attempts[4] == 2


async def interrupting(x):
    await asyncio.sleep(0)
    if x == 1:
        raise KeyboardInterrupt("k1")
    if x == 2:
        raise SystemExit(2)
    return x


@pytest.mark.parametrize("kind", ["thread", "process"])
@pytest.mark.parametrize("timeout", [None, 5.0])
def test_an_async_node_raising_keyboard_interrupt_fails_only_that_item(kind, timeout):
    # With a timeout, the coroutine runs in a Task of its own, whose KeyboardInterrupt
    # asyncio re-raises out of the event loop: it stopped the run (threads) or killed the
    # worker (processes).
    with ThreadPool(2) if kind == "thread" else ProcessPool(2) as pool:
        pipe = Pipeline("async-interrupt", pool=pool)
        pipe.add(interrupting, timeout=timeout)
        out = list(pipe.map(range(4), errors="yield"))
    assert out[0] == 0 and out[3] == 3
    assert [(f.item, f.exc_type, f.input_repr) for f in out[1:3]] == [
        (1, "KeyboardInterrupt", "1"),
        (2, "SystemExit", "2"),
    ]
    if kind == "process":
        assert pool.restarts == 0


async def _child_raises(x):
    await asyncio.sleep(0.01)
    if x == 2:
        raise KeyboardInterrupt("child")
    if x == 5:
        asyncio.get_running_loop().call_soon(_exit)  # a callback of the loop's own
        await asyncio.sleep(0.05)
    return x * 10


def _exit():
    raise SystemExit(5)


async def spawning(x):
    (out,) = await asyncio.gather(asyncio.ensure_future(_child_raises(x)))
    return out


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_an_interrupt_escaping_from_a_task_an_item_started_fails_only_that_item(kind):
    # asyncio lets KeyboardInterrupt and SystemExit of any task or callback out of its
    # event loop: the batch ran again item by item to find whose it was.
    with ThreadPool(2) if kind == "thread" else ProcessPool(2) as pool:
        pipe = Pipeline("escape", pool=pool)
        pipe.add(spawning, batch=8, concurrency=8)
        out = list(pipe.map(range(8), errors="yield"))
    failures = [(o.item, o.exc_type) for o in out if isinstance(o, Failure)]
    assert failures == [(2, "KeyboardInterrupt"), (5, "SystemExit")]
    assert [o for o in out if not isinstance(o, Failure)] == [0, 10, 30, 40, 60, 70]
