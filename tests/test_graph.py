"""Graph errors are found before any work starts and say what is wrong."""

from __future__ import annotations

import pytest
from helpers import add, explode, inc

from papy import CycleError, GraphError, InlinePool, PapyError, Pipeline


def _never_called(x):
    raise AssertionError("no work may start on an invalid graph")


def test_cycle_is_named():
    pipe = Pipeline("cyc", pool=InlinePool())
    a = pipe.add(_never_called, name="a")
    b = pipe.add(inc, after=a, name="b")
    c = pipe.add(inc, after=b, name="c")
    with pytest.raises(CycleError) as info:
        pipe.connect(c, b)
    assert "b -> c -> b" in str(info.value)
    assert info.value.cycle == ["b", "c"]
    assert isinstance(info.value, PapyError)
    # Nothing changed: the graph still runs.
    assert c.parents == [b] and b.parents == [a]


def test_connect_closing_a_cycle_raises_at_once_in_data_flow_order():
    pipe = Pipeline("cyc", pool=InlinePool())
    load = pipe.add(_never_called, name="load")
    parse = pipe.add(inc, after=load, name="parse")
    save = pipe.add(inc, after=parse, name="save")
    with pytest.raises(CycleError) as info:
        pipe.connect(save, load)
    assert "load -> parse -> save -> load" in str(info.value)
    # The arrows read as to_mermaid() draws them: every edge of the cycle is drawn.
    mermaid = pipe.to_mermaid()
    assert "n0_load --> n1_parse" in mermaid and "n1_parse --> n2_save" in mermaid
    with pytest.raises(CycleError, match="node_x -> node_x"):
        other = Pipeline("self", pool=InlinePool())
        x = other.add(inc, name="node_x")
        other.connect(x, x)


def test_cycle_made_by_hand_is_reported_in_data_flow_order():
    pipe = Pipeline("cyc", pool=InlinePool())
    load = pipe.add(_never_called, name="load")
    parse = pipe.add(inc, after=load, name="parse")
    save = pipe.add(inc, after=parse, name="save")
    load.parents.append(save)  # behind connect()'s back
    save.children.append(load)
    with pytest.raises(CycleError) as info:
        pipe.map([1])
    assert "load -> parse -> save -> load" in str(info.value)


def _two(a, b):
    return a + b


def _two_with_default(a, b, c=0):
    return a + b + c


def _many(*parts):
    return sum(parts)


def test_join_with_too_few_parameters_is_a_graph_error_before_any_work():
    pipe = Pipeline("arity", pool=InlinePool())
    a = pipe.add(_never_called, name="a")
    b = pipe.add(_never_called, name="b")
    c = pipe.add(_never_called, name="c")
    pipe.add(_two, after=[a, b, c], name="merge")
    with pytest.raises(GraphError) as info:
        pipe.map([1])
    text = str(info.value)
    assert "'merge'" in text and "3 parents" in text and "takes 2 positional" in text


def test_join_arity_accepts_defaults_varargs_args_and_builtins():
    pipe = Pipeline("ok", pool=InlinePool())
    a = pipe.add(inc, name="a")
    b = pipe.add(inc, name="b")
    pipe.add(_two_with_default, after=[a, b], name="defaults")
    pipe.add(_many, after=[a, b], name="varargs")
    pipe.add(_two_with_default, after=[a, b], args=(5,), name="extra")
    pipe.add(max, after=[a, b], name="builtin")  # no readable signature: let through
    report = pipe.run([1, 2])
    assert report.failed == 0
    # One parameter too many: a required one left without a value.
    bad = Pipeline("too-many", pool=InlinePool())
    x, y = bad.add(inc, name="x"), bad.add(inc, name="y")
    bad.add(lambda p, q, r: p, after=[x, y], name="three")
    with pytest.raises(GraphError, match="'three' has 2 parents.*takes 3 positional"):
        bad.run([1])


def test_after_from_another_pipeline_is_refused():
    other = Pipeline("other")
    foreign = other.add(inc)
    pipe = Pipeline("mine")
    with pytest.raises(GraphError, match="belongs to pipeline 'other'"):
        pipe.add(inc, after=foreign)


def test_after_unknown_name_is_refused():
    pipe = Pipeline("mine")
    pipe.add(inc)
    with pytest.raises(GraphError, match="no node named 'nope'.*inc"):
        pipe.add(inc, after="nope")


def test_gather_without_scatter_upstream():
    pipe = Pipeline("g", pool=InlinePool())
    a = pipe.add(_never_called)
    pipe.add(sum, after=a, gather=True)
    with pytest.raises(GraphError, match="gather=True but no scatter"):
        list(pipe.map([1]))


def test_join_of_different_scatter_levels():
    pipe = Pipeline("levels", pool=InlinePool())
    a = pipe.add(_never_called, name="a")
    s = pipe.add(explode, after=a, scatter=True, name="s")
    pipe.add(add, after=[a, s], name="j")
    with pytest.raises(GraphError, match="'j' joins items from different scatter levels"):
        pipe.map([1])


def test_output_that_does_not_exist():
    pipe = Pipeline("out", pool=InlinePool())
    pipe.add(_never_called)
    with pytest.raises(GraphError, match="output 'ghost' is not a node"):
        pipe.map([1], output="ghost")


def test_several_sinks_need_output_and_are_named():
    pipe = Pipeline("sinks", pool=InlinePool())
    a = pipe.add(_never_called)
    pipe.add(inc, after=a, name="left")
    pipe.add(inc, after=a, name="right")
    with pytest.raises(GraphError, match="2 sinks \\('left', 'right'\\).*output="):
        pipe.map([1])


def test_empty_pipeline():
    with pytest.raises(GraphError, match="no nodes"):
        Pipeline("empty").map([1])


def test_duplicate_explicit_name():
    pipe = Pipeline("dup")
    pipe.add(inc, name="x")
    with pytest.raises(GraphError, match="already exists"):
        pipe.add(inc, name="x")


def test_bad_arguments_are_clear():
    pipe = Pipeline("args")
    with pytest.raises(ValueError, match="batch must be at least 1"):
        pipe.add(inc, batch=0)
    with pytest.raises(TypeError, match="needs a function"):
        pipe.add(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="errors must be"):
        pipe.add(inc)
        pipe.map([1], errors="ignore")  # type: ignore[arg-type]


def test_a_gather_with_two_parents_is_refused_before_any_work():
    from papy import GraphError, InlinePool, Pipeline

    pipe = Pipeline("gather2", pool=InlinePool())
    s = pipe.add(lambda x: [x, x + 1], scatter=True, name="split")
    a = pipe.add(lambda v: 10 * v, after=s, name="a")
    b = pipe.add(lambda v: -v, after=s, name="b")
    pipe.add(lambda xs, ys: (xs, ys), after=[a, b], gather=True, name="both")
    with pytest.raises(GraphError, match="'both' has gather=True and 2 parents"):
        pipe.map([1, 5])
