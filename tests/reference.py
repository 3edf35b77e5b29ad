"""Node functions for the differential fuzzer, and the reference evaluator it trusts.

A fuzzed graph is plain data (see ``tests/test_fuzz.py``). Every node runs the same kind of
function: :func:`node_fn` (or :func:`batched_fn` for ``batched=True`` nodes), a module-level
function made specific by ``functools.partial`` with the node's parameters, so it pickles
by reference and behaves the same in the driver, a thread or a worker process.

What a node does with an input is decided by :func:`plan`, a pure function of the node's
parameters and its arguments: either an output value or a fault. The worker-side functions
*act* the fault out (raise, sleep past the node's timeout, kill the worker process); the
reference evaluator only reads the decision, so it can run in the test process without
crashing it. The reference is a plain serial evaluation of the graph, one input position
at a time, written from the documented semantics, not from PaPy's code.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from papy._items import short_repr

#: a node's ``timeout=`` in the fuzzed graphs (seconds), and how long a slow item sleeps:
#: far enough past the limit that a late detection cannot pass for an item on time
TIMEOUT_S = 0.5
SLOW_S = 3.0


class FuzzError(Exception):
    """A user-defined exception raised by a fuzzed node."""


class FuzzInputError(Exception):
    """Raised by a fuzzed input iterator part-way, like a reader hitting a bad record."""


class Unpicklable:
    """An input value that cannot be pickled (like a lock or an open socket in an item)."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def __repr__(self) -> str:
        return f"Unpicklable({self.tag!r})"

    def __reduce__(self) -> Any:
        raise TypeError("an Unpicklable cannot be pickled")


def picklable(value: Any) -> bool:
    """Tell whether ``value`` pickles (an Unpicklable may be nested in lists and dicts)."""
    try:
        pickle.dumps(value)
    except Exception:
        return False
    return True


#: raising fault kinds and the exception class each raises
RAISES: dict[str, type[BaseException]] = {
    "ValueError": ValueError,
    "FuzzError": FuzzError,
    "StopIteration": StopIteration,
    "SystemExit": SystemExit,
    "GeneratorExit": GeneratorExit,
    "KeyboardInterrupt": KeyboardInterrupt,
}


def type_name(cls: type) -> str:
    """Return the name a Failure must give for an exception class (module-qualified)."""
    return (
        cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    )


def exc_type_of(fault: str) -> str:
    """Return the ``Failure.exc_type`` a fault kind must produce."""
    if fault in RAISES:
        return type_name(RAISES[fault])
    return {
        "timeout": "TimeoutError",
        "crash": "papy.WorkerCrashed",
        "crash_batched": "papy.WorkerCrashed",
        "crash_fork": "papy.WorkerCrashed",
        "hangup": "papy.WorkerCrashed",
        "kill_siblings": "papy.WorkerCrashed",
        "short": "ValueError",  # a batched node returned fewer results than items
    }[fault]


def digest(obj: Any) -> int:
    """Return a hash of ``repr(obj)`` that is the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(repr(obj).encode(), digest_size=8).digest(), "big")


def shape(tag: str, d: int) -> Any:
    """Return an output value of some kind picked by ``d``: None, unhashable ones included."""
    k = d % 6
    if k == 0:
        return None
    if k == 1:
        return d % 5  # small ints: many duplicates
    if k == 2:
        return [tag, d % 7]
    if k == 3:
        return {"n": tag, "d": d % 7}
    if k == 4:
        return (tag, d % 11)
    return f"{tag}:{d % 13}"


class Large(tuple):  # type: ignore[type-arg]
    """An output that says it is large (1 MiB to ``sys.getsizeof``) but is a small tuple:
    fused nodes then run it one item at a time, as they would a NumPy array."""

    __slots__ = ()

    def __sizeof__(self) -> int:
        return 2**20


class Liar(tuple):  # type: ignore[type-arg]
    """An output that cannot tell its size: ``sys.getsizeof`` and ``nbytes`` raise, as a
    broken extension type's may. The run must size it some other way, never fail on it."""

    __slots__ = ()

    def __sizeof__(self) -> int:
        raise RuntimeError("this object cannot tell its size")

    @property
    def nbytes(self) -> int:
        raise RuntimeError("this object cannot tell its size")


@dataclass(frozen=True)
class Params:
    """What a node function needs to know: its name, scatter sizes, and its fault."""

    name: str
    scatter: tuple[int, ...] | None = None
    #: (kind, modulus, residue): the item faults when its digest % modulus == residue
    fault: tuple[str, int, int] | None = None
    #: the node's code version: another version gives other outputs (and faults)
    version: int = 0
    #: outputs are :class:`Large` (fused nodes run their items one at a time)
    large: bool = False
    #: outputs are :class:`Liar` (asking their size raises)
    liar: bool = False
    #: where the workers of the node's pool leave a file named by their pid, for a
    #: "kill_siblings" fault of a node on that pool to find them (no effect on outputs)
    pool_dir: str | None = None


