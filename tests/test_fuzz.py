"""A differential fuzzer: random pipelines, pools and faults, checked against a reference.

Hypothesis generates a graph description (plain data, so a counterexample can be pasted
back as an ``@example``), builds the pipeline from it on real pools (inline, threads,
processes started by fork, forkserver or spawn, shared between nodes or not; plain,
``batched=True`` and ``async def`` nodes, some with outputs that cannot tell their size)
with real faults, and compares what PaPy delivers with a serial, recursive evaluation of
the same graph in ``tests/reference.py``.

The contract checked, for every graph, pool and setting:

- An item's key is its input position, plus one index per scatter level.
- Every output of the requested node is delivered exactly once: ``map(errors="yield")``
  gives the same values and Failures as the reference, in input order (or as a multiset
  when the output node has ``ordered=False``); nothing is missing or extra.
- A node function that raises anything on its item, ``StopIteration``, ``SystemExit``,
  ``GeneratorExit`` and ``KeyboardInterrupt`` included, makes that item a ``Failure``
  whose ``exc_type`` is the real class name (``'StopIteration'``, ``'SystemExit'``, a
  user class as ``'module.Name'``); an item that kills its worker process every time (it
  exits, exits leaving a child that holds the worker's pipes, or closes the pipes and
  lives on) is a ``'papy.WorkerCrashed'`` Failure and its batch-mates complete (in a
  ``batched=True`` call too); an item that runs past its node's ``timeout=`` is a
  ``'TimeoutError'`` Failure, and no item within the limit fails. A ``batched=True`` node
  that returns fewer results than items fails the items it left out (``'ValueError'``),
  not the others.
- A Failure is named after the first node that failed on the item (its ``node``) and the
  key the item had there (its ``item``). It travels downstream: nodes below skip it; a
  join meeting one produces the Failure of its first parent (in ``after`` order) that
  failed; a gather meeting one produces the first failed sub-item's (in scatter order); a
  scatter given one produces just that Failure, in place of its sub-items.
- ``run()`` reports, per node, every item that reached it (Failures passing through
  included) and, as ``failed``, the items whose Failure names that node.
- An input item that cannot be pickled (alone or nested in lists and dicts) fails with
  ``TypeError`` at each first node on a process pool, naming that node and showing the
  item as its input; thread and inline pools give it to the node as is.
- A Failure's ``input_repr`` is the item's input to the node it names; one a pool made
  (a crash, a timeout) may instead be empty, where the pool never held that input.
- When the input iterator raises part-way, every output of the items read before the
  error is delivered (to ``map()``'s caller and to ``run()``'s sinks), then the input's
  own exception is raised.
- A node with ``on_error="raise"`` that fails on an item stops the run with ``RunAborted``
  carrying a Failure of such a node (crashes and timeouts included), from ``map()`` and
  ``run()`` alike.
- A node with ``timeout=`` on an ``InlinePool`` (the caller's thread cannot be
  interrupted) is refused with ``GraphError`` naming the node, before any input is read.
- When the pools are closed, no child process is left (multiprocessing's own forkserver
  and resource tracker, one of each per interpreter, are not a pool's).

Fault kinds the engine does not handle yet are left out of ``ENABLED_FAULTS``; set
``PAPY_FUZZ_FAULTS=all`` (or a comma-separated list) to fuzz them anyway.
``PAPY_FUZZ_EXAMPLES`` sets the number of examples. ``PAPY_FUZZ_PROFILE=fuzz`` selects the long,
randomized profile that ``make fuzz`` runs.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import os
import shutil
import signal
import tempfile
import time
import weakref
from collections import Counter
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
import reference
from hypothesis import HealthCheck, assume, event, example, given, note, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from reference import TIMEOUT_S, Fail, FuzzInputError

from papy import (
    Failure,
    GraphError,
    InlinePool,
    Pipeline,
    Pool,
    ProcessPool,
    RunAborted,
    ThreadPool,
)

#: every fault kind the fuzzer knows: raised by a node, acted by a node, or by the input
ALL_FAULTS = frozenset(
    {
        *reference.RAISES,
        "crash",  # os._exit in a ProcessPool node
        "crash_batched",  # os._exit in a batched=True ProcessPool node (any bad item)
        "crash_fork",  # a ProcessPool node forks a child that outlives its worker, then exits
        "hangup",  # a ProcessPool node closes its worker's pipes and sleeps
        "kill_siblings",  # a ProcessPool node SIGKILLs its pool's other workers, then its own
        "timeout",  # an item sleeps past its node's timeout= (thread and process pools)
        "short",  # a batched=True node returns fewer results than items
        "input_error",  # the input iterator raises part-way
        "inline_timeout",  # timeout= on an InlinePool node must be a GraphError
        "on_error",  # a node with on_error="raise" fails: the run stops with RunAborted
        "unpicklable",  # an input item that cannot be pickled (fails at a process pool)
    }
)
#: fault kinds the engine is expected to handle today; a kind left out is not generated
#: (and explicit examples using it are skipped) until the engine handles it.
ENABLED_FAULTS = frozenset(ALL_FAULTS)
if os.environ.get("PAPY_FUZZ_FAULTS") == "all":
    ENABLED_FAULTS = ALL_FAULTS
elif os.environ.get("PAPY_FUZZ_FAULTS"):
    ENABLED_FAULTS = frozenset(os.environ["PAPY_FUZZ_FAULTS"].split(","))

HANG_S = 60  # an example that takes longer than this is a hang (a failure), not slowness
#: what one item that kills its worker may add on a DaskPool: Dask retries its task on
#: other workers (``allowed-failures``), then PaPy halves, confirms and names the node, and
#: each death waits for a nanny to restart a worker (1-2 s here). Measured: one journaled
#: example with a crashing node under a 40-way scatter, 175 worker deaths in 287 s.
DASK_CRASH_S = 20
MAX_FAN = 60  # at most this many sub-items per input item below nested scatters

FUZZ_EXAMPLES = int(os.environ.get("PAPY_FUZZ_EXAMPLES", "200"))
settings.register_profile(
    "papy-ci",
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples on every run: CI is reproducible
    database=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
settings.register_profile(
    "papy-fuzz",
    max_examples=int(os.environ.get("PAPY_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
PROFILE = "papy-fuzz" if os.environ.get("PAPY_FUZZ_PROFILE") == "fuzz" else "papy-ci"

POOL_KINDS = [("inline", 1), ("thread", 1), ("thread", 3), ("process", 1), ("process", 2)]
#: how process pools start their workers: a pool description ``[kind, workers]`` may name
#: one as a third entry (none: the default, forkserver). "spawn" starts a worker in about
#: a second here, so only the long profile draws it.
START_METHODS = ["forkserver", "forkserver", "fork"] + (["spawn"] if PROFILE == "papy-fuzz" else [])


# -- generating graphs ----------------------------------------------------------------------


def _values(unpicklable: bool) -> st.SearchStrategy[Any]:
    """Plain data, nested; with ``unpicklable``, also values that cannot be pickled."""
    leaves = st.none() | st.integers(-2, 3) | st.text(alphabet="ab", max_size=2)
    if unpicklable:
        leaves |= st.builds(reference.Unpicklable, st.sampled_from("ab"))
    return st.recursive(
        leaves,
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(st.text("ab", max_size=2), inner, max_size=2)
        ),
        max_leaves=4,
    )


#: input items: plain data, and items that cannot be pickled (alone or nested)
input_values = _values("unpicklable" in ENABLED_FAULTS)


def pool_description(draw: st.DrawFn, kind: str, workers: int) -> list[Any]:
    """Return ``[kind, workers]``, plus a start method drawn for a process pool."""
    method = draw(st.sampled_from(START_METHODS)) if kind == "process" else "forkserver"
    return [kind, workers] if method == "forkserver" else [kind, workers, method]


@st.composite
def graphs(draw: st.DrawFn) -> dict[str, Any]:
    """Draw a graph description: pools, nodes (parents before children), inputs, output."""
    pools: list[list[Any]] = []
    for _ in range(draw(st.integers(1, 3))):
        kind, workers = draw(st.sampled_from(POOL_KINDS))
        if kind == "process" and sum(p[0] == "process" for p in pools) >= 2:
            kind, workers = "thread", 2  # two process pools at most: keep examples cheap
        pools.append(pool_description(draw, kind, workers))
    nodes: list[dict[str, Any]] = []
    stacks: list[tuple[int, ...]] = []  # per node: the scatters its outputs are sub-items of
    fans: list[int] = []  # per node: the most sub-items per input item at its outputs
    for i in range(draw(st.integers(1, 7))):
        how = "source" if i == 0 else draw(st.sampled_from(["source", "chain", "chain", "join"]))
        after: list[int] = []
        if how == "chain":
            after = [draw(st.integers(0, i - 1))]  # any earlier node: forks and skip edges
        elif how == "join":
            first = draw(st.integers(0, i - 1))
            mates = [j for j in range(i) if j != first and stacks[j] == stacks[first]]
            after = [first]
            if mates:
                after += draw(st.lists(st.sampled_from(mates), min_size=1, max_size=2, unique=True))
        stack = stacks[after[0]] if after else ()
        fan = fans[after[0]] if after else 1
        gather = len(after) == 1 and bool(stack) and draw(st.integers(0, 2)) == 0
        if gather:
            stack = stack[:-1]
            fan = 1 if not stack else fan  # an upper bound is enough
        scatter = None
        if len(stack) < 3 and draw(st.booleans()):
            sizes = [s for s in (0, 1, 2, 3, 5, 40) if fan * s <= MAX_FAN]
            scatter = draw(st.lists(st.sampled_from(sizes), min_size=1, max_size=3))
            stack = (*stack, i)
            fan *= max(scatter)
        batched = len(after) <= 1 and draw(st.integers(0, 3)) == 0
        is_async = not batched and draw(st.integers(0, 4)) == 0
        pool = draw(st.none() | st.integers(0, len(pools) - 1))
        kind = pools[pool if pool is not None else 0][0]
        timeout_ok = (
            not batched
            and "timeout" in ENABLED_FAULTS
            and (kind != "inline" or "inline_timeout" in ENABLED_FAULTS)
        )
        kinds = sorted(k for k in reference.RAISES if k in ENABLED_FAULTS)
        crash = ["crash_batched"] if batched else ["crash", "crash_fork", "hangup", "kill_siblings"]
        if kind == "process":
            kinds += [c for c in crash if c in ENABLED_FAULTS]
        if batched and "short" in ENABLED_FAULTS:
            kinds.append("short")
        if timeout_ok and not stack and kind != "inline" and "timeout" in ENABLED_FAULTS:
            kinds.append("timeout")  # top level only: each slow item costs about a second
        fault = None
        if kinds and draw(st.booleans()):
            f = draw(st.sampled_from(kinds))
            mod = draw(st.integers(2, 6))
            fault = [f, mod, draw(st.integers(0, mod - 1))]
        timeout = timeout_ok and (
            (fault is not None and fault[0] == "timeout") or draw(st.integers(0, 9)) == 0
        )
        nodes.append(
            {
                "after": after,
                "scatter": scatter,
                "gather": gather,
                "batched": batched,
                "async": is_async,
                "pool": pool,
                "batch": draw(st.none() | st.integers(1, 4)),
                "large": draw(st.integers(0, 3)) == 0,
                "liar": draw(st.integers(0, 5)) == 0,
                "ordered": draw(st.booleans()),
                "timeout": timeout,
                "fault": fault,
                "on_error": (
                    fault is not None
                    and "on_error" in ENABLED_FAULTS
                    and draw(st.integers(0, 5)) == 0
                ),
            }
        )
        stacks.append(stack)
        fans.append(fan)
    inputs = draw(st.lists(input_values, min_size=1, max_size=8))
    input_error_at = None
    if "input_error" in ENABLED_FAULTS:
        input_error_at = draw(st.none() | st.integers(0, len(inputs)))
    return {
        "pools": pools,
        "buffer": draw(st.none() | st.integers(1, 6)),
        "nodes": nodes,
        "output": draw(st.integers(0, len(nodes) - 1)),
        "inputs": inputs,
        "input_error_at": input_error_at,
    }


@st.composite
def chains(draw: st.DrawFn) -> dict[str, Any]:
    """Draw a straight chain of plain nodes on one pool, some with large outputs, in
    batches of two or more: the nodes are fused into one step, which runs items that
    large one at a time through all of its nodes (each node's faults included)."""
    kind, workers = draw(st.sampled_from(POOL_KINDS))
    kinds = sorted(k for k in reference.RAISES if k in ENABLED_FAULTS)
    if kind == "process":
        kinds += [c for c in ("crash", "crash_fork", "hangup") if c in ENABLED_FAULTS]
    nodes = []
    for i in range(draw(st.integers(2, 4))):
        fault = None
        if kinds and draw(st.booleans()):
            mod = draw(st.integers(2, 5))
            fault = [draw(st.sampled_from(kinds)), mod, draw(st.integers(0, mod - 1))]
        nodes.append(
            {
                "after": [i - 1] if i else [],
                "batch": draw(st.integers(2, 8)),
                "large": draw(st.booleans()),
                "fault": fault,
            }
        )
    return {
        "pools": [pool_description(draw, kind, workers)],
        "nodes": nodes,
        "output": draw(st.integers(0, len(nodes) - 1)),
        "inputs": draw(st.lists(st.integers(-50, 50), min_size=2, max_size=16)),
    }


NODE_DEFAULTS: dict[str, Any] = {
    "after": [],
    "scatter": None,
    "gather": False,
    "batched": False,
    "async": False,
    "pool": None,
    "batch": None,
    "large": False,
    "liar": False,
    "ordered": True,
    "timeout": False,
    "fault": None,
    "on_error": False,
}
GRAPH_DEFAULTS: dict[str, Any] = {"buffer": None, "output": -1, "input_error_at": None}


def complete(graph: dict[str, Any]) -> dict[str, Any]:
    """Fill in what a hand-written description leaves out (output -1: the last node)."""
    g = {**GRAPH_DEFAULTS, **graph}
    g["nodes"] = [{**NODE_DEFAULTS, **n} for n in graph["nodes"]]
    if g["output"] < 0:
        g["output"] += len(g["nodes"])
    return g


def faults_used(graph: dict[str, Any]) -> set[str]:
    """Return the fault kinds a graph description uses."""
    used = {n["fault"][0] for n in graph["nodes"] if n["fault"] is not None}
    if any(n["timeout"] for n in graph["nodes"]):
        used.add("timeout")
        if any(n["timeout"] and pool_kind(graph, n) == "inline" for n in graph["nodes"]):
            used.add("inline_timeout")
    if graph["input_error_at"] is not None:
        used.add("input_error")
    if any(n["on_error"] for n in graph["nodes"]):
        used.add("on_error")
    if not all(reference.picklable(x) for x in graph["inputs"]):
        used.add("unpicklable")
    return used


def graph_features(graph: dict[str, Any]) -> list[str]:
    """Name the shapes a description has, for Hypothesis' statistics (coverage at a glance)."""
    nodes = graph["nodes"]
    depth = [0] * len(nodes)
    for i, n in enumerate(nodes):
        d = depth[n["after"][0]] if n["after"] else 0
        d -= 1 if n["gather"] else 0
        d += 1 if n["scatter"] is not None else 0
        depth[i] = d
    found = {
        "several sources": sum(not n["after"] for n in nodes) > 1,
        "outputs that cannot tell their size": any(n["liar"] for n in nodes),
        "join": any(len(n["after"]) > 1 for n in nodes),
        "gather": any(n["gather"] for n in nodes),
        "empty scatter": any(n["scatter"] and 0 in n["scatter"] for n in nodes),
        "large scatter": any(n["scatter"] and max(n["scatter"]) >= 40 for n in nodes),
        "large outputs": any(n["large"] for n in nodes),
        "scatter nested 3 deep": max(depth, default=0) >= 3,
        "batched": any(n["batched"] for n in nodes),
        "async": any(n["async"] for n in nodes),
        "unordered output": not nodes[graph["output"]]["ordered"],
        "pool shared by nodes": len({pool_kind_index(n) for n in nodes}) < len(nodes),
        "several pools": len({pool_kind_index(n) for n in nodes}) > 1,
    }
    return [name for name, present in found.items() if present]


def pool_kind_index(node: dict[str, Any]) -> int:
    """Return the index of the pool a node runs on (the pipeline's, pool 0, by default)."""
    return int(node["pool"]) if node["pool"] is not None else 0


def pool_kind(graph: dict[str, Any], node: dict[str, Any]) -> str:
    """Return the kind of pool a node of a description runs on."""
    return str(graph["pools"][node["pool"] if node["pool"] is not None else 0][0])


def hang_limit(graph: dict[str, Any], want: reference.Expected, runs: int = 1) -> int:
    """Return the seconds after which ``runs`` runs of ``graph`` hang: :data:`HANG_S`, plus
    :data:`DASK_CRASH_S` per item the reference says kills a Dask worker, per run."""
    crashes = sum(
        want.failed.get(f"n{i}", 0)
        for i, n in enumerate(graph["nodes"])
        if pool_kind(graph, n) == "dask" and n["fault"] and n["fault"][0] == "crash"
    )
    return HANG_S + runs * DASK_CRASH_S * crashes


# -- building and running -------------------------------------------------------------------


#: how to make a pool of each kind a description names, given its worker count (the Dask
#: fuzzer, tests/integration/test_dask_fuzz.py, adds "dask": a DaskPool on its cluster)
POOL_FACTORIES: dict[str, Any] = {
    "inline": lambda workers: InlinePool(),
    "thread": ThreadPool,
    "process": ProcessPool,
}


def make_pool(kind: str, workers: int, start_method: str | None = None) -> Pool:
    """Make the pool a description ``[kind, workers(, start method)]`` names."""
    if start_method is not None:
        return ProcessPool(workers, start_method=start_method)
    return POOL_FACTORIES[kind](workers)  # type: ignore[no-any-return]


def build(graph: dict[str, Any], pools: list[Pool]) -> Pipeline:
    """Build the pipeline a description says, nodes named n0, n1, ... on the given pools."""
    pipe = Pipeline("fuzz", pool=pools[0], buffer=graph["buffer"])
    pool_dirs = sibling_dirs(graph, pools)
    for i, node in enumerate(graph["nodes"]):
        params = reference.node_params(i, node)
        pool_index = node["pool"] if node["pool"] is not None else 0
        params = dataclasses.replace(params, pool_dir=pool_dirs.get(pool_index))
        fn: Any = reference.node_fn
        if node["batched"]:
            fn = reference.batched_fn
        elif node["async"]:
            fn = reference.async_node_fn
        if node.get("change") == "code":  # the version in the code, not in the args
            fn, params = versioned(fn, params.version), dataclasses.replace(params, version=0)
        pipe.add(
            functools.partial(fn, params),
            name=params.name,
            after=[f"n{a}" for a in node["after"]] or None,
            pool=pools[node["pool"]] if node["pool"] is not None else None,
            batch=node["batch"],
            ordered=node["ordered"],
            scatter=node["scatter"] is not None,
            gather=node["gather"],
            batched=node["batched"],
            timeout=TIMEOUT_S if node["timeout"] else None,
            on_error="raise" if node["on_error"] else "continue",
            cache=bool(node.get("cache")),
        )
    return pipe


_PIDS_ROOT = tempfile.mkdtemp(prefix="papy-fuzz-pids-")
atexit.register(shutil.rmtree, _PIDS_ROOT, True)
_SIBLING_DIRS: weakref.WeakKeyDictionary[Pool, str] = weakref.WeakKeyDictionary()


def sibling_dirs(graph: dict[str, Any], pools: list[Pool]) -> dict[int, str]:
    """Return a directory per pool that runs a "kill_siblings" node (the same for a pool
    in every build, so a journaled node's arguments do not change): every node on that
    pool leaves its worker's pid there, for the killer to find its pool's workers, and
    only those (other pools' fork workers share the same parent)."""
    out = {}
    for n in graph["nodes"]:
        if n["fault"] and n["fault"][0] == "kill_siblings":
            k = n["pool"] if n["pool"] is not None else 0
            if pools[k] not in _SIBLING_DIRS:
                _SIBLING_DIRS[pools[k]] = tempfile.mkdtemp(dir=_PIDS_ROOT)
            out[k] = _SIBLING_DIRS[pools[k]]
    return out


def versioned(fn: Any, version: int) -> Any:
    """Return ``fn`` as a new function whose *code* holds ``version`` (a literal), as an
    edited function body would: ``f(p, *args)`` calls ``fn(p with that version, *args)``."""
    asynchronous = fn is reference.async_node_fn
    source = (
        f"{'async ' if asynchronous else ''}def edited(p, *args):\n"
        f"    return {'await ' if asynchronous else ''}fn(replace(p, version={version}), *args)\n"
    )
    scope: dict[str, Any] = {"fn": fn, "replace": dataclasses.replace}
    exec(source, scope)
    return scope["edited"]


class Hang(Exception):
    """An example ran longer than HANG_S: the run hangs."""


@contextlib.contextmanager
def hang_guard(seconds: int) -> Iterator[None]:
    def fire(signum: int, frame: Any) -> None:
        raise Hang(f"the run did not finish within {seconds} s")

    # pytest-timeout may have an alarm of its own running: put it back afterwards.
    previous = signal.signal(signal.SIGALRM, fire)
    outer = signal.alarm(seconds)
    started = time.monotonic()
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        if outer:
            signal.alarm(max(1, outer - round(time.monotonic() - started)))


class Source:
    """The input iterator: yields the inputs, then raises if the description says so."""

    def __init__(self, inputs: list[Any], error_at: int | None) -> None:
        self.inputs = inputs
        self.error_at = error_at
        self.read = 0  # items handed out so far

    def __iter__(self) -> Iterator[Any]:
        stop = len(self.inputs) if self.error_at is None else self.error_at
        for x in self.inputs[:stop]:
            self.read += 1
            yield x
        if self.error_at is not None:
            raise FuzzInputError(f"bad record at position {self.error_at}")


#: Failures a pool makes (not the node): for a node after the first of a fused task the
#: pool does not hold the item's input, so ``input_repr`` is then empty (never another one)
POOL_MADE = frozenset({"papy.WorkerCrashed", "TimeoutError"})


def canon(v: Any) -> str:
    """Return a comparable text for an output: a value's repr, or a Failure's identity
    (with its input, checked apart for the Failures a pool makes: see ``POOL_MADE``)."""
    if isinstance(v, (Failure, Fail)):
        given = "?" if v.exc_type in POOL_MADE else v.input_repr
        return repr(("FAILURE", v.node, v.item, v.exc_type, given))
    return repr(("VALUE", v))


def check_pool_made_inputs(got: list[Any], want: list[Any]) -> None:
    """A pool-made Failure shows the item's input to its node, or none: never another."""
    wanted = {(w.node, repr(w.item)): w.input_repr for w in want if isinstance(w, Fail)}
    for v in got:
        if isinstance(v, Failure) and v.exc_type in POOL_MADE:
            expected = wanted[(v.node, repr(v.item))]
            assert v.input_repr in ("", expected), (
                f"{v.exc_type} Failure of node {v.node!r}, item {v.item!r} shows input "
                f"{v.input_repr!r}; that node's input was {expected!r}"
            )


def compare_outputs(got: list[Any], want: list[Any], ordered: bool) -> None:
    g, w = [canon(v) for v in got], [canon(v) for v in want]
    if (ordered and g == w) or (not ordered and Counter(g) == Counter(w)):
        check_pool_made_inputs(got, want)
        return
    missing = list((Counter(w) - Counter(g)).elements())
    extra = list((Counter(g) - Counter(w)).elements())
    raise AssertionError(
        f"map() outputs differ from the reference ({'ordered' if ordered else 'unordered'}):\n"
        f"  missing: {missing}\n  extra:   {extra}\n  got:  {g}\n  want: {w}"
    )


def compare_report(report: Any, want: reference.Expected, read: int, what: str) -> None:
    assert report is not None, f"{what}: no report"
    assert report.items == read, f"{what}: report.items {report.items}, read {read}"
    got_in = {name: n.items_in for name, n in report.nodes.items()}
    got_failed = {name: n.failed for name, n in report.nodes.items()}
    assert got_in == want.items_in, f"{what}: items_in {got_in} != reference {want.items_in}"
    assert got_failed == want.failed, f"{what}: failed {got_failed} != reference {want.failed}"
    assert report.failure_counts == want.failure_counts, (
        f"{what}: failure_counts {report.failure_counts} != reference {want.failure_counts}"
    )
    lost = [(node, exc) for node, exc, _, first in report.failure_groups() if first is None]
    assert not lost, f"{what}: failure groups without a first Failure: {lost}"


#: multiprocessing's own helpers: one forkserver and one resource tracker per interpreter,
#: started on first use, shared by every pool and gone when the interpreter exits
_MP_HELPERS = ("multiprocessing.forkserver", "multiprocessing.resource_tracker")


def worker_children() -> list[psutil.Process]:
    """Return this process's live children (zombies included: they were not reaped).

    multiprocessing's forkserver and resource tracker are left out: they belong to the
    interpreter, not to a pool, and do not accumulate (at most one of each is allowed).
    """
    found = []
    helpers: dict[str, int] = dict.fromkeys(_MP_HELPERS, 0)
    for c in psutil.Process().children(recursive=True):
        try:
            if not c.is_running():
                continue
            cmd = " ".join(c.cmdline())
        except psutil.NoSuchProcess:
            continue
        helper = next((h for h in _MP_HELPERS if h in cmd), None)
        if helper is not None and c.ppid() == os.getpid():
            helpers[helper] += 1
            assert helpers[helper] == 1, f"more than one {helper} process: {cmd}"
            continue
        found.append(c)
    return found


def check(graph: dict[str, Any], others: Any = frozenset) -> None:
    """Run the graph with map() and run() and compare both with the reference.

    ``others()`` returns the pids of processes that are not the pools' (a Dask cluster's,
    which restarts a worker an item killed): they may come and go.
    """
    graph = complete(graph)
    used = faults_used(graph)
    in_test = currently_in_test_context()  # False when a script calls check() directly
    if in_test:
        assume(used <= ENABLED_FAULTS)
        for kind in sorted(used) or ["none"]:
            event(f"fault {kind}")
        for kind in sorted({":".join(map(str, p[::2])) for p in graph["pools"]}):
            event(f"pool {kind}")
        for feature in graph_features(graph):
            event(feature)
    nodes = graph["nodes"]
    out_name = f"n{graph['output']}"
    error_at = graph["input_error_at"]
    inputs = graph["inputs"]
    read = len(inputs) if error_at is None else error_at
    want = reference.evaluate(graph, inputs[:read])
    want_outputs = [v for per_position in want.outputs for v in per_position]
    refused = [
        f"n{i}" for i, n in enumerate(nodes) if n["timeout"] and pool_kind(graph, n) == "inline"
    ]
    # on_error="raise" nodes that fail on some item: the run must stop with RunAborted
    aborting = {f"n{i}" for i, n in enumerate(nodes) if n["on_error"] and want.failed[f"n{i}"]}
    if in_test:
        for i, n in enumerate(nodes):
            if want.failed[f"n{i}"]:
                event(f"items fail with {n['fault'][0] if n['fault'] else 'unpicklable'}")
        note(f"expected outputs: {[canon(v) for v in want_outputs]}")
    before = {c.pid for c in worker_children()}
    pools = [make_pool(*p) for p in graph["pools"]]
    with contextlib.ExitStack() as stack:
        for p in pools:
            stack.enter_context(p)
        stack.enter_context(hang_guard(hang_limit(graph, want)))
        pipe = build(graph, pools)

        if refused:
            for run in (
                lambda src: list(pipe.map(src, output=out_name, errors="yield")),
                lambda src: pipe.run(src),
            ):
                src = Source(inputs, error_at)
                with pytest.raises(GraphError) as info:
                    run(src)
                assert src.read == 0, "input was read before the graph was refused"
                assert any(name in str(info.value) for name in refused), info.value
        elif aborting:
            # Which failure stops the run first depends on timing; that one does, and the
            # run stops (an input error may come first when the input raises too).
            expected: tuple[type[BaseException], ...] = (RunAborted,)
            if error_at is not None:
                expected = (RunAborted, FuzzInputError)
            for run in (
                lambda src: list(pipe.map(src, output=out_name, errors="yield")),
                lambda src: pipe.run(src),
            ):
                with pytest.raises(expected) as stopped:
                    run(Source(inputs, error_at))
                if isinstance(stopped.value, RunAborted):
                    assert stopped.value.failure.node in aborting, stopped.value
        else:
            exercise(pipe, graph, want)

    left = wait_for_children_gone(before, others=others)
    assert not left, f"child processes left after the pools closed: {left}"


def wait_for_children_gone(
    before: set[int], seconds: float = 10, others: Any = frozenset
) -> list[psutil.Process]:
    """Return the child processes not in ``before`` (nor in ``others()``) still alive after
    up to ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        skip = before | set(others())
        left = [c for c in worker_children() if c.pid not in skip]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def exercise(pipe: Pipeline, graph: dict[str, Any], want: reference.Expected) -> None:
    """Run ``pipe`` with map() and run() and compare both with the reference's ``want``."""
    out_node = graph["nodes"][graph["output"]]
    out_name = f"n{graph['output']}"
    error_at = graph["input_error_at"]
    inputs = graph["inputs"]
    read = len(inputs) if error_at is None else error_at
    want_outputs = [v for per_position in want.outputs for v in per_position]
    # map(): every output and Failure, then the input's own error if it has one.
    src = Source(inputs, error_at)
    outputs = pipe.map(src, output=out_name, errors="yield")
    got: list[Any] = []
    with contextlib.ExitStack() as guard:
        if error_at is not None:
            guard.enter_context(pytest.raises(FuzzInputError))
        for v in outputs:
            got.append(v)
    assert src.read == read
    compare_outputs(got, want_outputs, out_node["ordered"])
    compare_report(outputs.report, want, read, "map()")

    # run(): every item reaches every node it should, with the same failures.
    src = Source(inputs, error_at)
    if error_at is None:
        report = pipe.run(src)
    else:
        with pytest.raises(FuzzInputError):
            pipe.run(src)
        report = pipe.last_report
    compare_report(report, want, read, "run()")


# Counterexamples the fuzzer found, kept as regressions (see each comment for what was wrong).
REGRESSIONS: list[dict[str, Any]] = [
    # StopIteration raised in an async def node: Python turns it into a RuntimeError
    # ("coroutine raised StopIteration"), which the Failure named instead of what the
    # node raised (a plain node's Failure says StopIteration).
    {
        "pools": [["process", 1]],
        "nodes": [{"async": True, "fault": ["StopIteration", 2, 0]}],
        "inputs": [0, 1, 2, 3],
    },
    # Sub-items failing below a scatter and gathered: report.failure_counts counted the
    # Failures reaching a sink (one per gathered item), not the items that failed (the
    # node's `failed`).
    {
        "pools": [["thread", 2]],
        "nodes": [
            {"scatter": [3, 5]},
            {"after": [0], "fault": ["ValueError", 2, 0]},
            {"after": [1], "gather": True},
        ],
        "inputs": [1, 2, 3],
        "output": 2,
    },
    # A worker crash inside a batch of 2: the crashed item was missing from the node's
    # report (1 in / 0 failed for 2 in / 1 failed).
    {
        "pools": [["process", 1]],
        "nodes": [{"batch": 2, "fault": ["crash", 3, 1]}],
        "inputs": [0, 1],
    },
    {
        "pools": [["process", 1]],
        "nodes": [
            {"scatter": [0], "batched": True, "batch": 2, "fault": ["crash_batched", 2, 0]},
            {"batched": True},
        ],
        "output": 0,
        "inputs": [None, []],
    },
    # A batched=True call that kills its worker (item 0 is bad): the innocent batch-mate
    # failed with papy.WorkerCrashed too, instead of completing.
    {
        "pools": [["process", 1]],
        "nodes": [{"batched": True, "batch": 2, "fault": ["crash_batched", 3, 1]}],
        "inputs": [0, 1],
    },
    # A crash in the second node of a fused chain: the Failure named the first node.
    {
        "pools": [["process", 1]],
        "nodes": [{}, {"after": [0], "fault": ["crash", 2, 0]}],
        "inputs": [1, 2, 3],
    },
    # A crash in the first node of a fused chain: the node after it did not count the item
    # (report "in" 2 for 3), though the Failure passed through it.
    {
        "pools": [["process", 1]],
        "nodes": [{"fault": ["crash", 2, 1]}, {"after": [0]}],
        "inputs": [1, 2, 3],
    },
    # timeout= on an InlinePool node ran (and read the input) instead of a GraphError.
    {"pools": [["inline", 1]], "nodes": [{"timeout": True}], "inputs": [1]},
    {
        "pools": [["inline", 1]],
        "nodes": [{"scatter": [0], "timeout": True}, {"scatter": [0], "batched": True}],
        "output": 0,
        "inputs": [],
        "input_error_at": 0,
    },
    # An input that raises part-way: the outputs of the items read before it were lost.
    {"pools": [["process", 2]], "nodes": [{}], "inputs": [1, 2, 3], "input_error_at": 2},
    {
        "pools": [["inline", 1]],
        "nodes": [{"scatter": [0], "batched": True, "fault": ["FuzzError", 2, 0]}],
        "inputs": [None],
        "input_error_at": 1,
    },
    # A slow item in a batch of 2 on threads: its fast batch-mate failed with TimeoutError
    # too (the whole batch was timed, not each item).
    {
        "pools": [["thread", 1]],
        "nodes": [{"batch": 2, "timeout": True, "fault": ["timeout", 2, 0]}],
        "inputs": [1, 2, 3],
    },
    {
        "pools": [["process", 1]],
        "nodes": [{"batch": 2, "timeout": True, "fault": ["timeout", 2, 0]}],
        "inputs": [1, 2, 3],
    },
    # Worker deaths found by hand before the fuzzer drew them, on each start method: a
    # node that forked a child and exited (fork/spawn workers were seen dead only when
    # the child ended), and one that closed its worker's pipes and slept (the pool's
    # manager froze in a blocking join, or spun reading the closed pipe).
    {
        "pools": [["process", 2, "fork"]],
        "nodes": [{"batch": 3, "fault": ["crash_fork", 3, 1]}, {"after": [0], "liar": True}],
        "inputs": [0, 1, 2, 3, 4, 5],
    },
    {
        "pools": [["process", 1, "spawn"]],
        "nodes": [{"fault": ["hangup", 2, 0]}, {"after": [0], "fault": ["crash_fork", 2, 1]}],
        "inputs": [0, 1, 2, 3],
    },
    {
        "pools": [["process", 2, "fork"], ["thread", 2]],
        "nodes": [{"fault": ["hangup", 3, 0], "liar": True}, {"after": [0], "pool": 1}],
        "inputs": [0, 1, 2, 3, 4, 5],
    },
]


def with_regressions(test: Any) -> Any:
    """Decorate ``test`` with one explicit ``@example`` per kept counterexample."""
    for graph in reversed(REGRESSIONS):
        test = example(graph=graph)(test)
    return test


# A whole round may take minutes (and shrinking a counterexample more); a hang is caught
# per example by hang_guard instead.
@pytest.mark.timeout(0 if PROFILE == "papy-fuzz" else 900)
@settings(settings.get_profile(PROFILE))
@with_regressions
@given(graph=graphs())
def test_fuzz_pipelines_match_the_reference(graph: dict[str, Any]) -> None:
    """Random graphs, pools and faults give exactly what the reference evaluator says."""
    check(graph)


@pytest.mark.timeout(0 if PROFILE == "papy-fuzz" else 600)
@settings(settings.get_profile(PROFILE), max_examples=max(10, FUZZ_EXAMPLES // 2))
@example(  # two fused nodes of large items, the second failing on some of them
    graph={
        "pools": [["thread", 1]],
        "nodes": [
            {"batch": 4, "large": True},
            {"after": [0], "batch": 4, "fault": ["ValueError", 2, 0]},
        ],
        "inputs": [1, 2, 3, 4, 5, 6],
    }
)
@given(graph=chains())
def test_fuzz_fused_chains_of_large_items_match_the_reference(graph: dict[str, Any]) -> None:
    """Fused nodes whose items are large run them one at a time: same outputs, Failures
    and per-node counts as the reference."""
    check(graph)
