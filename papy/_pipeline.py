"""Pipeline and Node: building a graph of plain Python functions and running it.

A :class:`Pipeline` is a directed acyclic graph of :class:`Node` objects. Building it does
no work; :meth:`Pipeline.map` and :meth:`Pipeline.run` validate the graph, then hand it to
the scheduler (``papy._scheduler``), which evaluates it lazily over the input items.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from papy._draw import draw, to_dot, to_mermaid
from papy._errors import CycleError, GraphError
from papy._graph import (
    check_join_arity,
    cycle_in_flow_order,
    path_between,
    scatter_stacks,
    topological_order,
)
from papy._node import Node, OnError, _fn_name
from papy._report import Report
from papy._scheduler import Scheduler
from papy._task import Call

if TYPE_CHECKING:
    from papy.pools._base import Pool

ErrorMode = Literal["raise", "yield", "skip"]


class Pipeline:
    """A graph of functions evaluated as lazy, parallel maps over input items.

    ``pool`` is the pool for nodes that name none (default: a ProcessPool with one worker per
    core, made for each run and closed when it ends). ``buffer`` bounds how many input items
    are in flight at once in the whole run, which bounds memory (default: automatic, 65,536
    items, or fewer when outputs are large so that about 256 MB of them are in flight).
    ``workdir``: where files passed between nodes (:func:`papy.io.dump_item`, shell nodes
    with ``stdout="file"``) are written and kept; by default a temporary directory that is
    removed when the run ends.
    """

    def __init__(
        self,
        name: str = "pipeline",
        *,
        pool: Pool | None = None,
        buffer: int | None = None,
        workdir: str | Path | None = None,
    ) -> None:
        if buffer is not None and buffer < 1:
            raise ValueError(f"buffer must be at least 1, got {buffer}")
        self.name = name
        self.pool = pool
        self.buffer = buffer
        self.workdir = workdir
        self.nodes: list[Node] = []
        self._names: dict[str, Node] = {}
        self.last_report: Report | None = None

    # -- building --------------------------------------------------------------------------

    def add(
        self,
        fn_or_list: Callable[..., Any] | Sequence[Callable[..., Any]],
        *,
        after: Node | str | Sequence[Node | str] | None = None,
        name: str | None = None,
        pool: Pool | None = None,
        batch: int | None = None,
        ordered: bool = True,
        scatter: bool = False,
        gather: bool = False,
        batched: bool = False,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | Sequence[dict[str, Any]] | None = None,
        retries: int = 0,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] | None = None,
        timeout: float | None = None,
        on_error: OnError = "continue",
        concurrency: int = 64,
        cache: bool = False,
    ) -> Node:
        """Add a node that applies ``fn_or_list`` to the outputs of ``after``; return it.

        A node with no ``after`` is a source: it receives every input item. With k parents
        the function is called ``fn(out_1, ..., out_k, *args, **kwargs)`` in ``after`` order.
        ``scatter=True``: the function returns an iterable, each element becomes a sub-item.
        ``gather=True``: the function receives the list of sub-results of the nearest
        scatter upstream, in scatter order. ``batched=True``: the function receives a list
        of items (a batch) and returns a list of the same length. ``cache=True``: in a run
        with a journal, store this node's outputs there, keyed by the node's fingerprint and
        the input item's identity, and reuse them in later runs while neither changed.
        """
        fns: list[Callable[..., Any]] = (
            list(fn_or_list) if isinstance(fn_or_list, (list, tuple)) else [fn_or_list]  # type: ignore[list-item]
        )
        if not fns or not all(callable(f) for f in fns):
            raise TypeError(f"add() needs a function or a list of functions, got {fn_or_list!r}")
        parents = [self._resolve(a) for a in _as_list(after)]
        if batch is not None and batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if on_error not in ("continue", "raise"):
            raise ValueError(f"on_error must be 'continue' or 'raise', got {on_error!r}")
        if isinstance(retry_on, type):
            retry_on = (retry_on,)
        node_name = self._unique(name or "+".join(_fn_name(f) for f in fns), explicit=name)
        node = Node(
            self,
            fns,
            node_name,
            parents,
            pool=pool,
            batch=batch,
            ordered=ordered,
            scatter=scatter,
            gather=gather,
            batched=batched,
            args=args,
            kwargs=kwargs,
            retries=retries,
            retry_on=retry_on,
            timeout=timeout,
            on_error=on_error,
            concurrency=concurrency,
            cache=cache,
        )
        for p in parents:
            p.children.append(node)
        self.nodes.append(node)
        self._names[node_name] = node
        return node

    def connect(self, parent: Node | str, child: Node | str) -> None:
        """Add an edge after both nodes exist (``child`` gets one more input, last).

        Raise :class:`papy.CycleError` at once, and change nothing, if the edge would close
        a cycle.
        """
        p, c = self._resolve(parent), self._resolve(child)
        loop = path_between(c, p)
        if loop is not None:  # the new edge p -> c would close loop c -> ... -> p -> c
            raise CycleError(cycle_in_flow_order(loop, self.nodes))
        c.parents.append(p)
        p.children.append(c)
        c.call = Call(c.call.fns, c.call.args, c.call.kwargs)

    def node(self, name: str) -> Node:
        """Return the node called ``name``."""
        return self._resolve(name)

    def _resolve(self, ref: Node | str) -> Node:
        if isinstance(ref, Node):
            if ref.pipeline is not self:
                owner = getattr(ref.pipeline, "name", "?")
                raise GraphError(
                    f"node {ref.name!r} belongs to pipeline {owner!r}, "
                    f"not to {self.name!r}; add it to this pipeline"
                )
            return ref
        if isinstance(ref, str):
            try:
                return self._names[ref]
            except KeyError:
                raise GraphError(
                    f"no node named {ref!r} in pipeline {self.name!r}; "
                    f"nodes are: {', '.join(self._names) or '(none)'}"
                ) from None
        raise GraphError(f"after= takes nodes or node names, got {ref!r}")

    def _unique(self, base: str, explicit: str | None) -> str:
        if base not in self._names:
            return base
        if explicit is not None:
            raise GraphError(f"a node named {explicit!r} already exists in {self.name!r}")
        for i in itertools.count(2):
            candidate = f"{base}_{i}"
            if candidate not in self._names:
                return candidate
        raise AssertionError("unreachable")

    # -- inspecting ------------------------------------------------------------------------

    @property
    def sources(self) -> list[Node]:
        """Return the nodes that receive the input items."""
        return [n for n in self.nodes if n.is_source]

    @property
    def sinks(self) -> list[Node]:
        """Return the nodes whose outputs leave the pipeline."""
        return [n for n in self.nodes if n.is_sink]

    def validate(
        self, output: str | Node | None = None, *, need_single: bool = False
    ) -> Node | None:
        """Check the graph; return the output node. Raise GraphError saying what is wrong."""
        if not self.nodes:
            raise GraphError(f"pipeline {self.name!r} has no nodes; add some with add()")
        order = topological_order(self.nodes)
        scatter_stacks(order)
        for n in order:
            pool = n.pool or self.pool
            if n.timeout is not None and pool is not None and not pool.enforces_timeout:
                raise GraphError(
                    f"node {n.name!r} has timeout={n.timeout:g} but runs on {pool!r}, which "
                    "runs it in the caller's own thread where nothing can interrupt it; give "
                    "the node a ThreadPool or a ProcessPool"
                )
            check_join_arity(n)
        if output is not None:
            try:
                return self._resolve(output)
            except GraphError:
                raise GraphError(
                    f"output {output if isinstance(output, str) else output.name!r} is not a "
                    f"node of pipeline {self.name!r}; sinks are: "
                    f"{', '.join(n.name for n in self.sinks)}"
                ) from None
        if need_single:
            sinks = self.sinks
            if len(sinks) != 1:
                raise GraphError(
                    f"pipeline {self.name!r} has {len(sinks)} sinks "
                    f"({', '.join(repr(n.name) for n in sinks)}); pass output=NAME to map()"
                )
            return sinks[0]
        return None

    # -- running ---------------------------------------------------------------------------

    def map(
        self,
        items: Iterable[Any],
        *,
        output: str | Node | None = None,
        errors: ErrorMode = "raise",
        progress: bool | None = None,
        report: str | Path | None = None,
        journal: str | Path | None = None,
        key: Callable[[Any], Any] | None = None,
        retry_failed: bool = False,
        force: bool = False,
        profile: bool = False,
    ) -> RunIterator:
        """Yield the outputs of the sink (or of ``output``) lazily, in input order.

        ``errors``: ``"raise"`` raises :class:`papy.ItemFailed` when a failed item's turn
        comes, ``"yield"`` yields the :class:`papy.Failure`, ``"skip"`` drops it.
        ``progress``: live display (default: on when stderr is a terminal). ``report``: write
        the HTML run report there. ``journal``: a SQLite file that makes the run resumable
        (see :meth:`run`). ``profile``: log where the driver's time went (admitting,
        dispatching, waiting, routing, delivering, pickling) and show it in the report's
        table; the numbers are always in ``Report.driver``.
        """
        if errors not in ("raise", "yield", "skip"):
            raise ValueError(f"errors must be 'raise', 'yield' or 'skip', got {errors!r}")
        out = self.validate(output, need_single=True)
        return self._start(
            items,
            out,
            errors,
            progress=progress,
            report=report,
            journal=journal,
            key=key,
            retry_failed=retry_failed,
            force=force,
            profile=profile,
        )

    def run(
        self,
        items: Iterable[Any],
        *,
        progress: bool | None = None,
        report: str | Path | None = None,
        journal: str | Path | None = None,
        key: Callable[[Any], Any] | None = None,
        retry_failed: bool = False,
        force: bool = False,
        profile: bool = False,
    ) -> Report:
        """Run every item through the graph, drain all sinks, and return the Report.

        With ``journal="run.db"`` the run records each finished input item (known by a digest
        of its value, or by ``key(item)``, which must then be unique); running again with the
        same journal skips them, so an interrupted run resumes where it stopped. Nodes whose
        code, defaults, closure values, ``args``, ``kwargs`` or upstream changed are
        recomputed, with their descendants. ``retry_failed=True`` re-runs the items that
        failed last time; ``force=True`` keeps the records of changed nodes. Raises
        JournalError for a journal in use by another run, of another user, or tampered with.
        """
        self.validate()
        outputs = self._start(
            items,
            None,
            "skip",
            progress=progress,
            report=report,
            journal=journal,
            key=key,
            retry_failed=retry_failed,
            force=force,
            profile=profile,
        )
        for _ in outputs:
            pass
        assert outputs.report is not None
        return outputs.report

    def _start(
        self, items: Iterable[Any], output: Node | None, errors: str, **options: Any
    ) -> RunIterator:
        """Make the scheduler of one run; ``map`` iterates it, ``run`` drains it."""
        sched = Scheduler(
            self,
            output=output,
            errors=errors,
            buffer=self.buffer,
            workdir=self.workdir,
            on_report=self._keep_report,
            **options,
        )
        return RunIterator(sched, items)

    def _keep_report(self, report: Report) -> None:
        self.last_report = report

    def to_mermaid(self) -> str:
        """Return a Mermaid flowchart of the graph (nodes show pool, batch, scatter/gather)."""
        return to_mermaid(self)

    def to_dot(self) -> str:
        """Return the graph in Graphviz DOT."""
        return to_dot(self)

    def draw(self, path: str | Path, format: str | None = None) -> Path:
        """Draw the graph with Graphviz to ``path`` (svg, png, pdf by suffix); return it."""
        return draw(self, path, format)

    def __repr__(self) -> str:
        return f"Pipeline({self.name!r}, nodes={[n.name for n in self.nodes]})"


def _as_list(after: Node | str | Sequence[Node | str] | None) -> list[Node | str]:
    if after is None:
        return []
    if isinstance(after, (Node, str)):
        return [after]
    return list(after)


class RunIterator(Iterator[Any]):
    """The lazy outputs of a run, as returned by ``Pipeline.map``.

    Iterate it like any iterator. ``report`` holds the run's :class:`~papy.Report` once the
    run ended (exhausted, failed, or closed); ``close()`` stops the run early, withdraws
    its queued tasks and frees the pools the pipeline made (also done when the iterator
    is garbage-collected).
    """

    def __init__(self, sched: Scheduler, items: Iterable[Any]) -> None:
        self._sched = sched
        self._gen = sched.iterate(items)

    def __iter__(self) -> Iterator[Any]:
        # The run's own generator: a for loop or list() then pays no Python call per item.
        return self._gen

    def __next__(self) -> Any:
        return next(self._gen)

    def close(self) -> None:
        """Stop the run now; idempotent."""
        self._gen.close()

    @property
    def report(self) -> Report | None:
        """Return the run's Report, or None while it is still running."""
        return self._sched.report

    def __enter__(self) -> RunIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
