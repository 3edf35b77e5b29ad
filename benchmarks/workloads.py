"""Workload functions, importable by every contestant's workers.

CPU work is a pure-Python loop calibrated once by the runner (``PAPY_BENCH_LOOPS`` per
millisecond), so every contestant does exactly the same work per item.
"""

from __future__ import annotations

import os
import time

LOOPS_PER_MS = int(os.environ.get("PAPY_BENCH_LOOPS", "20000"))


def burn(x: int, ms: float) -> int:
    """Spend about ``ms`` milliseconds of pure-Python CPU time; return ``x``."""
    acc = 0
    for i in range(int(LOOPS_PER_MS * ms)):
        acc += i & 7
    return x + (acc & 0)


def calibrate() -> int:
    """Return loop iterations per millisecond of ``burn`` on this machine."""
    n = 200_000
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        acc = 0
        for i in range(n):
            acc += i & 7
        best = min(best, time.perf_counter() - t0)
    return int(n / (best * 1000))


# W1: three trivial 1:1 stages
def w1_a(x: int) -> int:
    return x + 1


def w1_b(x: int) -> int:
    return x * 2


def w1_c(x: int) -> int:
    return x - 3


def w1_fused(x: int) -> int:
    return w1_c(w1_b(w1_a(x)))


# W2 / W8: two stages of ~1 ms CPU
def w2_a(x: int) -> int:
    return burn(x, 1.0)


def w2_b(x: int) -> int:
    return burn(x, 1.0) + 1


def w2_fused(x: int) -> int:
    return w2_b(w2_a(x))


# W3: two stages sleeping 10 ms
def w3_a(x: int) -> int:
    time.sleep(0.01)
    return x


def w3_b(x: int) -> int:
    time.sleep(0.01)
    return x + 1


def w3_fused(x: int) -> int:
    return w3_b(w3_a(x))


# W4: unbalanced stages
def w4_a(x: int) -> int:
    return burn(x, 0.5)


def w4_b(x: int) -> int:
    return burn(x, 2.0) + 1


def w4_fused(x: int) -> int:
    return w4_b(w4_a(x))


# W5: memory, trivial stages
def w5_a(x: int) -> int:
    return x + 1


def w5_b(x: int) -> int:
    return x * 2


def w5_fused(x: int) -> int:
    return w5_b(w5_a(x))


# W6: 1 MB numpy payload made by stage A, reduced by stage B
def w6_a(x: int):  # type: ignore[no-untyped-def]
    import numpy as np

    return np.full(131_072, float(x))  # 1 MiB of float64


def w6_b(arr) -> float:  # type: ignore[no-untyped-def]
    return float(arr[0] + arr[-1])


def w6_fused(x: int) -> float:
    return w6_b(w6_a(x))


def w6_a_file(x: int):  # type: ignore[no-untyped-def]
    from papy.io import dump_item

    return dump_item(w6_a(x))


def w6_b_file(path) -> float:  # type: ignore[no-untyped-def]
    from papy.io import load_item

    return w6_b(load_item(path, mmap=True))


# W7: scatter 40 sub-items of ~1 ms, gather per item
def w7_split(x: int) -> list[int]:
    return [x * 100 + i for i in range(40)]


def w7_work(s: int) -> int:
    return burn(s, 1.0)


def w7_sum(xs: list[int]) -> int:
    return sum(xs)


def w7_item(x: int) -> int:
    return w7_sum([w7_work(s) for s in w7_split(x)])


# W9: an I/O stage feeding a CPU stage, pools sized by nobody
def w9_a(x: int) -> int:
    time.sleep(0.01)
    return x


def w9_b(x: int) -> int:
    return burn(x, 2.0) + 1


def w9_fused(x: int) -> int:
    return w9_b(w9_a(x))


# W10: three sibling nodes of unequal cost on one thread pool, joined per item
def w10_a(x: int) -> int:
    time.sleep(0.001)
    return x


def w10_b(x: int) -> int:
    time.sleep(0.002)
    return x + 1


def w10_c(x: int) -> int:
    time.sleep(0.003)
    return x + 2


def w10_join(a: int, b: int, c: int) -> int:
    return a + b + c
