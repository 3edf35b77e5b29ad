"""Graph algorithms: validation, topological order and scatter levels.

Everything here runs before any item is processed, so a wrong graph fails fast with a
message in words (which node, what is wrong, what to do).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING

from papy._errors import CycleError, GraphError

if TYPE_CHECKING:
    from papy._node import Node


def topological_order(nodes: Sequence[Node]) -> list[Node]:
    """Return the nodes parents-first; raise CycleError naming a cycle if there is one."""
    order: list[Node] = []
    state: dict[int, int] = {}  # 1 = on the current path, 2 = done
    path: list[Node] = []

    def visit(n: Node) -> None:
        mark = state.get(id(n))
        if mark == 2:
            return
        if mark == 1:
            # The path runs child -> parent; a cycle reads in data-flow order.
            start = next(i for i, p in enumerate(path) if p is n)
            raise CycleError(cycle_in_flow_order(list(reversed(path[start:])), nodes))
        state[id(n)] = 1
        path.append(n)
        for p in n.parents:
            visit(p)
        path.pop()
        state[id(n)] = 2
        order.append(n)

    for n in nodes:
        visit(n)
    return order


def cycle_in_flow_order(cycle: Sequence[Node], nodes: Sequence[Node]) -> list[str]:
    """Return the names of a cycle (given in data-flow order) starting at its oldest node.

    Starting where the pipeline's own order (the order of ``add()``, which ``to_mermaid()``
    follows) first meets the cycle makes the message the same however it was found.
    """
    rank = {id(n): i for i, n in enumerate(nodes)}
    first = min(range(len(cycle)), key=lambda i: rank.get(id(cycle[i]), len(nodes)))
    return [n.name for n in [*cycle[first:], *cycle[:first]]]


def path_between(start: Node, end: Node) -> list[Node] | None:
    """Return a data-flow path ``start -> ... -> end`` (following children), or None."""
    seen: set[int] = set()
    stack: list[tuple[Node, list[Node]]] = [(start, [start])]
    while stack:
        n, path = stack.pop()
        if n is end:
            return path
        if id(n) in seen:
            continue
        seen.add(id(n))
        for c in n.children:
            stack.append((c, [*path, c]))
    return None


def check_join_arity(n: Node) -> None:
    """Raise GraphError if node ``n``'s function cannot take one argument per parent.

    Reads ``inspect.signature`` of the node's first function and binds one positional
    argument per parent plus the node's own ``args``/``kwargs``. Callables whose signature
    cannot be read (some builtins) are let through: the item fails at run time instead.
    """
    k = len(n.parents)
    if k < 2 or n.batched or n.gather:
        return
    fn = n.call.fns[0]
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    extra = n.call.args[0]
    try:
        sig.bind(*([None] * (k + len(extra))), **n.call.kwargs[0])
    except TypeError:
        params = sig.parameters.values()
        if any(p.kind is p.VAR_POSITIONAL for p in params):
            return
        positional = sum(
            1 for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        )
        required = sum(
            1
            for p in params
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
        )
        fn_name = getattr(fn, "__qualname__", None) or repr(fn)
        have = k + len(extra)
        with_args = f" plus {len(extra)} from args=" if extra else ""
        takes = (
            f"{positional} positional argument{'s' if positional != 1 else ''}"
            if positional == required
            else f"{required} to {positional} positional arguments"
        )
        raise GraphError(
            f"join node {n.name!r} has {k} parents{with_args}, so its function {fn_name} is "
            f"called with {have} positional arguments, but it takes {takes}; "
            f"give it one parameter per parent (in after= order)"
        ) from None


def scatter_stacks(order: Sequence[Node]) -> dict[str, tuple[str, ...]]:
    """Return, per node, the scatter nodes whose sub-items its *outputs* are.

    Raise GraphError for a gather with nothing to gather, and for a join whose parents
    are at different scatter levels (their items could not be paired by id).
    """
    out: dict[str, tuple[str, ...]] = {}
    for n in order:
        if n.parents:
            stacks = [out[p.name] for p in n.parents]
            first = stacks[0]
            for p, s in zip(n.parents[1:], stacks[1:]):
                if s != first:
                    raise GraphError(
                        f"node {n.name!r} joins items from different scatter levels: "
                        f"{n.parents[0].name!r} gives {_level(first)} but {p.name!r} gives "
                        f"{_level(s)}; gather the scattered branch before the join"
                    )
            stack = first
        else:
            stack = ()
        if n.gather:
            if not stack:
                raise GraphError(
                    f"node {n.name!r} has gather=True but no scatter node upstream "
                    "of it; add scatter=True to an upstream node or drop gather=True"
                )
            if len(n.parents) > 1:
                raise GraphError(
                    f"node {n.name!r} has gather=True and {len(n.parents)} parents "
                    f"({', '.join(repr(p.name) for p in n.parents)}); a gather takes one "
                    "parent: join the sub-items first (a node after all of them), then "
                    "gather that node's outputs"
                )
            stack = stack[:-1]
        if n.scatter:
            stack = (*stack, n.name)
        out[n.name] = stack
    return out


def _level(stack: tuple[str, ...]) -> str:
    if not stack:
        return "top-level items"
    return "sub-items of " + " > ".join(repr(s) for s in stack)
