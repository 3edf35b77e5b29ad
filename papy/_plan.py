"""The plan: a pipeline's graph compiled once into immutable steps for one run.

:func:`compile_plan` validates nothing new (``papy._graph`` did) and changes nothing: it
fixes each node's pool, fuses chains of 1:1 nodes on one pool into :class:`Step` objects,
records each step's parents and children, the scatter levels of its input and output,
and the run's terminals (every sink, plus the output ``map`` yields). The scheduler reads
the :class:`Plan` and never changes it; everything a run changes lives on the scheduler.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

from papy._graph import scatter_stacks, topological_order
from papy._task import JournalSpec, Stage, StepSpec

if TYPE_CHECKING:
    from papy._node import Node
    from papy.pools._base import Pool


class Graph(Protocol):
    """What the plan, the drawings and the journal need of a pipeline (``papy.Pipeline``).

    ``nodes`` in the order they were added; ``pool`` is the default pool of nodes that
    name none (``None``: a ProcessPool made for the run).
    """

    @property
    def name(self) -> str: ...

    @property
    def nodes(self) -> Sequence[Node]: ...

    @property
    def pool(self) -> Pool | None: ...


@dataclass(frozen=True, eq=False)
class Step:
    """A chain of fused nodes that runs as one task per batch on one pool.

    ``parents`` and ``children`` are indices into :attr:`Plan.steps`; a child comes with
    its slot, the position of this step's tail among the child head's parents (a join's
    argument order). ``in_stack``/``out_stack`` name the scatter nodes whose sub-items the
    step's inputs and outputs are (``()``: top-level items).
    """

    index: int
    nodes: tuple[Node, ...]
    pool: Pool
    spec: StepSpec
    parents: tuple[int, ...]
    children: tuple[tuple[int, int], ...]
    in_stack: tuple[str, ...]
    out_stack: tuple[str, ...]

    @property
    def head(self) -> Node:
        return self.nodes[0]

    @property
    def tail(self) -> Node:
        return self.nodes[-1]

    @property
    def name(self) -> str:
        return "+".join(n.name for n in self.nodes)

    @property
    def timeout(self) -> float | None:
        """Per-item limit (seconds) of the step's first node, or None."""
        return self.head.timeout


@dataclass(frozen=True, eq=False)
class Terminal:
    """A node whose outputs leave the run: a sink, or the output ``map`` yields.

    ``stack`` is the scatter level of its outputs: a terminal below a scatter finishes an
    input position only when every sub-item arrived.
    """

    index: int
    node: Node
    stack: tuple[str, ...]
    is_output: bool

    @property
    def top_level(self) -> bool:
        return not self.stack


@dataclass(frozen=True, eq=False)
class Plan:
    """Everything about a run that is fixed before its first item.

    ``steps`` are in topological order; ``sources`` index the steps that get input items;
    ``terminal_of`` maps a step index to the terminal its tail is; ``gathers_of`` maps a
    scatter node's name to the steps whose gather closes its level and ``terminals_of`` to
    the terminals below it (who must hear how many sub-items each item became).
    """

    name: str
    order: tuple[Node, ...]
    steps: tuple[Step, ...]
    pools: tuple[Pool, ...]
    sources: tuple[int, ...]
    terminals: tuple[Terminal, ...]
    terminal_of: Mapping[int, Terminal]
    gathers_of: Mapping[str, tuple[int, ...]]
    terminals_of: Mapping[str, tuple[Terminal, ...]]
    output: Node | None
    #: each node's own out-stack: the scatter levels of its outputs
    stacks: Mapping[str, tuple[str, ...]]
    #: step index of a scatter -> a step that runs it with the 1:1 nodes after it and the
    #: gather closing it as one task (indices after the regular steps'); the scheduler
    #: sends an item either way (see ``StepQueue.lane``)
    groups: Mapping[int, Step] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def spec_ids(self) -> list[str]:
        """Return the ids of the steps' specs (what pools cache per run)."""
        return [s.spec.id for s in (*self.steps, *self.groups.values())]


_spec_counter = itertools.count()


def make_stage(n: Node) -> Stage:
    """Return what a worker needs to know to run node ``n``."""
    return Stage(
        name=n.name,
        call=n.call,
        join=len(n.parents) > 1,
        scatter=n.scatter,
        batched=n.batched,
        is_async=n.is_async,
        retries=n.retries,
        retry_on=n.retry_on,
        timeout=n.timeout,
        concurrency=n.concurrency,
    )


def _fusable(n: Node, c: Node, pools: Mapping[str, Pool], keep: set[str]) -> bool:
    pool = pools[n.name]
    return (
        pools[c.name] is pool
        and pool.fuses
        and len(n.children) == 1
        and len(c.parents) == 1
        and not n.scatter
        and not c.gather
        and (pool.item_timeouts or (n.timeout is None and c.timeout is None))
        and c.batch in (None, n.batch)
        and n.name not in keep
    )


def _chains(order: Sequence[Node], pools: Mapping[str, Pool], keep: set[str]) -> list[list[Node]]:
    """Cut the nodes into fused chains, in topological order of their heads."""
    taken: set[str] = set()
    chains = []
    for n in order:
        if n.name in taken:
            continue
        chain = [n]
        while len(chain[-1].children) == 1:
            c = chain[-1].children[0]
            if not _fusable(chain[-1], c, pools, keep):
                break
            chain.append(c)
        taken.update(x.name for x in chain)
        chains.append(chain)
    return chains


