"""Memory stays bounded by the buffer, whatever the input size."""

from __future__ import annotations

import psutil
from helpers import double, inc

from papy import Pipeline, ProcessPool, ThreadPool


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


def run_counting(pipe, items, check) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    """Run ``pipe`` over ``items``, checking each output; return (outputs, the most input
    items read and not yet delivered at any time)."""
    produced = consumed = most = 0

    def source():  # type: ignore[no-untyped-def]
        nonlocal produced
        for item in items:
            produced += 1
            yield item

    for out in pipe.map(source()):
        check(out)
        consumed += 1
        most = max(most, produced - consumed)
    return consumed, most


def length_of_one_mib(out: int) -> None:
    assert out == 2**20


def test_default_buffer_shrinks_for_large_items_between_pools():
    with ProcessPool(2) as a, ProcessPool(1) as b:
        pipe = Pipeline("big-items")  # no buffer given
        made = pipe.add(make_block, pool=a)
        pipe.add(len, after=made, pool=b)
        consumed, max_in_flight = run_counting(pipe, range(600), length_of_one_mib)
    assert consumed == 600
    assert max_in_flight <= 300  # 256 MiB of 1 MiB items, not the 65,536 of small items


class Counted:
    """A large output (a 1 MiB list once pickled) that counts how often it is pickled."""

    pickled = 0

    def __init__(self, payload: list[bytes] | None = None) -> None:
        # 1,024 distinct objects: pickle writes each (one object repeated is memoized)
        self.payload = payload if payload is not None else [bytes(1024) for _ in range(1024)]

    def __reduce__(self):  # type: ignore[no-untyped-def]
        Counted.pickled += 1
        return (Counted, (self.payload,))


def make_counted(i: int) -> Counted:
    return Counted()


def payload_of_1024(out: int) -> None:
    assert out == 1024


def test_thread_pool_outputs_are_measured_by_sampling_and_still_bound_the_buffer():
    # A thread pool pickles nothing, so the buffer measures outputs by pickling one: every
    # task's cost 35 ms for a 100,000-entry dict. It samples now, and still sees the size.
    Counted.pickled = 0
    with ThreadPool(2) as a, ThreadPool(1) as b:  # two pools: the Counted values cross
        pipe = Pipeline("large-thread-outputs")  # no buffer given
        made = pipe.add(make_counted, pool=a, batch=1)
        pipe.add(lambda c: len(c.payload), after=made, pool=b, batch=1)
        consumed, max_in_flight = run_counting(pipe, range(1200), payload_of_1024)
    assert consumed == 1200
    assert 1 <= Counted.pickled <= 4 + 1200 // 8, Counted.pickled
    assert max_in_flight <= 300  # about 256 MiB of 1 MiB outputs, not 65,536 items


def test_large_inputs_are_measured_by_sampling_and_bound_the_buffer():
    Counted.pickled = 0
    with ThreadPool(2) as pool:
        pipe = Pipeline("large-inputs", pool=pool)  # no buffer given
        pipe.add(lambda c: len(c.payload), batch=1)
        items = (Counted() for _ in range(1200))
        consumed, max_in_flight = run_counting(pipe, items, payload_of_1024)
    assert consumed == 1200
    assert 1 <= Counted.pickled <= 4 + 1200 // 8, Counted.pickled
    assert max_in_flight <= 300  # about 256 MiB of 1 MiB inputs, not 65,536 items


def passthrough(i: int) -> int:
    return i


def one_mib(out: bytes) -> None:
    assert len(out) == 2**20


def test_the_buffer_opens_only_once_every_step_has_shown_its_output_size():
    # Small inputs, a first step with small outputs and a second making 1 MiB of each
    # item: the first step's sizes used to open the buffer to all its items before the
    # second step's first result was in.
    with ThreadPool(2) as a, ProcessPool(2) as b:
        pipe = Pipeline("small-then-large")  # no buffer given
        first = pipe.add(passthrough, pool=a)
        pipe.add(make_block, after=first, pool=b)
        consumed, max_in_flight = run_counting(pipe, range(3000), one_mib)
    assert consumed == 3000
    assert max_in_flight <= 600, max_in_flight  # about 256 MiB of 1 MiB outputs


def small_item_ok(out: int) -> None:
    assert isinstance(out, int)


def test_default_buffer_keeps_the_workers_fed_with_small_items_and_stays_bounded():
    # Tasks of trivial items last a few milliseconds; with 16,384 items in flight a pool
    # of two held two tasks per worker, and the workers waited for the driver between
    # tasks (W1 at 0.78x a hand-fused Pool.imap). The default is 65,536 items.
    with ProcessPool(2) as pool:
        pipe = Pipeline("small-items", pool=pool)  # no buffer given
        a = pipe.add(inc)
        pipe.add(double, after=a)
        consumed, max_in_flight = run_counting(pipe, range(300_000), small_item_ok)
    assert consumed == 300_000
    assert 16_384 < max_in_flight <= 65_536, max_in_flight
