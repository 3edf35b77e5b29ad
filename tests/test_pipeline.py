"""Building and running graphs: chains, forks, joins, scatter/gather, order, errors."""

from __future__ import annotations

import itertools
from concurrent.futures import Future

import pytest
from helpers import add, add3, double, explode, fail_on_7, inc, minus3

from papy import (
    Failure,
    InlinePool,
    ItemFailed,
    Pipeline,
    ProcessPool,
    ThreadPool,
    imap,
)
from papy._task import TaskResult


def test_chain_gives_composed_result_in_input_order(pool):
    pipe = Pipeline("chain", pool=pool)
    a = pipe.add(inc)
    b = pipe.add(double, after=a)
    pipe.add(minus3, after=b)
    assert list(pipe.map(range(1000))) == [(x + 1) * 2 - 3 for x in range(1000)]


def test_join_of_two_parents_pairs_by_item(pool):
    pipe = Pipeline("join", pool=pool)
    a = pipe.add(inc)
    b = pipe.add(double, after=a)
    c = pipe.add(minus3, after=a)
    pipe.add(add, after=[b, c])
    assert list(pipe.map(range(500))) == [(x + 1) * 2 + (x + 1) - 3 for x in range(500)]


def test_join_of_three_parents_calls_in_after_order(pool):
    pipe = Pipeline("join3", pool=pool)
    a = pipe.add(inc)
    b = pipe.add(double)
    c = pipe.add(minus3)
    pipe.add(add3, after=[c, a, b])
    assert list(pipe.map(range(100))) == [(x - 3, x + 1, 2 * x) for x in range(100)]


def test_skip_edge_does_not_deadlock_with_small_buffer(pool):
    # A -> B -> J and A -> J: PaPy 1 deadlocked on this shape.
    pipe = Pipeline("skip", pool=pool, buffer=3)
    a = pipe.add(inc)
    b = pipe.add(double, after=a, batch=2)
    pipe.add(add, after=[a, b])
    assert list(pipe.map(range(300))) == [(x + 1) + 2 * (x + 1) for x in range(300)]


def test_diamond_joins_two_branches_of_one_fork():
    pipe = Pipeline("diamond", pool=ThreadPool(3))
    top = pipe.add(inc)
    left = pipe.add(double, after=top)
    right = pipe.add(lambda v: -v, after=top, name="neg")
    pipe.add(add, after=[left, right])
    assert list(pipe.map(range(200))) == [x + 1 for x in range(200)]


def test_several_sources_each_get_every_input():
    pipe = Pipeline("sources", pool=InlinePool())
    a = pipe.add(inc)
    b = pipe.add(double)
    pipe.add(add, after=[a, b])
    assert list(pipe.map(range(50))) == [3 * x + 1 for x in range(50)]


def test_fork_to_two_sinks_with_output_named():
    pipe = Pipeline("fork", pool=ThreadPool(2))
    a = pipe.add(inc)
    pipe.add(double, after=a, name="twice")
    pipe.add(minus3, after=a, name="less")
    assert list(pipe.map(range(10), output="less")) == [x - 2 for x in range(10)]
    assert list(pipe.map(range(10), output="twice")) == [2 * x + 2 for x in range(10)]
    report = pipe.run(range(10))
    assert report.nodes["twice"].items_in == 10
    assert report.nodes["less"].items_in == 10


def test_output_may_be_an_inner_node():
    pipe = Pipeline("inner", pool=InlinePool())
    a = pipe.add(inc)
    pipe.add(double, after=a)
    assert list(pipe.map(range(5), output=a)) == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("kind", ["inline", "thread", "process"])
@pytest.mark.parametrize("batch,buffer", [(1, 1), (3, 7), (64, 10_000), (None, None)])
def test_results_do_not_depend_on_batch_buffer_or_pool(kind, batch, buffer):
    pools = {
        "inline": InlinePool,
        "thread": lambda: ThreadPool(3),
        "process": lambda: ProcessPool(2),
    }
    with pools[kind]() as pool:
        pipe = Pipeline("same", pool=pool, buffer=buffer)
        a = pipe.add(inc, batch=batch)
        s = pipe.add(explode, after=a, scatter=True, batch=batch)
        sq = pipe.add(double, after=s, batch=batch)
        g = pipe.add(sum, after=sq, gather=True, batch=batch)
        c = pipe.add(minus3, after=a, batch=batch)
        pipe.add(add, after=[g, c], batch=batch)
        got = list(pipe.map(range(60)))
    want = [2 * sum(range(x + 1)) + x - 2 for x in range(60)]
    assert got == want


