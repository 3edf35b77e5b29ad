"""Plain functions used by the tests (importable by worker processes)."""

from __future__ import annotations

import time


def inc(x: int) -> int:
    return x + 1


def double(x: int) -> int:
    return x * 2


def minus3(x: int) -> int:
    return x - 3


def add(a: int, b: int) -> int:
    return a + b


def add3(a: int, b: int, c: int) -> tuple[int, int, int]:
    return (a, b, c)


def explode(x: int) -> list[int]:
    return list(range(x))


def fail_on_7(x: int) -> int:
    if x % 10 == 7:
        raise ValueError(f"bad item {x}")
    return x


def slow_identity(x: int, seconds: float = 0.01) -> int:
    time.sleep(seconds)
    return x
