"""Sources, sinks and files as items.

Sources read lazily (one line or row at a time), so they feed a pipeline without loading a
dataset into memory. Writers consume ``map()`` in order. :func:`dump_item` and
:func:`load_item` pass large payloads between nodes as files in the run directory instead
of through pipes: a path is a few bytes to send, and numpy arrays are stored as ``.npy``
so they can be memory-mapped back.
"""

from __future__ import annotations

import csv
import glob as _glob
import json
import os
import pickle
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from papy._rundir import open_private, run_dir

_HEADER_LOCK = threading.Lock()  # see load_item

__all__ = [
    "csv_rows",
    "dump_item",
    "files",
    "jsonl",
    "lines",
    "load_item",
    "run_dir",
    "write_csv",
    "write_jsonl",
]


def _paths(pattern: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(pattern, (str, Path)):
        text = str(pattern)
        if any(c in text for c in "*?["):
            return [Path(p) for p in sorted(_glob.glob(text, recursive=True))]
        return [Path(text)]
    return [Path(p) for p in pattern]


def files(pattern: str | Path, *, recursive: bool = True) -> Iterator[Path]:
    """Yield the files matching a glob pattern (``**`` recurses), sorted, lazily checked."""
    for p in sorted(_glob.iglob(str(pattern), recursive=recursive)):
        path = Path(p)
        if path.is_file():
            yield path


def lines(
    pattern: str | Path | Sequence[str | Path], *, strip: bool = True, skip_empty: bool = False
) -> Iterator[str]:
    """Yield the lines of one or more text files (a path, a glob, or a list), lazily."""
    for path in _paths(pattern):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                text = line.rstrip("\r\n") if strip else line
                if skip_empty and not text.strip():
                    continue
                yield text


def jsonl(pattern: str | Path | Sequence[str | Path]) -> Iterator[Any]:
    """Yield one JSON value per non-empty line of JSON-lines files, lazily."""
    for path in _paths(pattern):
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not valid JSON: {exc}") from None


def csv_rows(
    pattern: str | Path | Sequence[str | Path], *, header: bool = True, **fmt: Any
) -> Iterator[dict[str, str] | list[str]]:
    """Yield CSV rows lazily: dicts keyed by the header row, or lists with ``header=False``."""
    for path in _paths(pattern):
        with open(path, newline="", encoding="utf-8") as fh:
            reader: Iterable[Any] = csv.DictReader(fh, **fmt) if header else csv.reader(fh, **fmt)
            yield from reader


def write_jsonl(items: Iterable[Any], path: str | Path) -> int:
    """Write each item as one JSON line (in iteration order); return how many."""
    n = 0
    with open(path, "w", encoding="utf-8") as fh:
        for item in items:
            fh.write(json.dumps(item, default=str) + "\n")
            n += 1
    return n


def write_csv(
    items: Iterable[dict[str, Any] | Sequence[Any]],
    path: str | Path,
    *,
    fieldnames: Sequence[str] | None = None,
) -> int:
    """Write dict rows (header from the first row or ``fieldnames``) or list rows to CSV."""
    n = 0
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer: Any = None
        for row in items:
            if writer is None:
                if isinstance(row, dict):
                    writer = csv.DictWriter(fh, fieldnames=list(fieldnames or row.keys()))
                    writer.writeheader()
                else:
                    writer = csv.writer(fh)
                    if fieldnames:
                        writer.writerow(fieldnames)
            writer.writerow(row)
            n += 1
    return n


def dump_item(obj: Any, *, directory: str | Path | None = None, suffix: str = "") -> Path:
    """Write ``obj`` to a new file in the run directory and return its path.

    numpy arrays go to ``.npy`` (memory-mappable), bytes are written raw, anything else is
    pickled. Pass the path downstream and :func:`load_item` it there.
    """
    if directory is not None:
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        private: bool | None = folder.stat().st_uid != os.getuid()
    else:
        folder, private = run_dir(), None
    name = uuid.uuid4().hex
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is optional
        np = None  # type: ignore[assignment]
    if np is not None and isinstance(obj, np.ndarray) and obj.dtype != object:
        path = folder / f"{name}{suffix}.npy"
        with open_private(path, "wb", private) as fh:
            np.save(fh, obj, allow_pickle=False)
    elif isinstance(obj, (bytes, bytearray, memoryview)):
        path = folder / f"{name}{suffix}.bin"
        with open_private(path, "wb", private) as fh:
            fh.write(obj)
    else:
        path = folder / f"{name}{suffix}.pkl"
        with open_private(path, "wb", private) as fh:
            pickle.dump(obj, fh, protocol=pickle.HIGHEST_PROTOCOL)
    return path


def load_item(path: str | Path, *, mmap: bool = False, remove: bool = False) -> Any:
    """Read back what :func:`dump_item` wrote; ``mmap=True`` maps ``.npy`` files lazily."""
    path = Path(path)
    if path.suffix == ".npy":
        import numpy as np

        # NumPy parses the file's header with ast.literal_eval, and CPython 3.11's parser
        # is not safe in several threads at once ("SystemError: AST constructor recursion
        # depth mismatch", seen with two threads of a ThreadPool loading items). Only the
        # header is read under the lock: the data is mapped, and copied outside it.
        with _HEADER_LOCK:
            try:
                mapped = np.load(path, mmap_mode="r", allow_pickle=False)
            except ValueError:  # an empty array cannot be mapped
                mapped = np.load(path, allow_pickle=False)
        obj: Any = mapped if mmap or not isinstance(mapped, np.memmap) else np.array(mapped)
    elif path.suffix == ".bin":
        obj = path.read_bytes()
    else:
        with open(path, "rb") as fh:
            obj = pickle.load(fh)
    if remove and not mmap:
        path.unlink(missing_ok=True)
    return obj
