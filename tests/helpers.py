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


def live_descendants(pid: int | None = None) -> list:
    """Return the live processes under ``pid`` (default: this one), multiprocessing's own
    helpers excepted.

    A ``forkserver`` pool starts two long-lived helpers once per driver (the fork server
    and the resource tracker); they exit with the driver and are not workers.
    """
    import os

    import psutil

    root = pid or os.getpid()
    out = []
    for c in psutil.Process(root).children(recursive=True):
        try:
            if c.status() == psutil.STATUS_ZOMBIE:
                continue
            cmd = " ".join(c.cmdline())
            ppid = c.ppid()
        except psutil.NoSuchProcess:
            continue
        helper = "multiprocessing.forkserver" in cmd or "multiprocessing.resource_tracker" in cmd
        if helper and ppid == root:  # workers forked by the server share its command line
            continue
        out.append(c)
    return out


def unavailable(reason: str) -> None:
    """Fail a test whose machine lacks what it needs, saying what is missing.

    `make test` installs and starts every tool the tests use, so a missing tool is a
    broken set-up, never a reason to leave a feature untested: there is no skip.
    """
    import pytest

    pytest.fail(f"this test needs what `make test` sets up: {reason}")
