"""A differential fuzzer for journaled runs: resumed runs must give what a fresh run gives.

Hypothesis draws a graph as ``tests/test_fuzz.py`` does (pools, scatters, gathers, joins,
batched and async nodes, faults, unpicklable items), which nodes keep a cache
(``cache=True``), whether items are known by content or by ``key=repr``, and a first run
over some of the input items in another order, possibly left part-way (the caller stops
reading). Some nodes are then edited (a constant in their code, or an argument of their
``functools.partial``). The contract checked against ``tests/reference.py``:

- A run on the same journal over all the items gives exactly the outputs and Failures a
  fresh run of the edited graph gives (an edited node and everything below it run again):
  each item gets its own output, whatever earlier runs saw, in which order and at which
  position (a replayed Failure names the item's position in *this* run).
- A third run (``map()``, then ``run()``) skips every item (``report.skipped`` is the
  number of items; an item that cannot be pickled runs again, unless ``key=`` names it),
  failed ones included (a Failure made outside the node, by a crash or
  an item that could not be sent, is recorded too), and still gives the same outputs; so
  does a run with ``retry_failed=True``, which runs the failed items again.
- Nothing is left behind: no child process once the pools are closed.

``PAPY_FUZZ_JOURNAL_EXAMPLES`` sets the number of examples (20; ``make fuzz`` runs rounds).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Any

import pytest
import reference
import test_fuzz as fz
from hypothesis import event, example, given, note, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

#: fault kinds a journaled example may use: those that cost no wall time (a slow item
#: sleeps seconds past its timeout, and each example runs the graph three times)
FAULTS = (fz.ENABLED_FAULTS - {"timeout", "on_error", "input_error", "inline_timeout"}) | {
    "unpicklable"
}
EXAMPLES = int(os.environ.get("PAPY_FUZZ_JOURNAL_EXAMPLES", "20"))


@st.composite
def journaled(draw: st.DrawFn) -> dict[str, Any]:
    """Draw a graph, its cached nodes, and the first run's items (order, how many read)."""
    graph = draw(fz.graphs())
    for node in graph["nodes"]:
        if node["fault"] is not None and node["fault"][0] not in FAULTS:
            node["fault"] = ["ValueError", *node["fault"][1:]]
        node["on_error"] = False
        node["timeout"] = False
        node["cache"] = draw(st.booleans())
        # edited between the first run and the second: in its code, or in its arguments
        node["change"] = draw(st.sampled_from([None, None, "args", "code"]))
    graph["input_error_at"] = None
    n = len(graph["inputs"])
    graph["first"] = draw(st.permutations(range(n)).map(lambda p: p[: draw(st.integers(0, n))]))
    graph["stop_after"] = draw(st.none() | st.integers(0, 4))  # outputs read, then left
    graph["keyed"] = draw(st.booleans())  # key=repr, where the items' reprs differ
    return graph


