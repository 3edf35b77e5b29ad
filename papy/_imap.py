"""The one-node shortcut: ``imap(f, items)`` is a pipeline with a single node."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from papy._pipeline import ErrorMode, Pipeline
from papy.pools._base import Pool


def imap(
    fn: Callable[..., Any],
    items: Iterable[Any],
    *,
    pool: Pool | None = None,
    batch: int | None = None,
    buffer: int | None = None,
    ordered: bool = True,
    errors: ErrorMode = "raise",
    **node_options: Any,
) -> Iterator[Any]:
    """Apply ``fn`` to every item in parallel; yield results lazily (in input order).

    Like ``multiprocessing.Pool.imap`` but with PaPy's batching, bounded buffer, failure
    handling and crash recovery. ``node_options`` are those of :meth:`Pipeline.add`
    (``retries``, ``timeout``, ``batched``, ``args``, ``kwargs``...).
    """
    name = getattr(fn, "__name__", "imap")
    pipe = Pipeline(f"imap:{name}", pool=pool, buffer=buffer)
    pipe.add(fn, batch=batch, ordered=ordered, **node_options)
    return pipe.map(items, errors=errors)