def test_scatter_gather_keeps_scatter_order(pool):
    pipe = Pipeline("sg", pool=pool)
    s = pipe.add(explode, scatter=True)
    d = pipe.add(double, after=s)
    pipe.add(list, after=d, gather=True, name="collect")
    assert list(pipe.map([3, 0, 5])) == [[0, 2, 4], [], [0, 2, 4, 6, 8]]


def test_empty_scatter_gathers_to_empty_list():
    pipe = Pipeline("empty", pool=ThreadPool(2))
    s = pipe.add(lambda x: [], scatter=True, name="nothing")
    i = pipe.add(inc, after=s)
    pipe.add(lambda xs: xs, after=i, gather=True, name="g")
    assert list(pipe.map(range(4))) == [[], [], [], []]


def test_nested_scatter_gathers_inner_then_outer(pool):
    pipe = Pipeline("nested", pool=pool)
    outer = pipe.add(explode, scatter=True, name="outer")
    inner = pipe.add(explode, after=outer, scatter=True, name="inner")
    d = pipe.add(inc, after=inner)
    gi = pipe.add(list, after=d, gather=True, name="gi")
    pipe.add(list, after=gi, gather=True, name="go")
    want = [[[j + 1 for j in range(i)] for i in range(x)] for x in range(6)]
    assert list(pipe.map(range(6))) == want


def test_ungathered_scatter_yields_sub_items_flattened_in_order(pool):
    pipe = Pipeline("flat", pool=pool, buffer=4)
    s = pipe.add(explode, scatter=True)
    pipe.add(inc, after=s)
    items = [3, 0, 2, 4, 1]
    assert list(pipe.map(items)) == [j + 1 for x in items for j in range(x)]


def test_unordered_output_has_every_item_once():
    def slow_for_small(x):
        import time

        time.sleep(0.05 if x < 3 else 0)
        return x

    pipe = Pipeline("unordered", pool=ThreadPool(4))
    pipe.add(slow_for_small, ordered=False, batch=1)
    out = list(pipe.map(range(20)))
    assert sorted(out) == list(range(20))
    assert out != list(range(20))  # the slow first items were overtaken


def test_composed_functions_with_args_and_kwargs(pool):
    def scale(x, factor, offset=0):
        return x * factor + offset

    pipe = Pipeline("compose", pool=pool)
    pipe.add([inc, scale], args=(10,), kwargs={"offset": 0})
    # each function gets the extras: inc(x, 10) would fail, so use per-function form
    pipe2 = Pipeline("compose2", pool=pool)
    pipe2.add([inc, scale, str], args=[(), (10,), ()], kwargs=[{}, {"offset": 1}, {}])
    assert list(pipe2.map(range(4))) == ["11", "21", "31", "41"]
    pipe3 = Pipeline("compose3", pool=pool)
    pipe3.add(scale, args=(3,), kwargs={"offset": 2})
    assert list(pipe3.map(range(4))) == [2, 5, 8, 11]


def test_lambdas_and_closures_run_in_processes(process_pool):
    k = 7

    def closure(x):
        return x + k

    pipe = Pipeline("closures", pool=process_pool)
    a = pipe.add(lambda x: x * 3, name="triple")
    pipe.add(closure, after=a)
    assert list(pipe.map(range(5))) == [x * 3 + 7 for x in range(5)]


def test_default_pool_is_a_process_pool_closed_after_the_run():
    import multiprocessing

    pipe = Pipeline("default")
    pipe.add(inc)
    assert list(pipe.map(range(10))) == list(range(1, 11))
    assert pipe.last_report is not None
    assert pipe.last_report.nodes["inc"].pool.startswith("process")
    alive = [c for c in multiprocessing.active_children() if c.name == "papy-worker"]
    for c in alive:
        c.join(timeout=3)
    assert not [c for c in alive if c.is_alive()]


def test_user_pool_is_reused_across_runs_and_left_open():
    with ThreadPool(2) as pool:
        pipe = Pipeline("reuse", pool=pool)
        pipe.add(inc)
        assert list(pipe.map(range(3))) == [1, 2, 3]
        assert list(pipe.map(range(3))) == [1, 2, 3]
        assert not pool.closed
    assert pool.closed


def test_names_default_to_function_names_made_unique():
    pipe = Pipeline("names", pool=InlinePool())
    a = pipe.add(inc)
    b = pipe.add(inc, after=a)
    c = pipe.add([inc, double], after=b)
    assert (a.name, b.name, c.name) == ("inc", "inc_2", "inc+double")