def check(graph: dict[str, Any], others: Any = frozenset) -> None:
    """Run the graph on one journal, again and again, and compare each run with the
    reference (``others``: as for ``test_fuzz.check``)."""
    graph = fz.complete(graph)
    if currently_in_test_context():
        for feature in fz.graph_features(graph):
            event(feature)
        for kind in sorted(fz.faults_used(graph)) or ["none"]:
            event(f"fault {kind}")
        if graph.get("stop_after") is not None:
            event("first run left part-way")
    inputs = graph["inputs"]
    first = [inputs[i] for i in graph.get("first", [])]
    out_node = graph["nodes"][graph["output"]]
    out_name = f"n{graph['output']}"
    # The nodes edited after the first run: the later runs run the new version.
    edited = {
        **graph,
        "nodes": [{**n, "version": 1} if n.get("change") else n for n in graph["nodes"]],
    }
    if currently_in_test_context() and edited != graph:
        event("nodes edited between runs")
    want = reference.evaluate(edited, inputs)
    want_outputs = [v for per_position in want.outputs for v in per_position]
    note(f"expected outputs: {[fz.canon(v) for v in want_outputs]}")
    before = {c.pid for c in fz.worker_children()}
    pools = [fz.make_pool(*p) for p in graph["pools"]]
    with contextlib.ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        for p in pools:
            stack.enter_context(p)
        # first run, the rest, the resumed run and the retry of failures
        stack.enter_context(fz.hang_guard(fz.hang_limit(edited, want, runs=4)))
        pipe = fz.build(graph, pools)  # with cache=True where a node says
        db = os.path.join(tmp, "run.db")
        keyed = graph.get("keyed") and len({repr(x) for x in inputs}) == len(inputs)
        jargs: dict[str, Any] = {"journal": db, "key": repr if keyed else None}

        # The first run: some of the items, in another order, perhaps left part-way.
        outputs = pipe.map(first, output=out_name, errors="yield", **jargs)
        stop = graph.get("stop_after")
        got = []
        for v in outputs:
            got.append(v)
            if stop is not None and len(got) >= stop:
                break
        if stop is None:
            sub = reference.evaluate(graph, first)
            fz.compare_outputs(got, [v for vs in sub.outputs for v in vs], out_node["ordered"])
        outputs.close()

        # The second run: all the items, the edited nodes' new version; what earlier runs
        # finished is replayed where its node and the nodes above it are unchanged.
        pipe = fz.build(edited, pools)
        got = list(pipe.map(inputs, output=out_name, errors="yield", **jargs))
        fz.compare_outputs(got, want_outputs, out_node["ordered"])

        # The third run: everything is finished; nothing runs, the outputs are the same.
        outputs = pipe.map(inputs, output=out_name, errors="yield", **jargs)
        got = list(outputs)
        fz.compare_outputs(got, want_outputs, out_node["ordered"])
        # An item that cannot be pickled cannot be known again by content: it runs again.
        known = len(inputs) if keyed else sum(reference.picklable(x) for x in inputs)
        report = outputs.report
        assert report is not None
        assert report.skipped == known, (
            f"third run skipped {report.skipped} of {known} finished items"
        )
        report = pipe.run(inputs, **jargs)  # the sinks alone: all finished too
        assert report.skipped == known, f"run() skipped {report.skipped} of {known} finished items"

        # retry_failed=True: the failed items run again, and fail the same way.
        got = list(pipe.map(inputs, output=out_name, errors="yield", retry_failed=True, **jargs))
        fz.compare_outputs(got, want_outputs, out_node["ordered"])
    left = fz.wait_for_children_gone(before, others=others)
    assert not left, f"child processes left after the pools closed: {left}"


# Counterexamples the fuzzer found, kept as regressions (see each comment for what was wrong).
REGRESSIONS: list[dict[str, Any]] = [
    # A crash is a Failure no worker records: the item was run again by every later run
    # (never finished), and a sub-item's was missing from a replay below a scatter.
    {
        "pools": [["process", 1]],
        "nodes": [{"batched": True, "fault": ["crash_batched", 2, 0]}],
        "inputs": [None],
    },
    # A Failure of a scatter node (the output) is recorded under the item's key, as a
    # worker records it: under the sub-item's, beside the worker's, it was replayed twice.
    {
        "pools": [["inline", 1]],
        "nodes": [
            {"scatter": [0], "batched": True},
            {"after": [0], "scatter": [0], "gather": True, "fault": ["FuzzError", 2, 0]},
        ],
        "inputs": [None],
        "output": 1,
    },
    # A Failure recorded at position 0 was replayed, in a run where that item was at
    # position 2, naming item 0 (another item of this run).
    {
        "pools": [["thread", 2]],
        "nodes": [{"fault": ["ValueError", 2, 0]}],
        "inputs": [0, 1, 2, 3],
        "first": [3, 2],
    },
]


def with_regressions(test: Any) -> Any:
    """Decorate ``test`` with one explicit ``@example`` per kept counterexample."""
    for graph in reversed(REGRESSIONS):
        test = example(graph=graph)(test)
    return test


@pytest.mark.timeout(0 if fz.PROFILE == "papy-fuzz" else 900)
@settings(settings.get_profile(fz.PROFILE), max_examples=EXAMPLES)
@with_regressions
@given(graph=journaled())
def test_fuzz_journaled_runs_match_a_fresh_run(graph: dict[str, Any]) -> None:
    """Random graphs run and resumed on one journal give what the reference says."""
    check(graph)
