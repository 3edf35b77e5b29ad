"""The flag a process pool's manager waits on before it delivers a result (``Latch``)."""

from __future__ import annotations

import threading
import time

from papy.pools._latch import Latch


def test_a_new_latch_is_clear_and_a_wait_times_out() -> None:
    latch = Latch()
    t0 = time.monotonic()
    assert latch.wait(0.05) is False
    assert time.monotonic() - t0 >= 0.04


def test_set_is_seen_by_every_later_wait_until_cleared() -> None:
    latch = Latch()
    latch.set()
    latch.set()  # twice is fine
    assert latch.wait(0) and latch.wait(0)
    latch.clear()
    latch.clear()  # twice is fine
    assert latch.wait(0.01) is False
    latch.set()
    assert latch.wait(0)


def test_a_waiter_wakes_when_another_thread_sets_it() -> None:
    latch = Latch()
    woke: list[bool] = []
    waiter = threading.Thread(target=lambda: woke.append(latch.wait(10)))
    waiter.start()
    time.sleep(0.05)
    assert not woke  # still waiting
    latch.set()
    waiter.join(5)
    assert woke == [True]