def test_failures_in_each_error_mode(pool):
    pipe = Pipeline("fail", pool=pool)
    a = pipe.add(fail_on_7)
    pipe.add(inc, after=a)
    out = list(pipe.map(range(30), errors="yield"))
    failures = [o for o in out if isinstance(o, Failure)]
    assert [f.item for f in failures] == [7, 17, 27]
    assert all(f.node == "fail_on_7" and f.exc_type == "ValueError" for f in failures)
    assert "bad item 17" in failures[1].message
    assert "fail_on_7" in failures[1].traceback
    assert [o for o in out if not isinstance(o, Failure)] == [
        x + 1 for x in range(30) if x % 10 != 7
    ]
    assert list(pipe.map(range(30), errors="skip")) == [x + 1 for x in range(30) if x % 10 != 7]
    got = []
    with pytest.raises(ItemFailed) as info:
        for o in pipe.map(range(30), errors="raise"):
            got.append(o)
    assert got == [1, 2, 3, 4, 5, 6, 7]  # everything before item 7, then the error
    assert info.value.failure.item == 7
    assert "fail_on_7" in str(info.value) and "7" in str(info.value)


def test_failure_skips_downstream_and_joins_report_it_once():
    pipe = Pipeline("failjoin", pool=ThreadPool(2))
    a = pipe.add(fail_on_7)
    b = pipe.add(double, after=a)
    pipe.add(add, after=[a, b])
    out = list(pipe.map(range(10), errors="yield"))
    assert isinstance(out[7], Failure) and out[7].node == "fail_on_7"
    assert out[:7] == [3 * x for x in range(7)]
    report = pipe.last_report
    assert report is not None and report.failed == 1
    assert report.nodes["fail_on_7"].failed == 1
    assert report.nodes["double"].failed == 0


def test_run_returns_report_with_counts():
    pipe = Pipeline("report", pool=ThreadPool(2))
    a = pipe.add(inc)
    s = pipe.add(explode, after=a, scatter=True)
    pipe.add(double, after=s)
    report = pipe.run(range(10))
    assert report.items == 10
    assert report.nodes["inc"].items_in == 10
    assert report.nodes["explode"].items_out == sum(range(1, 11))
    assert report.nodes["double"].items_in == sum(range(1, 11))
    assert "inc" in report.table()


def test_imap_shortcut(process_pool):
    assert list(imap(inc, range(100), pool=process_pool, batch=7, buffer=20)) == list(range(1, 101))
    assert sorted(imap(inc, range(50), pool=process_pool, ordered=False)) == list(range(1, 51))


def test_map_is_lazy_and_pulls_input_only_while_buffer_has_room():
    pulled = []

    def source():
        for i in itertools.count():
            pulled.append(i)
            yield i

    pipe = Pipeline("lazy", pool=InlinePool(), buffer=10)
    pipe.add(inc)
    it = pipe.map(source())
    assert next(it) == 1
    assert len(pulled) <= 11
    it.close()


def test_batched_node_gets_lists_and_keeps_identity(pool):
    def scale_all(xs):
        return [x * 10 for x in xs]

    pipe = Pipeline("batched", pool=pool)
    a = pipe.add(scale_all, batched=True, batch=8)
    b = pipe.add(inc, after=a)
    pipe.add(add, after=[a, b])
    assert list(pipe.map(range(30))) == [20 * x + 1 for x in range(30)]


class _Big:
    """Stands for a large intermediate value (reports 1 MiB to sys.getsizeof)."""

    alive = 0
    peak = 0

    def __init__(self, x):
        self.x = x
        cls = type(self)  # each subclass counts its own instances
        cls.alive += 1
        cls.peak = max(cls.peak, cls.alive)

    def __del__(self):
        type(self).alive -= 1

    def __sizeof__(self):
        return 2**20


def test_fused_chain_does_not_hold_a_whole_batch_of_large_intermediates():
    pipe = Pipeline("slices", pool=InlinePool())
    a = pipe.add(_Big, batch=400, name="make")
    pipe.add(lambda big: big.x, after=a, name="reduce")
    assert list(pipe.map(range(400))) == list(range(400))
    assert _Big.peak <= 16  # a batch of 400 would have held 400 MiB at once


def test_report_says_where_driver_time_goes(process_pool):
    pipe = Pipeline("profile", pool=process_pool)
    pipe.add(inc)
    report = pipe.run(range(5000), profile=True)
    assert {"admit", "dispatch", "wait", "route", "deliver", "pickle", "unpickle"} <= set(
        report.driver
    )
    assert all(v >= 0 for v in report.driver.values())
    assert report.driver["pickle"] > 0 and "driver time:" in report.table()


@pytest.mark.parametrize("method", ["spawn", "forkserver", "fork"])
def test_process_pool_start_methods(method):
    k = 3
    with ProcessPool(2, start_method=method) as pool:
        pipe = Pipeline("methods", pool=pool)
        a = pipe.add(lambda x: x + k, name="add")
        pipe.add(str, after=a)
        assert list(pipe.map(range(5))) == ["3", "4", "5", "6", "7"]


