"""Node functions for the process pool's cancel and shared-memory tests (importable by
worker processes)."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

MiB = 1 << 20


def append_then_wait(x: int, log: str, gate: str) -> int:
    """Append ``x`` to the file ``log``; item 0 then waits (30 s at most) for file ``gate``."""
    with open(log, "a") as fh:
        fh.write(f"{x}\n")
    deadline = time.monotonic() + 30
    while x == 0 and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.01)
    return x


def logged(log: str) -> list[int]:
    """Return the items :func:`append_then_wait` ran, in order."""
    path = Path(log)
    return [int(line) for line in path.read_text().split()] if path.exists() else []


def payload(x: int) -> dict[str, Any]:
    """Return large and small values of every kind that may travel out of band."""
    return {
        "array": np.arange(300_000, dtype=np.float64) * x,  # 2.3 MiB
        "matrix": np.full((600, 600), x, dtype=np.int32),  # 1.4 MiB, 2-D
        "fortran": np.asfortranarray(np.ones((600, 400)) * x),  # 1.8 MiB, F-ordered
        "bytes": bytes([x % 256]) * (2 * MiB),
        "bytearray": bytearray([x % 251]) * (MiB + 7),
        "nested": [(x, np.full(MiB // 8 + 1, x, dtype=np.float64)), {"small": np.arange(x)}],
        "small": np.arange(10) + x,
        "text": f"item {x}",
    }


def digest(value: Any) -> str:
    """Return a hash of everything in ``value`` (arrays by dtype, shape and content)."""
    h = hashlib.sha256()

    def visit(v: Any) -> None:
        if isinstance(v, np.ndarray):
            h.update(f"array{v.dtype}{v.shape}".encode())
            h.update(np.ascontiguousarray(v).tobytes())
        elif isinstance(v, (bytes, bytearray, memoryview)):
            h.update(type(v).__name__.encode())
            h.update(bytes(v))
        elif isinstance(v, dict):
            for k in sorted(v):
                h.update(repr(k).encode())
                visit(v[k])
        elif isinstance(v, (list, tuple)):
            h.update(f"{type(v).__name__}{len(v)}".encode())
            for item in v:
                visit(item)
        else:
            h.update(repr(v).encode())

    visit(value)
    return h.hexdigest()


def identity(value: Any) -> Any:
    return value


def scribble_and_sum(value: dict[str, Any]) -> float:
    """Write into the input array in place, then sum it (its writes must stay its own)."""
    arr = value["array"]
    arr += 1.0
    return float(arr.sum())


def array_sum(value: dict[str, Any]) -> float:
    return float(value["array"].sum())


def big_array(x: int) -> np.ndarray:
    return np.full(MiB // 8 * 2, float(x))  # 2 MiB


def first_and_last(arr: np.ndarray) -> float:
    return float(arr[0] + arr[-1])


#: a driver's global a forked worker reads (see read_inherited)
INHERITED: dict[str, np.ndarray] = {}


def read_inherited(_: int) -> tuple[float, float]:
    a = INHERITED["a"]
    return float(a[0]), float(a[-1])


def view_len(view: memoryview) -> tuple[int, str, tuple[int, ...], int]:
    """Return what a worker sees of a memoryview: size, format, shape and a checksum."""
    return view.nbytes, view.format, tuple(view.shape or ()), int(sum(view.cast("B")[::4096]))


def make_view(spec: tuple[int, str, bool]) -> memoryview:
    """Return a memoryview of ``n`` bytes in format ``fmt``, over bytes when ``readonly``."""
    n, fmt, readonly = spec
    data = bytes(range(256)) * (n // 256)
    return memoryview(data if readonly else bytearray(data)).cast(fmt)


def describe_view(view: memoryview) -> tuple[str, str, tuple[int, ...], bool, bytes]:
    return type(view).__name__, view.format, tuple(view.shape), view.readonly, view.tobytes()


def fork_a_late_reader(arr: np.ndarray, outdir: str) -> float:
    """Fork a child that reads ``arr`` after this task returned and writes what it saw."""
    first = float(arr[0])
    if os.fork() == 0:
        try:
            time.sleep(0.4)
            with open(os.path.join(outdir, str(int(first))), "w") as fh:
                fh.write(f"{arr.min()} {arr.max()}")
        finally:
            os._exit(0)
    return first


def crash_on_3(arr: np.ndarray) -> float:
    """Kill this worker (SIGKILL) on the array of item 3."""
    if arr[0] == 3.0:
        os.kill(os.getpid(), 9)
    return float(arr[0])


def slow_first_and_last(arr: np.ndarray) -> float:
    time.sleep(0.05)
    return float(arr[0] + arr[-1])


def digest_and_value(value: Any) -> tuple[str, Any]:
    return digest(value), value


def pair(a: Any, b: Any) -> tuple[Any, Any]:
    return a, b


def sum_after(value: dict[str, Any], scribbled: float) -> tuple[float, float]:
    """Sum the input array once another node wrote into its own view of it."""
    return scribbled, float(value["array"].sum())


_KEPT: list[tuple[float, np.ndarray]] = []


def keep_and_check(arr: np.ndarray) -> bool:
    """Keep every input array (a node with a cache, say); tell whether all are unchanged."""
    _KEPT.append((float(arr[0]), arr))
    return all(float(a[0]) == x and float(a[-1]) == x for x, a in _KEPT)


def many_arrays(x: int) -> list[np.ndarray]:
    """Return 40 arrays of 1 MiB: one result that needs 40 shared-memory segments."""
    return [np.full(MiB // 8, float(x)) for _ in range(40)]


def total(arrays: list[np.ndarray]) -> float:
    return float(sum(a[0] for a in arrays))
