"""The shape of the code: layers without cycles, small modules, an immutable plan, and a
teardown in which one failing release does not skip the others."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import grimp
import pytest

import papy
from papy import Pipeline, ThreadPool
from papy._items import ItemState
from papy._plan import compile_plan
from papy._scheduler import Scheduler

PACKAGE = Path(papy.__file__).parent
MAX_LINES = 500


def test_no_module_is_over_500_lines() -> None:
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}


def test_no_import_cycle_among_papy_modules() -> None:
    """Every import, type-only and function-level ones included, points one way."""
    graph = grimp.build_graph("papy", include_external_packages=False)
    modules = sorted(graph.modules)
    cycles = []
    for m in modules:
        for imported in graph.find_modules_directly_imported_by(m):
            if imported == m or m.startswith(imported + "."):
                continue  # a module's own package __init__ is not a cycle through code
            back = graph.find_shortest_chain(importer=imported, imported=m)
            if back is not None and not any(
                m.startswith(x + ".") or x == "papy" for x in back[1:-1]
            ):
                cycles.append((m, *back))
    assert cycles == []


def _pipeline() -> Pipeline:
    pipe = Pipeline("shape", pool=ThreadPool(2))
    a = pipe.add(lambda x: x + 1, name="a")
    s = pipe.add(lambda x: [x, x], name="s", after=a, scatter=True)
    b = pipe.add(lambda x: x * 2, name="b", after=s)
    pipe.add(sum, name="g", after=b, gather=True)
    return pipe


def test_the_plan_cannot_be_changed() -> None:
    pipe = _pipeline()
    pools = {n.name: pipe.pool for n in pipe.nodes}
    plan = compile_plan(pipe, pools)  # type: ignore[arg-type]
    assert [s.name for s in plan.steps] == ["a+s", "b", "g"]  # a scatter ends a step
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.steps[0].pool = ThreadPool(1)  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.steps[0].spec.stages = ()  # type: ignore[misc]
    with pytest.raises(TypeError):
        plan.gathers_of["s"] = ()  # type: ignore[index]
    assert plan.gathers_of == {"s": (2,)}
    assert [t.node.name for t in plan.terminals] == ["g"]
    pipe.pool.close()


def test_a_finished_run_has_every_item_retired_and_none_elsewhere() -> None:
    pipe = _pipeline()
    sched = Scheduler(pipe, output=pipe.node("g"), errors="raise")
    assert list(sched.iterate(range(50))) == [4 * (x + 1) for x in range(50)]
    counts = sched.counts()
    assert counts.pop(ItemState.RETIRED) == 50
    assert set(counts.values()) == {0}
    assert set(counts) == set(ItemState) - {ItemState.RETIRED}
    pipe.pool.close()


class _ReleaseFails(ThreadPool):
    """A user's pool whose release() raises, as a broken custom pool would."""

    def release(self, spec_ids: object) -> None:
        raise OSError("release failed on purpose")


def test_a_failing_release_skips_no_other_release(tmp_path: Path) -> None:
    pool = _ReleaseFails(2)
    pipe = Pipeline("teardown", pool=pool)
    pipe.add(lambda x: x * 3, name="triple")
    journal = tmp_path / "run.db"
    before = set(os.listdir(os.environ.get("TMPDIR", "/tmp")))
    with pytest.raises(OSError, match="release failed on purpose"):
        pipe.run(range(20), journal=journal)
    # The report was still made, the run directory removed, and the journal closed: a
    # second run can take the journal's lock and finds every item done.
    assert pipe.last_report is not None and pipe.last_report.items == 20
    left = {p for p in set(os.listdir(os.environ.get("TMPDIR", "/tmp"))) - before}
    assert not [p for p in left if p.startswith("papy-run-")]
    pipe2 = Pipeline("teardown", pool=ThreadPool(2))
    pipe2.add(lambda x: x * 3, name="triple")
    report = pipe2.run(range(20), journal=journal)
    assert report.skipped == 20
    pool.close()
    pipe2.pool.close()


def test_an_observer_failing_at_the_end_does_not_keep_the_others_from_ending() -> None:
    from papy._observe import Observer

    ended: list[str] = []

    class Broken(Observer):
        def finished(self, sched: object, error: BaseException | None) -> None:
            ended.append("broken")
            raise RuntimeError("observer failed on purpose")

    class Counting(Observer):
        def finished(self, sched: object, error: BaseException | None) -> None:
            ended.append("counting")

    pipe = Pipeline("observers", pool=ThreadPool(1))
    node = pipe.add(abs)
    sched = Scheduler(pipe, output=node, errors="raise", observers=[Broken(), Counting()])
    with pytest.raises(RuntimeError, match="on purpose"):
        list(sched.iterate([-1, -2]))
    assert ended == ["broken", "counting"]
    pipe.pool.close()
