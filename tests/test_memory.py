"""Memory stays bounded by the buffer, whatever the input size."""

from __future__ import annotations

import psutil
from helpers import double, inc

from papy import Pipeline, ProcessPool


def test_ten_million_item_generator_runs_with_bounded_in_flight_items():
    buffer = 5_000
    produced = 0
    consumed = 0
    max_in_flight = 0

    def source():
        nonlocal produced
        for i in range(10_000_000):
            produced += 1
            yield i

    rss = psutil.Process().memory_info().rss
    with ProcessPool(2) as pool:
        pipe = Pipeline("big", pool=pool, buffer=buffer)
        a = pipe.add(inc)
        pipe.add(double, after=a)
        total = 0
        for out in pipe.map(source()):
            consumed += 1
            total += out
            if consumed % 1024 == 0:
                max_in_flight = max(max_in_flight, produced - consumed)
        grown = psutil.Process().memory_info().rss - rss
    n = 10_000_000
    assert consumed == n
    assert total == 2 * (n * (n + 1) // 2)
    assert max_in_flight <= buffer
    assert grown < 50 * 2**20, f"driver memory grew by {grown / 2**20:.0f} MiB"


def make_block(i):
    return bytes(2**20)  # 1 MiB per item


def test_default_buffer_shrinks_for_large_items_between_pools():
    produced = 0
    consumed = 0
    max_in_flight = 0

    def source():
        nonlocal produced
        for i in range(600):
            produced += 1
            yield i

    with ProcessPool(2) as a, ProcessPool(1) as b:
        pipe = Pipeline("big-items")  # no buffer given
        made = pipe.add(make_block, pool=a)
        pipe.add(len, after=made, pool=b)
        for out in pipe.map(source()):
            assert out == 2**20
            consumed += 1
            max_in_flight = max(max_in_flight, produced - consumed)
    assert consumed == 600
    assert max_in_flight <= 300  # 256 MiB of 1 MiB items, not the 16,384 of small items