def test_join_of_sub_items_inside_a_scatter(pool):
    pipe = Pipeline("subjoin", pool=pool)
    s = pipe.add(explode, scatter=True, name="s")
    a = pipe.add(double, after=s, name="a")
    b = pipe.add(inc, after=s, name="b")
    j = pipe.add(add, after=[a, b], name="j")
    pipe.add(list, after=j, gather=True, name="g")
    assert list(pipe.map([3, 0, 2])) == [[1, 4, 7], [], [1, 4]]
    assert list(pipe.map([2, 3], output="s")) == [0, 1, 0, 1, 2]


def test_empty_input_and_none_items(pool):
    pipe = Pipeline("edge", pool=pool)
    pipe.add(lambda x: x, name="same")
    assert list(pipe.map([])) == []
    assert pipe.run([]).items == 0
    assert list(pipe.map([None, 0, None])) == [None, 0, None]


def test_an_input_iterator_that_raises_propagates_after_cleanup():
    def broken():
        yield 1
        yield 2
        raise RuntimeError("input broke")

    pipe = Pipeline("broken-input")  # its own process pool, closed on the error
    pipe.add(inc)
    with pytest.raises(RuntimeError, match="input broke"):
        list(pipe.map(broken()))


def test_library_prints_nothing_without_logging_configured(capfd):
    pipe = Pipeline("quiet", pool=ThreadPool(1))
    pipe.add(inc)
    with pytest.raises(RuntimeError):
        list(pipe.map(_raise_after(2)))
    assert capfd.readouterr().err == ""


def _raise_after(n):
    yield from range(n)
    raise RuntimeError("stop")


def test_map_returns_an_iterator_with_the_report_and_close():
    pipe = Pipeline("iter", pool=ThreadPool(2))
    pipe.add(inc)
    it = pipe.map(range(10))
    assert it.report is None
    assert next(it) == 1
    assert list(it) == list(range(2, 11))
    assert it.report is not None and it.report.items == 10
    stopped = pipe.map(itertools.count())
    assert next(stopped) == 1
    stopped.close()
    stopped.close()  # idempotent
    assert stopped.report is not None
    with pipe.map(range(3)) as ctx:
        assert list(ctx) == [1, 2, 3]


class _DropsOne(ThreadPool):
    """A broken custom pool: its results miss the last value of every task."""

    def _submit(self, task):  # type: ignore[no-untyped-def]
        inner = super()._submit(task)
        out: Future = Future()

        def drop(f: Future) -> None:
            r = f.result()
            out.set_result(TaskResult(r.values[:-1], r.stats, dirty=True))

        inner.add_done_callback(drop)
        return out


def test_a_pool_returning_the_wrong_number_of_results_fails_the_task_and_names_it():
    with _DropsOne(2) as pool:
        pipe = Pipeline("miscount", pool=pool)
        pipe.add(inc, name="plus_one", batch=4)
        out = list(pipe.map(range(8), errors="yield", progress=False))
    assert len(out) == 8  # none trusted, none lost
    assert all(isinstance(o, Failure) for o in out), out
    assert [o.item for o in out] == list(range(8))
    for o in out:
        assert o.node == "plus_one" and o.exc_type == "papy.PoolError"
        assert "returned 3 results for 4 items" in o.message
        assert o.input_repr == ""  # the outputs are not trusted, and the inputs not held


class _BadSize:
    """An output whose size cannot be told: ``__sizeof__`` and ``nbytes`` raise."""

    def __init__(self, x):
        self.x = x

    def __sizeof__(self):
        raise RuntimeError("no size")

    @property
    def nbytes(self):
        raise RuntimeError("no size")


class _Growing(_Big):
    """Small for the first item of a batch, 1 MiB to sys.getsizeof for the others."""

    alive = 0
    peak = 0

    def __sizeof__(self):
        return 16 if self.x % 100 == 0 else 2**20


@pytest.mark.parametrize("kind", ["inline", "thread"])
def test_an_output_that_cannot_tell_its_size_fails_nothing(kind):
    pool = InlinePool() if kind == "inline" else ThreadPool(2)
    with pool:
        pipe = Pipeline("badsize", pool=pool)
        a = pipe.add(_BadSize, batch=3, name="make")
        pipe.add(lambda v: v.x, after=a, name="read")
        assert list(pipe.map(range(10), errors="yield")) == list(range(10))


def test_fused_chain_catches_items_that_grow_within_a_batch():
    _Growing.peak = 0
    pipe = Pipeline("growing", pool=InlinePool())
    a = pipe.add(_Growing, batch=100, name="make")
    pipe.add(lambda g: g.x, after=a, name="reduce")
    assert list(pipe.map(range(100))) == list(range(100))
    assert _Growing.peak <= 4  # the first item was small; the rest are 1 MiB each
