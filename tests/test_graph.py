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
    pipe.connect(c, b)
    with pytest.raises(CycleError) as info:
        pipe.map([1])
    assert "b -> c -> b" in str(info.value)
    assert isinstance(info.value, PapyError)


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
