"""What the journal knows an item and a node by: each item gets its own records, and a
changed node is recomputed, whatever the item or the callable is made of."""

from __future__ import annotations

import collections
import functools
import json
import operator
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import threading
import uuid
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from papy import Failure, Pipeline, ProcessPool, RunAborted, ThreadPool
from papy._journal.digest import content_digest


class Held:
    """An item holding something that cannot be pickled (a lock), and a value."""

    def __init__(self, value: int) -> None:
        self.value = value
        self.lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Held({self.value})"


def value_of(item: Held) -> int:
    return item.value * 10


def test_items_that_cannot_be_pickled_never_get_another_items_records(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = tmp_path / "run.db"
    pipe = Pipeline("held", pool=ThreadPool(2))
    pipe.add(value_of, name="value")
    with pipe.pool, caplog.at_level("WARNING", logger="papy"):
        first = [Held(1), Held(2), Held(3)]
        assert list(pipe.map(first, journal=journal)) == [10, 20, 30]
        again = [Held(3), Held(1), Held(2)]  # known by type only, they were swapped
        outputs = pipe.map(again, journal=journal)
        assert list(outputs) == [30, 10, 20]
        assert outputs.report is not None and outputs.report.skipped == 0
    assert "cannot be pickled" in caplog.text and "key=" in caplog.text


def test_builtin_methods_as_items_are_known_by_their_object(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    a, b = [1], [1, 2, 3]
    pipe = Pipeline("methods", pool=ThreadPool(2))
    pipe.add(lambda m: len(m.__self__), name="size")
    with pipe.pool:
        assert list(pipe.map([a.append, b.append], journal=journal)) == [1, 3]
        assert list(pipe.map([b.append, a.append], journal=journal)) == [3, 1]


def test_dicts_in_another_key_order_are_other_items(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"
    pipe = Pipeline("order", pool=ThreadPool(2))
    pipe.add(json.dumps, name="encode")
    with pipe.pool:
        assert list(pipe.map([{"a": 1, "b": 2}], journal=journal)) == ['{"a": 1, "b": 2}']
        assert list(pipe.map([{"b": 2, "a": 1}], journal=journal)) == ['{"b": 2, "a": 1}']
        outputs = pipe.map([{"a": 1, "b": 2}, {"b": 2, "a": 1}], journal=journal)
        assert list(outputs) == ['{"a": 1, "b": 2}', '{"b": 2, "a": 1}']
        assert outputs.report is not None and outputs.report.skipped == 2


class Scale:
    """A callable object whose state is in ``__slots__``."""

    __slots__ = ("factor",)

    def __init__(self, factor: int) -> None:
        self.factor = factor

    def __call__(self, x: int) -> int:
        return x * self.factor


def _classes(call_body: str, helper_body: str) -> Any:
    """Return an instance of ``Adder``, whose ``__call__`` is inherited from ``Base`` and
    calls a helper method: the same names each time, with the bodies given."""
    source = f"""
    class Base:
        def __call__(self, x):
            return {call_body}

    class Adder(Base):
        def helper(self, x):
            return {helper_body}
    """
    namespace: dict[str, Any] = {"__name__": "made"}
    exec(textwrap.dedent(source), namespace)
    return namespace["Adder"]()


def test_a_changed_callable_object_is_recomputed(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"

    def run(fn: Any) -> list[Any]:
        pipe = Pipeline("objects", pool=ThreadPool(2))
        pipe.add(fn, name="f")
        with pipe.pool:
            outputs = pipe.map([1, 2], journal=journal)
            got = list(outputs)
        assert outputs.report is not None
        skipped.append(outputs.report.skipped)
        return got

    skipped: list[int] = []

    assert run(Scale(10)) == [10, 20]
    assert run(Scale(20)) == [20, 40]  # slotted state
    assert run(_classes("x + 1", "x")) == [2, 3]
    assert run(_classes("x + 1000", "x")) == [1001, 1002]  # an inherited __call__
    assert run(_classes("self.helper(x)", "x * 5")) == [5, 10]
    assert run(_classes("self.helper(x)", "x * 7")) == [7, 14]  # a method it calls
    assert run(_classes("self.helper(x)", "x * 7")) == [7, 14]
    assert run(_made("Twice", "def __new__(cls, x):\n    return x * 2")) == [2, 4]
    assert run(_made("Twice", "def __new__(cls, x):\n    return x * 3")) == [3, 6]  # a class
    assert run(_made("Twice", "def __new__(cls, x):\n    return x * 3")) == [3, 6]
    assert skipped == [0, 0, 0, 0, 0, 0, 2, 0, 0, 2]  # the same code again: replayed


def _made(name: str, body: str) -> Any:
    """Return a class made from source: the same name each time, with the body given."""
    namespace: dict[str, Any] = {"__name__": "made"}
    exec(f"class {name}:\n" + textwrap.indent(body, "    "), namespace)
    return namespace[name]


def double(x: int) -> int:
    return x * 2


def add_hundred(x: int) -> int:
    return x + 100


def test_force_keeps_the_records_of_a_changed_node_for_later_runs(tmp_path: Path) -> None:
    journal = tmp_path / "run.db"

    def run(fn: Any, force: bool) -> tuple[list[Any], int]:
        pipe = Pipeline("force", pool=ThreadPool(2))
        pipe.add(fn, name="f")
        pipe.add(lambda y: y, after="f", name="sink")
        with pipe.pool:
            outputs = pipe.map(range(3), journal=journal, force=force)
            got = list(outputs)
        assert outputs.report is not None
        return got, outputs.report.skipped

    assert run(double, force=False) == ([0, 2, 4], 0)
    assert run(add_hundred, force=True) == ([0, 2, 4], 3)  # vouched for: kept
    assert run(add_hundred, force=False) == ([0, 2, 4], 3)  # and they still authenticate


def heavy(x: int) -> int:
    if x == 5:
        raise ValueError("five")
    return x * 3


def last_v1(y: int) -> int:
    return y + 1


def last_v2(y: int) -> int:
    return y + 2


def test_a_cached_failure_given_back_does_not_stop_a_run_again(tmp_path: Path) -> None:
    """``on_error="raise"`` stops the run that meets the failure, not one that only replays
    its record (the node after it changed, so the item is not finished)."""
    journal = tmp_path / "run.db"

    def pipeline(last: Any) -> Pipeline:
        pipe = Pipeline("cached", pool=ProcessPool(2))
        pipe.add(heavy, name="heavy", cache=True, on_error="raise")
        pipe.add(last, after="heavy", name="last")
        return pipe

    pipe = pipeline(last_v1)
    with pipe.pool, pytest.raises(RunAborted):
        list(pipe.map(range(8), journal=journal, errors="yield"))
    pipe = pipeline(last_v2)
    with pipe.pool:
        outputs = pipe.map(range(8), journal=journal, errors="yield")
        got = list(outputs)
    assert [v if type(v) is not Failure else (v.node, v.item) for v in got] == [
        2,
        5,
        8,
        11,
        14,
        ("heavy", 5),
        20,
        23,
    ]
    assert outputs.report is not None and outputs.report.nodes["heavy"].failed == 1


def _run_script(script: Path, journal: Path, **env: str) -> dict[str, Any]:
    """Run ``script`` (which prints one JSON object) in a process of its own, in its
    directory, on ``journal``, as a user re-running it would; return what it printed.
    No ``.pyc`` is written: a quick edit could keep the size and second of the old file."""
    argv = [sys.executable, script.name, str(journal)]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **env}
    done = subprocess.run(argv, cwd=script.parent, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


SCRIPT = """
import json, sys
from papy import Pipeline, ThreadPool
import helpers
from helpers import tidy

SCALE = {scale}

def clean(x):
    return x + {clean}

def score(x):
    return helpers.weight(tidy(clean(x))) * SCALE

pipe = Pipeline("edited", pool=ThreadPool(2))
pipe.add(score, name="score")
with pipe.pool:
    outputs = pipe.map(range(4), journal=sys.argv[1])
    got = list(outputs)
print(json.dumps({{"got": got, "skipped": outputs.report.skipped,
                  "changed": outputs.report.changed}}))
"""

HELPERS = """
import functools

def logged(fn):
    @functools.wraps(fn)
    def wrapper(x):
        return fn(x)
    return wrapper

@logged
def weight(x):
    return x + {weight}

def tidy(x):
    return _inner(x)

@functools.lru_cache
def _inner(x):
    return x * {inner}
"""


def test_an_edit_to_what_a_node_calls_or_reads_recomputes_it(tmp_path: Path) -> None:
    # A node was known by its own code only: editing a helper it calls (in the script or in
    # a module next to it, decorated or cached) or a constant it reads gave the old
    # outputs on the next run.
    journal = tmp_path / "run.db"

    code = {"scale": 1, "clean": 1, "weight": 10, "inner": 2}

    def run() -> dict[str, Any]:
        (tmp_path / "script.py").write_text(SCRIPT.format(**code))
        (tmp_path / "helpers.py").write_text(HELPERS.format(**code))
        result = _run_script(tmp_path / "script.py", journal)
        want = [
            ((x + code["clean"]) * code["inner"] + code["weight"]) * code["scale"] for x in range(4)
        ]
        assert result["got"] == want, (code, result)
        return result

    assert run()["skipped"] == 0
    assert run()["skipped"] == 4  # nothing changed: nothing runs
    for edit in ({"clean": 2}, {"scale": 3}, {"weight": 20}, {"inner": 5}):
        code.update(edit)  # one edit at a time, kept for the next
        result = run()
        assert result["skipped"] == 0, edit
        assert result["changed"] == {"score": "a function, class or constant it uses changed"}
        assert run()["skipped"] == 4, edit


LIBRARY_DECORATED = """
import contextlib, functools

@contextlib.contextmanager
def scaled(x):
    yield x * {scale}

@functools.singledispatch
def convert(x):
    return x

@convert.register
def _(x: int):
    return x + {offset}
"""

LIBRARY_SCRIPT = """
import json, sys
from papy import Pipeline, ThreadPool
from decorated import convert, scaled

def node(x):
    import local_helper  # imported inside the node: not a global of this module
    from pkg.core import bump  # a package's module, likewise
    with scaled(x) as y:
        return bump(local_helper.shift(convert(y)))

pipe = Pipeline("library", pool=ThreadPool(2))
pipe.add(node, name="node")
with pipe.pool:
    outputs = pipe.map(range(3), journal=sys.argv[1])
    got = list(outputs)
print(json.dumps({{"got": got, "skipped": outputs.report.skipped}}))
"""


def test_helpers_behind_library_decorators_and_local_imports_are_followed(tmp_path: Path) -> None:
    # A helper made by contextlib.contextmanager or functools.singledispatch is a function
    # of the library wrapping the user's, and a module imported inside a node is no global
    # of it: edits to either gave the old outputs.
    journal = tmp_path / "run.db"
    code = {"scale": 10, "offset": 1, "shift": 100, "bump": 1000}

    def run() -> dict[str, Any]:
        (tmp_path / "script.py").write_text(LIBRARY_SCRIPT.format())
        (tmp_path / "decorated.py").write_text(LIBRARY_DECORATED.format(**code))
        (tmp_path / "local_helper.py").write_text(
            f"def shift(x):\n    return x + {code['shift']}\n"
        )
        (tmp_path / "pkg").mkdir(exist_ok=True)
        (tmp_path / "pkg" / "__init__.py").write_text("")
        (tmp_path / "pkg" / "core.py").write_text(f"def bump(x):\n    return x + {code['bump']}\n")
        result = _run_script(tmp_path / "script.py", journal)
        want = [sum(code.values()) - code["scale"] + x * code["scale"] for x in range(3)]
        assert result["got"] == want, (code, result)
        return result

    assert run()["skipped"] == 0
    for edit in ({"scale": 20}, {"offset": 2}, {"shift": 200}, {"bump": 2000}):
        code.update(edit)
        assert run()["skipped"] == 0, edit
        assert run()["skipped"] == 3, edit


# -- every kind of edit a node or an item can carry --------------------------------------------


def _source(text: str) -> dict[str, Any]:
    """Run ``text`` as a module of its own (a file edited between two runs) and return
    its namespace."""
    namespace: dict[str, Any] = {"__name__": "edited"}
    exec(compile(textwrap.dedent(text), "<edited>", "exec", dont_inherit=True), namespace)
    return namespace


def _resumed_is_fresh(
    tmp_path: Path, first: Any, then: Any, items: list[Any], more: Any = None
) -> None:
    """Run ``first`` over ``items`` on a journal, then ``then`` over ``more`` (``items``)
    on the same journal: each item must get what a fresh run of ``then`` gives it."""
    journal = tmp_path / f"{uuid.uuid4().hex}.db"
    later = items if more is None else more

    def run(fn: Any, over: list[Any], **kw: Any) -> list[Any]:
        pipe = Pipeline("edits", pool=ThreadPool(2))
        pipe.add(fn, name="f")
        with pipe.pool:
            return list(pipe.map(over, errors="yield", **kw))

    run(first, items, journal=journal)
    assert run(then, later, journal=journal) == run(then, later)


_DECORATED = """
import functools

def deco(fn):
    @functools.wraps(fn)
    def wrapper(x):
        return fn(x)
    return wrapper

@deco
@deco
@deco
@deco
def f(x):
    return x + {k}
"""

_CLASSES = """
import enum, threading

class Default:
    def __call__(self, x, k={k}):
        return x + k

class Attribute:
    k = {k}
    def __call__(self, x):
        return x + self.k

class Calls:
    def m(self, x):
        return self.h(x)
    def h(self, x):
        return x + {k}

class Init:
    def __init__(self, x, k={k}):
        self.v = x + k
    def __eq__(self, other):
        return self.v == other.v

class Held:
    def __init__(self, w):
        self.w = w
        self.lock = threading.Lock()

class Level(enum.Enum):
    LOW = {k}

def made(k):
    class Inner:
        def __call__(self, x):
            return x + k
    return Inner()

def with_lock(x, held=Held({k})):
    return x * held.w

def level(x):
    return x + Level.LOW.value

import dataclasses, pathlib

@dataclasses.dataclass(frozen=True)
class Cfg:
    k: int

CONFIG = Cfg({k})
ROOT = pathlib.Path("/data/{k}")

def inner(x):
    return x + {k}

def helper(x):
    return inner(x)

STEPS = (helper, abs)

def with_config(x):
    return x + CONFIG.k + int(ROOT.name)

def via_default(x, fn=helper):
    return fn(x)

def via_tuple(x):
    return STEPS[0](x)

class Outer:
    class Inner:
        k = {k}
    def __call__(self, x):
        return x + self.Inner.k

class Meta(type):
    def bump(cls, x):
        return x + {k}

class Measured(metaclass=Meta):
    def __call__(self, x):
        return type(self).bump(x)

class LooksLikePartial:
    def __init__(self):
        self.func, self.keywords = abs, {{}}
    def __call__(self, x):
        return x + {k}

def apply(x, fn):
    return fn(x)
"""


@pytest.mark.parametrize(
    ("first", "then", "items"),
    [
        (str.upper, str.lower, ["Ab"]),
        (operator.itemgetter(0), operator.itemgetter(1), [(1, 2)]),
        (operator.attrgetter("real"), operator.attrgetter("imag"), [1 + 2j]),
        (operator.methodcaller("split", ","), operator.methodcaller("split", ";"), ["a,b;c"]),
        (
            functools.partial(str.split, sep=",", maxsplit=1),
            functools.partial(str.rsplit, sep=",", maxsplit=1),
            ["a,b,c"],
        ),
    ],
    ids=["method-descriptor", "itemgetter", "attrgetter", "methodcaller", "partial-of-builtin"],
)
def test_another_builtin_callable_is_another_node(tmp_path: Path, first, then, items) -> None:
    # Built-in callables of one type (str.upper and str.lower, two itemgetters) had one
    # fingerprint: the second run was given the first one's outputs.
    _resumed_is_fresh(tmp_path, first, then, items)


@pytest.mark.parametrize(
    "pick",
    [
        lambda ns: ns["Default"](),  # a method's default
        lambda ns: ns["Attribute"](),  # a class attribute
        lambda ns: ns["Calls"]().m,  # a bound method calling another method
        lambda ns: ns["Init"],  # a class as the node: its __init__'s default
        lambda ns: ns["made"](ns["Level"].LOW.value),  # a method's closure
        lambda ns: ns["with_lock"],  # a default holding a lock beside its value
        lambda ns: ns["level"],  # an enum member's value
        lambda ns: ns["with_config"],  # a frozen dataclass, a path
        lambda ns: ns["via_default"],  # a function given as a default, and its callees
        lambda ns: ns["via_tuple"],  # a function in a global tuple
        lambda ns: ns["Outer"](),  # a class nested in the node's class
        lambda ns: ns["Measured"](),  # its metaclass's methods
        lambda ns: ns["LooksLikePartial"](),  # func and keywords, yet no partial
        lambda ns: functools.partial(ns["apply"], fn=ns["helper"]),  # a function as data
    ],
    ids=[
        "method-default",
        "class-attribute",
        "bound-method",
        "class-init",
        "method-closure",
        "unpicklable-default",
        "enum",
        "frozen-dataclass-and-path",
        "function-default",
        "tuple-of-functions",
        "nested-class",
        "metaclass",
        "duck-typed-partial",
        "function-as-argument",
    ],
)
def test_an_edit_inside_a_class_or_object_is_seen(tmp_path: Path, pick) -> None:
    _resumed_is_fresh(
        tmp_path, pick(_source(_CLASSES.format(k=1))), pick(_source(_CLASSES.format(k=2))), [1, 2]
    )


def test_a_moved_positional_only_marker_is_seen(tmp_path: Path) -> None:
    # co_posonlyargcount was not part of a function's code: with k given by keyword, one
    # version fails and the other adds it.
    v1, v2 = (
        functools.partial(_source(f"def f(x, {sig}):\n    return x + k")["f"], k=5)
        for sig in ("k=1, /", "/, k=1")
    )
    _resumed_is_fresh(tmp_path, v1, v2, [1, 2])


def test_a_changed_function_attribute_is_seen(tmp_path: Path) -> None:
    v1, v2 = (_source(f"def f(x):\n    return x + f.k\nf.k = {k}")["f"] for k in (1, 2))
    _resumed_is_fresh(tmp_path, v1, v2, [1, 2])


def test_an_edit_under_stacked_decorators_is_seen(tmp_path: Path) -> None:
    # Past two closures deep a function was known as "deep": its body did not count.
    v1, v2 = (_source(_DECORATED.format(k=k))["f"] for k in (1, 2))
    _resumed_is_fresh(tmp_path, v1, v2, [1, 2])


_RECORD = """
class Rec:
    def __init__(self, w, h):
        self.w, self.h = w, h
    @property
    def area(self):
        return {area}
"""


def _name_of(fn: Any) -> str:
    return fn.__name__


def _type_and_value(x: Any) -> str:
    return f"{type(x).__name__}:{x!r}"


def test_items_are_told_apart_by_type_name_and_class_code(tmp_path: Path) -> None:
    # bytes and bytearray, set and frozenset shared an identity; two functions with the same
    # body were one item; an item's class's code was not part of it (an edited property).
    alpha = _source("def alpha(x):\n    return x + 1")["alpha"]
    beta = _source("def beta(x):\n    return x + 1")["beta"]
    _resumed_is_fresh(tmp_path, _type_and_value, _type_and_value, [b"ab"], [bytearray(b"ab")])
    _resumed_is_fresh(tmp_path, _type_and_value, _type_and_value, [{1, 2}], [frozenset({1, 2})])
    _resumed_is_fresh(tmp_path, _name_of, _name_of, [alpha], [beta])
    v1, v2 = (_source(_RECORD.format(area=a))["Rec"] for a in ("self.w * self.h", "self.w"))
    area = operator.attrgetter("area")
    _resumed_is_fresh(tmp_path, area, area, [v1(2, 3)], [v2(2, 3)])


def test_an_int_too_long_for_str_is_an_item_like_any_other(tmp_path: Path) -> None:
    # str() refuses ints above 4,300 digits: a journaled run over one failed as a whole.
    big = 10**5000 + 7
    _resumed_is_fresh(tmp_path, lambda x: x % 97, lambda x: x % 97, [big, 3])


_SEEDED = """
import collections, json, sys, types
import attrs, numpy
from papy import Pipeline, ThreadPool

Pair = collections.namedtuple("Pair", "tags n")

class Bag:
    def __init__(self, words):
        self.words = set(words)

BAG = Bag("the a of in on at to".split())
OPTIONS = types.SimpleNamespace(tags={"x", "y", "z", "w"})

@attrs.frozen
class Tagged:
    tags: frozenset

def bag(i):
    return {"a", "b", "c", "d", "e", str(i)}

MORE = [
    collections.defaultdict(set, {"tags": bag(1)}),
    collections.OrderedDict(tags=bag(2)),
    collections.deque([bag(3)]),
    numpy.array([bag(4), 1], dtype=object),
    Tagged(frozenset(bag(5))),
]

def count(item):
    return len(str(item)) + len(BAG.words)

items = [Pair(frozenset("abcdefghij"), 1), Pair(frozenset("klmnop"), 2), OPTIONS, *MORE]
pipe = Pipeline("seeded", pool=ThreadPool(2))
pipe.add(lambda x, bag=BAG: count(x) + len(bag.words), name="count")
with pipe.pool:
    outputs = pipe.map(items, journal=sys.argv[1])
    got = list(outputs)
print(json.dumps({"got": got, "skipped": outputs.report.skipped,
                  "changed": outputs.report.changed}))
"""


def test_sets_inside_objects_do_not_change_identity_with_the_hash_seed(tmp_path: Path) -> None:
    # Objects were known by their pickle, in which a set of strings follows the process's
    # hash seed: every new process recomputed every such item and node.
    script = tmp_path / "seeded.py"
    script.write_text(_SEEDED)
    results = []
    for seed in ("1", "2", "3"):
        results.append(_run_script(script, tmp_path / "run.db", PYTHONHASHSEED=seed))
    assert [r["skipped"] for r in results] == [0, 8, 8]
    assert [r["changed"] for r in results] == [{}, {}, {}]


# -- graph edits around sinks --------------------------------------------------------------


def _saved(log: Path) -> Any:
    def save(x: int) -> int:  # a sink with a side effect, as a database write is
        with open(log, "a") as fh:
            fh.write(f"{x}\n")
        return x * 10

    return save


def _runs(log: Path) -> list[str]:
    return sorted(log.read_text().split())


def test_a_sink_given_a_child_or_left_out_for_a_run_keeps_its_records(tmp_path: Path) -> None:
    # A sink that got a child node was recomputed for every item (its records were not
    # looked up: it was no longer a terminal), and a sink left out of one run lost its
    # records: put back unchanged, it repeated its side effect for every item.
    journal, log, notes = tmp_path / "run.db", tmp_path / "saved.txt", tmp_path / "notes.txt"
    log.write_text("")
    notes.write_text("")
    items = list(range(10))

    def run(child: bool, saving: bool = True) -> list[Any]:
        pipe = Pipeline("sinks", pool=ThreadPool(2))
        src = pipe.add(lambda x: x + 1, name="src")
        if saving:
            save = pipe.add(_saved(log), after=src, name="save")
            if child:
                pipe.add(_saved(notes), after=save, name="notify")
        out = pipe.add(lambda x: -x, after=src, name="out")
        with pipe.pool:
            return list(pipe.map(items, journal=journal, output=out.name))

    want = [-(x + 1) for x in items]
    assert run(child=False) == want
    assert run(child=True) == want  # notify runs; save is read back, not run again
    assert run(child=True, saving=False) == want  # save (and notify) left out
    assert run(child=True) == want  # back unchanged: nothing runs again
    assert _runs(log) == sorted(str(x + 1) for x in items)
    assert _runs(notes) == sorted(str((x + 1) * 10) for x in items)  # save's outputs, once


def test_a_mock_as_a_node_is_fingerprinted_at_once(tmp_path: Path) -> None:
    # A MagicMock answers every attribute: taken for a partial, it was followed 64 levels
    # deep and the journaled run spun for minutes before its first item.
    node = mock.MagicMock(return_value=7)
    pipe = Pipeline("mocked", pool=ThreadPool(2))
    pipe.add(node, name="f")
    with pipe.pool:
        assert list(pipe.map([1, 2], journal=tmp_path / "run.db")) == [7, 7]


# -- a search over item identities ---------------------------------------------------------


def _reference(v: Any) -> Any:
    """What tells two items apart, written plainly: the exact type at every level, floats
    by their bits, a dict's order, a set's members in any order."""
    t = type(v).__name__
    if isinstance(v, float):
        return (t, struct.pack("!d", v))
    if isinstance(v, int):
        return (t, format(v, "x"))
    if isinstance(v, (list, tuple)):
        return (t, [_reference(x) for x in v])
    if isinstance(v, dict):
        return (t, [(_reference(k), _reference(x)) for k, x in v.items()])
    if isinstance(v, (set, frozenset)):
        return (t, sorted(repr(_reference(x)) for x in v))
    if isinstance(v, (collections.OrderedDict, collections.deque)):
        return (t, _reference(list(v.items()) if isinstance(v, dict) else list(v)))
    return (t, v)


_hashable_leaves = (
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.integers(-1, 1).map(lambda k: k * 10**5000 + 7)  # too long for str()
    | st.floats(allow_nan=True)
    | st.text("ab", max_size=2)
    | st.binary(max_size=2)
)
_leaves = _hashable_leaves | st.binary(max_size=2).map(bytearray)
# No filter: sets of 20 items' worth of hashables, filtered, failed Hypothesis's
# filter_too_much health check on some seeds (3 inputs made, 50 filtered out).
_hashable = st.recursive(
    _hashable_leaves,
    lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
    max_leaves=4,
)
_items = st.recursive(
    _leaves,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text("ab", max_size=2), inner, max_size=2)
        | st.sets(_hashable, max_size=3)
        | st.frozensets(_hashable, max_size=3)
        | st.lists(inner, max_size=2).map(collections.deque)
        | st.dictionaries(st.text("ab", max_size=2), inner, max_size=2).map(collections.OrderedDict)
    ),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(a=_items, b=_items)
def test_two_items_share_an_identity_only_when_nothing_tells_them_apart(a: Any, b: Any) -> None:
    same = repr(_reference(a)) == repr(_reference(b))
    assert (content_digest(a) == content_digest(b)) == same, (a, b)


_DIGESTS = """
import pickle, sys
from papy._journal.digest import content_digest
print("\\n".join(content_digest(v) for v in pickle.loads(sys.stdin.buffer.read())))
"""


# 20 items with sets of unique members: Hypothesis discards draws with duplicates
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(items=st.lists(_items, min_size=20, max_size=20))
def test_an_items_identity_is_the_same_in_every_process(items: list[Any]) -> None:
    # Sets deep inside items were encoded in the hash seed's order by some paths.
    here = [content_digest(v) for v in items]
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run(
            [sys.executable, "-c", _DIGESTS],
            input=pickle.dumps(items),
            env=env,
            capture_output=True,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.decode().split() == here