def compile_plan(
    graph: Graph,
    pools: Mapping[str, Pool],
    *,
    output: Node | None = None,
    run_dir: str | None = None,
    private: bool = True,
    journal: Callable[[Sequence[Node], set[str]], JournalSpec | None] | None = None,
) -> Plan:
    """Compile ``graph`` into the plan of one run.

    ``pools`` gives every node's pool by node name. ``output`` is the node ``map`` yields
    (it ends a step, so the driver sees its outputs). ``run_dir`` and ``private`` go to
    every step's spec (where file helpers write, and whether files are 0600).
    ``journal(nodes, terminal_names)`` gives the journal spec of a step that records
    something, or None. Raises CycleError and GraphError as ``papy._graph`` does.
    """
    order = topological_order(graph.nodes)
    stacks = scatter_stacks(order)
    keep = {output.name} if output is not None else set()
    terminal_names = {n.name for n in order if n.is_sink or n is output}
    run_id = uuid.uuid4().hex[:8]
    chains = _chains(order, pools, keep)
    step_of = {x.name: i for i, chain in enumerate(chains) for x in chain}
    children: list[list[tuple[int, int]]] = [[] for _ in chains]
    for i, chain in enumerate(chains):
        for slot, p in enumerate(chain[0].parents):
            children[step_of[p.name]].append((i, slot))
    steps = []
    for i, chain in enumerate(chains):
        head = chain[0]
        spec = StepSpec(
            f"{run_id}-{next(_spec_counter)}",
            tuple(make_stage(x) for x in chain),
            run_dir,
            journal(chain, terminal_names) if journal is not None else None,
            private,
        )
        steps.append(
            Step(
                i,
                tuple(chain),
                pools[head.name],
                spec,
                tuple(step_of[p.name] for p in head.parents),
                tuple(children[i]),
                stacks[head.parents[0].name] if head.parents else (),
                stacks[chain[-1].name],
            )
        )
    groups = {} if journal is not None else _groups(steps, keep)
    terminals = tuple(
        Terminal(i, n, stacks[n.name], n is output)
        for i, n in enumerate(n for n in order if n.name in terminal_names)
    )
    by_name = {t.node.name: t for t in terminals}
    gathers: dict[str, list[int]] = {}
    for s in steps:
        if s.head.gather:
            gathers.setdefault(s.in_stack[-1], []).append(s.index)
    below: dict[str, list[Terminal]] = {}
    for t in terminals:
        for scatter_name in t.stack:
            below.setdefault(scatter_name, []).append(t)
    return Plan(
        name=graph.name,
        order=tuple(order),
        steps=tuple(steps),
        pools=tuple({id(s.pool): s.pool for s in steps}.values()),
        sources=tuple(s.index for s in steps if not s.head.parents),
        terminals=terminals,
        terminal_of=MappingProxyType(
            {
                s.index: by_name[s.tail.name]
                for s in [*steps, *groups.values()]
                if s.tail.name in by_name
            }
        ),
        gathers_of=MappingProxyType({k: tuple(v) for k, v in gathers.items()}),
        terminals_of=MappingProxyType({k: tuple(v) for k, v in below.items()}),
        output=output,
        stacks=MappingProxyType(stacks),
        groups=MappingProxyType(groups),
    )


def _groups(steps: Sequence[Step], keep: set[str]) -> dict[int, Step]:
    """Find scatters whose sub-items can stay in one worker until their gather.

    The step of a scatter qualifies when its only child steps, one after the other, are
    1:1 nodes on the same pool ending in the gather that closes the scatter (nothing else
    reads the sub-items), when none of these nodes has a timeout, and none but the last
    is the output ``map`` yields (``keep``). The group step runs all of them, and the
    nodes fused after the gather, as one task.
    """
    out: dict[int, Step] = {}
    for s in steps:
        if not s.tail.scatter or not s.pool.fuses or not s.pool.groups_scatter:
            continue
        chain: list[Node] = list(s.nodes)
        cur, gather_step = s, None
        while len(cur.children) == 1 and not any(x.name in keep for x in cur.nodes):
            nxt = steps[cur.children[0][0]]
            if nxt.pool is not s.pool or len(nxt.head.parents) != 1:
                break
            if nxt.head.gather:
                gather_step = nxt
                break
            if any(x.scatter for x in nxt.nodes):
                break  # a nested scatter: its own gather comes first
            chain.extend(nxt.nodes)
            cur = nxt
        if gather_step is None:
            continue
        at = (len(s.nodes) - 1, len(chain))
        chain.extend(gather_step.nodes)
        if any(x.timeout is not None for x in chain):
            continue
        spec = StepSpec(
            f"{s.spec.id}g",
            tuple(make_stage(x) for x in chain),
            s.spec.run_dir,
            None,
            s.spec.private,
            at,
        )
        out[s.index] = Step(
            len(steps) + len(out),
            tuple(chain),
            s.pool,
            spec,
            s.parents,
            gather_step.children,
            s.in_stack,
            gather_step.out_stack,
        )
    return out
