"""Oldest items first: sibling branches on one pool advance together, and a cheap join
behind them delivers a steady stream instead of holding its items for a full batch."""

from __future__ import annotations

import threading
import time

from papy import Pipeline, ThreadPool

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
