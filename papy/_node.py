"""Node: one function of a pipeline graph and how to run it.

A node is plain data about the graph (its functions, parents, children, pool, batch and
error settings); :class:`papy.Pipeline` makes nodes, the plan (``papy._graph``) compiles
them into steps, and nothing below the plan needs the Pipeline itself.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from papy._task import Call

if TYPE_CHECKING:
    from papy.pools._base import Pool

OnError = Literal["continue", "raise"]


def _fn_name(fn: Callable[..., Any]) -> str:
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return "lambda" if name == "<lambda>" else name


class Node:
    """One function of a pipeline and how to run it; made by :meth:`Pipeline.add`.

    Nodes are handles: pass them as ``after=`` to connect, or use their ``name``.
    """

    def __init__(
        self,
        pipeline: object,
        fns: list[Callable[..., Any]],
        name: str,
        parents: list[Node],
        *,
        pool: Pool | None,
        batch: int | None,
        ordered: bool,
        scatter: bool,
        gather: bool,
        batched: bool,
        args: Sequence[Any] | Sequence[tuple[Any, ...]],
        kwargs: dict[str, Any] | Sequence[dict[str, Any]] | None,
        retries: int,
        retry_on: tuple[type[BaseException], ...] | None,
        timeout: float | None,
        on_error: OnError,
        concurrency: int,
        cache: bool = False,
    ) -> None:
        #: the pipeline that made this node (identity only: nodes of two pipelines never mix)
        self.pipeline = pipeline
        self.fns = fns
        self.name = name
        self.parents = parents
        self.children: list[Node] = []
        self.pool = pool
        self.batch = batch
        self.ordered = ordered
        self.scatter = scatter
        self.gather = gather
        self.batched = batched
        self.retries = retries
        self.retry_on = retry_on
        self.timeout = timeout
        self.on_error = on_error
        self.concurrency = concurrency
        #: record this node's outputs in the journal and reuse them (``add(cache=True)``)
        self.cache = cache
        self.is_async = inspect.iscoroutinefunction(fns[0])
        per_args, per_kwargs = _split_arguments(fns, args, kwargs)
        self.call = Call(fns, per_args, per_kwargs)

    @property
    def is_source(self) -> bool:
        """Tell whether this node gets the input items (it has no parents)."""
        return not self.parents

    @property
    def is_sink(self) -> bool:
        """Tell whether this node's outputs leave the pipeline (it has no children)."""
        return not self.children

    def __repr__(self) -> str:
        after = ", ".join(p.name for p in self.parents)
        return f"Node({self.name!r}{', after=[' + after + ']' if after else ''})"


def _split_arguments(
    fns: list[Callable[..., Any]],
    args: Sequence[Any] | Sequence[tuple[Any, ...]],
    kwargs: dict[str, Any] | Sequence[dict[str, Any]] | None,
) -> tuple[list[tuple[Any, ...]], list[dict[str, Any]]]:
    """Give each composed function its extra arguments.

    ``args``/``kwargs`` are appended to every call. With several functions, a list with one
    tuple (dict) per function gives each its own, as PaPy 1's Worker did.
    """
    n = len(fns)
    per_function = (
        n > 1
        and isinstance(args, list)
        and len(args) == n
        and all(isinstance(a, tuple) for a in args)
    )
    per_args = [tuple(a) for a in args] if per_function else [tuple(args)] * n
    if isinstance(kwargs, list):
        if len(kwargs) != n:
            raise ValueError(f"kwargs has {len(kwargs)} dicts for {n} functions")
        per_kwargs = [dict(k) for k in kwargs]
    else:
        per_kwargs = [dict(kwargs or {})] * n  # type: ignore[arg-type]
    return per_args, per_kwargs