def plan(p: Params, args: tuple[Any, ...]) -> tuple[str | None, Any]:
    """Decide what node ``p`` does with ``args``: ``(fault kind or None, output)``."""
    d = digest((p.name, args) if not p.version else (p.name, p.version, args))
    fault = None
    if p.fault is not None:
        kind, mod, res = p.fault
        if d % mod == res:
            fault = kind
    if p.scatter is not None:
        n = p.scatter[(d // 7) % len(p.scatter)]
        out: Any = [shape(p.name, digest((d, i))) for i in range(n)]
    else:
        out = shape(p.name, d)
    if p.large:  # a scatter's sub-items are large
        out = [Large((x,)) for x in out] if p.scatter is not None else Large((out,))
    elif p.liar:
        out = [Liar((x,)) for x in out] if p.scatter is not None else Liar((out,))
    return fault, out


def _act(p: Params, fault: str) -> None:
    """Carry out a fault in the worker: raise, hang past the timeout, or kill the process."""
    if fault in RAISES:
        raise RAISES[fault](f"fault injected in {p.name}")
    if fault in ("crash", "crash_batched"):
        os._exit(13)
    if fault == "crash_fork":  # a child keeps the worker's descriptors and outlives it
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        os._exit(13)
    if fault == "hangup":  # the worker's pipes closed, the process alive
        os.closerange(3, 4096)
        time.sleep(30)
    if fault == "kill_siblings":  # SIGKILL the pool's other workers, then this one
        kill_siblings(p.pool_dir)
        os.kill(os.getpid(), signal.SIGKILL)
    if fault == "timeout":
        time.sleep(SLOW_S)
        return
    raise AssertionError(f"fault {fault!r} cannot be acted by a one-item node")


def kill_siblings(pool_dir: str | None) -> None:
    """SIGKILL the workers that left their pid in ``pool_dir`` and still share this
    process's parent (so a pid reused by another process is left alone)."""
    if pool_dir is None:
        return
    me, parent = os.getpid(), os.getppid()
    for name in os.listdir(pool_dir):
        try:
            pid = int(name)
            with open(f"/proc/{pid}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            if pid != me and ppid == parent:
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass


def _sign_in(p: Params) -> None:
    if p.pool_dir is not None:
        with open(os.path.join(p.pool_dir, str(os.getpid())), "a"):
            pass


def node_fn(p: Params, *args: Any) -> Any:
    """Run a fuzzed node on one item (one argument per parent; a gather gets its list)."""
    _sign_in(p)
    fault, out = plan(p, args)
    if fault is not None:
        _act(p, fault)
    return out


async def async_node_fn(p: Params, *args: Any) -> Any:
    """:func:`node_fn` as an ``async def`` node: a slow item awaits, the others yield once."""
    import asyncio

    _sign_in(p)

    fault, out = plan(p, args)
    if fault == "timeout":
        await asyncio.sleep(SLOW_S)
    elif fault is not None:
        _act(p, fault)
    await asyncio.sleep(0)
    return out


def batched_fn(p: Params, items: list[Any]) -> list[Any]:
    """Run a fuzzed ``batched=True`` node on a list of items; one output per item.

    If any item of the batch is faulty, the whole call misbehaves the way that fault says
    ("short" returns the batch's outputs without the faulty items' ones).
    """
    _sign_in(p)
    plans = [plan(p, (x,)) for x in items]
    faults = [f for f, _ in plans if f is not None]
    if not faults:
        return [out for _, out in plans]
    if faults[0] == "short":
        return [out for f, out in plans if f is None]
    _act(p, faults[0])
    return [out for _, out in plans]


# -- the reference evaluator ----------------------------------------------------------------


class Fail(NamedTuple):
    """An expected Failure: the node that failed, the item's key, the exception's name, and
    the item's input to that node as ``Failure.input_repr`` shows it."""

    node: str
    item: Any
    exc_type: str
    input_repr: str


@dataclass
class Expected:
    """What a run of a fuzzed graph must produce over the input items it read."""

    #: per input position, the output node's outputs (values or Fail) in key order
    outputs: list[list[Any]] = field(default_factory=list)
    #: per node name: items that reached it (Failures passing through included)
    items_in: dict[str, int] = field(default_factory=dict)
    #: per node name: items whose Failure names this node
    failed: dict[str, int] = field(default_factory=dict)
    #: per node name with failures: how many per exception type (``Failure.exc_type``)
    failure_counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def fail(self, f: Fail) -> Fail:
        """Count an item that fails at ``f.node``."""
        self.failed[f.node] += 1
        per = self.failure_counts.setdefault(f.node, {})
        per[f.exc_type] = per.get(f.exc_type, 0) + 1
        return f


def papy_key(k: tuple[int, ...]) -> Any:
    """Return the key PaPy shows for a reference key: the position alone at the top level."""
    return k[0] if len(k) == 1 else k


def node_params(i: int, node: dict[str, Any]) -> Params:
    """Return the parameters of node ``i`` of a graph description."""
    scatter = node.get("scatter")
    fault = node.get("fault")
    return Params(
        name=f"n{i}",
        scatter=tuple(scatter) if scatter is not None else None,
        fault=(fault[0], fault[1], fault[2]) if fault is not None else None,
        version=node.get("version", 0),
        large=node.get("large", False),
        liar=node.get("liar", False),
    )


def evaluate(graph: dict[str, Any], inputs: Sequence[Any]) -> Expected:
    """Evaluate ``graph`` over ``inputs`` serially, the plain way, and say what must come out.

    Keys are tuples here: ``(position,)`` plus one index per scatter level. For each
    position the nodes are evaluated in order (parents come first in a description), each
    into a dict key -> value or Fail, kept in key order.
    """
    nodes = graph["nodes"]
    params = [node_params(i, n) for i, n in enumerate(nodes)]
    exp = Expected()
    for i in range(len(nodes)):
        exp.items_in[f"n{i}"] = 0
        exp.failed[f"n{i}"] = 0
    for pos, x in enumerate(inputs):
        outs: list[dict[tuple[int, ...], Any]] = []
        ins: list[dict[tuple[int, ...], Any]] = []  # each node's input keys -> argument tuple
        for i, node in enumerate(nodes):
            after = node["after"]
            inp: dict[tuple[int, ...], Any] = {}
            if not after:
                inp[(pos,)] = (x,)
            elif node.get("gather"):
                par = after[0]
                closes = scatter_of(nodes, par)  # the scatter whose sub-items are gathered
                for k in ins[closes]:  # the keys that scatter was given
                    subs = [v for sk, v in outs[par].items() if sk[:-1] == k]
                    bad = next((v for v in subs if isinstance(v, Fail)), None)
                    inp[k] = bad if bad is not None else (subs,)
            else:
                for k in outs[after[0]]:
                    vals = [outs[a][k] for a in after]
                    bad = next((v for v in vals if isinstance(v, Fail)), None)
                    inp[k] = bad if bad is not None else tuple(vals)
            ins.append(inp)
            out: dict[tuple[int, ...], Any] = {}
            p = params[i]
            # an input is pickled to reach the node's worker process
            sends = not after and pool_of(graph, node) in ("process", "dask")
            for k, args in inp.items():
                exp.items_in[p.name] += 1
                if isinstance(args, Fail):
                    result: Any = args
                elif sends and not picklable(args[0]):
                    # the item cannot be sent to the node's worker: it fails there, unrun
                    result = exp.fail(Fail(p.name, papy_key(k), "TypeError", short_repr(args[0])))
                else:
                    fault, value = plan(p, args)
                    if fault is not None:
                        given = args if len(after) > 1 else args[0]  # a join's is a tuple
                        result = exp.fail(
                            Fail(p.name, papy_key(k), exc_type_of(fault), short_repr(given))
                        )
                    else:
                        result = value
                if p.scatter is None:
                    out[k] = result
                elif isinstance(result, Fail):
                    out[(*k, 0)] = result  # a failed item has no sub-items: it stands for them
                else:
                    for j, sub in enumerate(result):
                        out[(*k, j)] = sub
            outs.append(out)
        exp.outputs.append(list(outs[graph["output"]].values()))
    return exp


def pool_of(graph: dict[str, Any], node: dict[str, Any]) -> str:
    """Return the kind of pool a node runs on (the pipeline's, pool 0, by default)."""
    index = node.get("pool")
    return str(graph["pools"][index if index is not None else 0][0])


def scatter_of(nodes: list[dict[str, Any]], i: int) -> int:
    """Return the index of the nearest open scatter above node ``i``'s outputs."""
    stack: list[list[int]] = []
    for j, n in enumerate(nodes):
        s = list(stack[n["after"][0]]) if n["after"] else []
        if n.get("gather"):
            s.pop()
        if n.get("scatter") is not None:
            s.append(j)
        stack.append(s)
    return stack[i][-1]
