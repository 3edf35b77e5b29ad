"""Functions that fail for real: segfaults, hard exits, hangs, unpicklable results."""

from __future__ import annotations

import ctypes
import os
import threading
import time
import uuid
from pathlib import Path


def segfault_on(bad: set[int]):
    def fn(x: int) -> int:
        if x in bad:
            ctypes.string_at(0)  # a real SIGSEGV in the worker
        return x * 2

    return fn


def exit_on(bad: set[int]):
    def fn(x: int) -> int:
        if x in bad:
            os._exit(3)
        return x * 2

    return fn


def cpu_ms(x: int, ms: float = 1.0) -> int:
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        pass
    return x


def sleep_on(bad: set[int], seconds: float = 30.0):
    def fn(x: int) -> int:
        if x in bad:
            time.sleep(seconds)
        return x

    return fn


def flaky_once(counter_dir: str):
    """Fail the first attempt at every item; succeed on the second (counted in files)."""

    def fn(x: int) -> int:
        path = Path(counter_dir) / f"{x}.{uuid.uuid4().hex}"
        path.write_text("x")
        attempts = len(list(Path(counter_dir).glob(f"{x}.*")))
        if attempts < 2:
            raise ConnectionError(f"transient failure on {x}")
        return x

    return fn


def unpicklable_result(x: int):
    if x == 5:
        return threading.Lock()
    return x
