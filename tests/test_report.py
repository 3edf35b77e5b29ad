"""The Report's numbers, the bottleneck, drawings and the HTML report in a real browser."""

from __future__ import annotations

import json
import time

import pytest
from browser import count_color, non_white, screenshot
from helpers import inc

from papy import Pipeline, ThreadPool


def quick(x):
    time.sleep(0.001)
    return x


def slow(x):
    time.sleep(0.02)
    return x


def _known_costs() -> Pipeline:
    pool = ThreadPool(2)
    pipe = Pipeline("known", pool=pool)
    a = pipe.add(quick, batch=1)
    b = pipe.add(slow, after=a, batch=1)
    pipe.add(quick, after=b, name="quick_after", batch=1)
    return pipe


def test_report_numbers_match_known_costs_and_name_the_bottleneck():
    pipe = _known_costs()
    report = pipe.run(range(60), progress=False)
    s = report.nodes["slow"]
    assert s.items_in == s.items_out == 60 and s.failed == 0
    assert 0.019 <= s.mean_item_s <= 0.05
    assert 0.019 <= s.p95_item_s <= 0.08
    assert 60 * 0.019 <= s.busy_s <= 60 * 0.06
    assert report.nodes["quick"].mean_item_s < 0.01
    assert report.bottleneck == "slow"
    assert "node 'slow' limits throughput" in report.suggestion
    # 60 x 20 ms on a pool of 2 threads cannot take less than 0.6 s.
    assert report.wall_s >= 0.6
    assert 0 < s.throughput <= 60 / 0.6
    data = json.loads(report.to_json())
    assert data["bottleneck"] == "slow" and data["nodes"]["slow"]["items_in"] == 60
    text = report.table()
    assert "slow *" in text and "limits throughput" in text
    assert report.timeline and max(t.get("slow", 0) for t in report.timeline) >= 1


def test_report_is_available_after_map():
    pipe = Pipeline("after-map", pool=ThreadPool(2))
    pipe.add(inc)
    assert list(pipe.map(range(10))) == list(range(1, 11))
    assert pipe.last_report is not None and pipe.last_report.items == 10


def test_mermaid_and_dot_show_pool_batch_and_scatter_gather():
    pipe = Pipeline("draw", pool=ThreadPool(3))
    a = pipe.add(inc, batch=8)
    s = pipe.add(list, after=a, scatter=True, name="split")
    g = pipe.add(sum, after=s, gather=True, name="total")
    pipe.add(lambda x, y: x + y, after=[a, g], name="join")
    mermaid = pipe.to_mermaid()
    assert mermaid.startswith("flowchart TD")
    for word in ("inc", "split", "total", "join", "threadx3", "batch 8", "scatter", "gather"):
        assert word in mermaid
    assert mermaid.count("-->") == 4
    dot = pipe.to_dot()
    assert dot.startswith('digraph "draw"') and dot.count("->") == 4
    assert "batch auto" in dot and "scatter" in dot


def test_draw_svg_renders_in_headless_chromium(tmp_path):
    pipe = _known_costs()
    svg = pipe.draw(tmp_path / "graph.svg")
    text = svg.read_text()
    for name in ("quick", "slow", "quick_after"):
        assert f">{name}<" in text
    img = screenshot(svg, tmp_path / "graph.png", size=(600, 600))
    assert non_white(img) > 1000
    assert count_color(img, (0xEE, 0xF4, 0xFF), tolerance=6) > 500  # the node fill


def test_missing_graphviz_gives_a_clear_message(tmp_path, monkeypatch):
    from papy import PapyError

    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(PapyError, match="Graphviz 'dot' was not found"):
        _known_costs().draw(tmp_path / "g.svg")


def test_html_report_renders_the_timeline_in_headless_chromium(tmp_path):
    pipe = _known_costs()
    pipe.run(range(60), report=tmp_path / "run.html", progress=False)
    page = tmp_path / "run.html"
    html = page.read_text()
    assert "<script" not in html and "http" not in html.split("<svg", 1)[0]  # offline
    for name in ("quick", "slow", "quick_after"):
        assert name in html
    img = screenshot(page, tmp_path / "run.png")
    assert non_white(img) > 20_000
    # The timeline draws one line per node in its own colour: blue, red, green.
    assert count_color(img, (0x1F, 0x77, 0xB4)) > 100
    assert count_color(img, (0xD6, 0x27, 0x28)) > 100
    assert count_color(img, (0xFF, 0xE9, 0xE9), tolerance=6) > 200  # bottleneck row


def test_an_idle_pipeline_is_not_blamed_on_a_node():
    pipe = Pipeline("idle", pool=ThreadPool(4))
    pipe.add(inc)

    def slow_source():
        for i in range(20):
            time.sleep(0.01)
            yield i

    report = pipe.run(slow_source(), progress=False)
    assert report.bottleneck == "inc"
    assert "only" in report.suggestion and "waits on its input" in report.suggestion


def knn(x):
    if x % 3 == 0:
        raise ValueError(f"no neighbours for {x}")
    if x % 3 == 1 and x > 600:
        raise KeyError(x)
    return x


def _failing_run(tmp_path, pool):
    pipe = Pipeline("failing", pool=pool)
    pipe.add(knn)
    return pipe, pipe.run(range(900), report=tmp_path / "run.html", progress=False)


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_report_keeps_the_first_100_failures_and_counts_them_all(tmp_path, kind):
    from conftest import make_pool

    from papy import Failure

    with make_pool(kind) as pool:
        _, report = _failing_run(tmp_path, pool)
    assert report.failed == 300 + 100
    assert len(report.failures) == 100
    assert all(isinstance(f, Failure) and f.node == "knn" for f in report.failures)
    f = next(f for f in report.failures if f.exc_type == "ValueError")
    assert f.message == f"no neighbours for {f.item}" and f.input_repr == repr(f.item)
    # The traceback names this file and the line that raised, even from another process.
    assert f'{__file__}", line' in f.traceback and 'raise ValueError(f"no neighbours' in (
        f.traceback
    )
    assert report.failure_counts == {"knn": {"ValueError": 300, "KeyError": 100}}
    groups = report.failure_groups()
    assert [(g[0], g[1], g[2]) for g in groups] == [
        ("knn", "ValueError", 300),
        ("knn", "KeyError", 100),
    ]
    data = json.loads(report.to_json())
    assert len(data["failures"]) == 100
    first = data["failures"][0]
    assert set(first) >= {"node", "item", "input_repr", "exc_type", "message", "traceback"}
    assert data["failure_counts"]["knn"]["KeyError"] == 100
    assert report.to_dict()["failures"][0]["node"] == "knn"


def test_html_failures_section_is_grouped_and_visible_in_chromium(tmp_path):
    with ThreadPool(2) as pool:
        _failing_run(tmp_path, pool)
    page = tmp_path / "run.html"
    html = page.read_text()
    assert "<h2>Failures</h2>" in html
    assert 'ValueError <span class="count">&times; 300</span>' in html
    assert 'KeyError <span class="count">&times; 100</span>' in html
    assert html.count("class='traceback'") == 2  # the first traceback of each group
    assert "raise ValueError(f&quot;no neighbours" in html
    img = screenshot(page, tmp_path / "run.png", size=(1280, 1000))
    # The section's blocks (light red with a red bar) are in the first screen.
    assert count_color(img, (0xFD, 0xEC, 0xEA), tolerance=6) > 20_000
    assert count_color(img, (0xD9, 0x53, 0x4F), tolerance=12) > 500


def test_html_graph_marks_the_bottleneck_not_the_source(tmp_path):
    pipe = _known_costs()
    report = pipe.run(range(60), report=tmp_path / "run.html", progress=False)
    assert report.bottleneck == "slow"
    html = (tmp_path / "run.html").read_text()
    graph = html.split('<div class="graph">', 1)[1].split("</div>", 1)[0]
    assert graph.count("#c00000") == 1 and ">bottleneck<" in graph
    marked = graph.split("#c00000")[0].rsplit("<g id=", 1)[1]
    assert "<title>n1_slow</title>" in marked  # the marked node is 'slow', not the source
    assert graph.count("#ffd6d6") == 1
    img = screenshot(tmp_path / "run.html", tmp_path / "run.png")
    assert count_color(img, (0xFF, 0xD6, 0xD6), tolerance=6) > 500  # the marked node's fill


def test_util_means_the_same_in_table_sentence_and_html(tmp_path):
    from papy._report import UTIL_MEANING

    pipe = _known_costs()
    report = pipe.run(range(60), report=tmp_path / "run.html", progress=False)
    util = f"{report.nodes['slow'].utilization:.0%}"
    assert f"util {util}" in report.suggestion
    assert UTIL_MEANING in report.table(width=200)
    html = (tmp_path / "run.html").read_text()
    from html import escape

    assert escape(UTIL_MEANING) in html and f"<td>{util}</td>" in html


def test_table_fits_the_width_it_is_given():
    pipe = _known_costs()
    report = pipe.run(range(60), progress=False)
    for width in (60, 80, 120):
        text = report.table(width=width)
        assert max(len(line) for line in text.splitlines()) <= width
        assert "quick_after" in text and "util" in text
    assert "wait room s" in report.table(width=200)
    assert "not shown for width: wait room s" in report.table(width=80)


def test_item_failed_points_at_the_users_line(process_pool):
    import traceback

    from papy import ItemFailed

    pipe = Pipeline("raise", pool=process_pool)
    pipe.add(knn)
    with pytest.raises(ItemFailed) as info:
        list(pipe.map(range(1, 10)))
    exc = info.value
    assert exc.failure.item == 2  # input 3
    text = "".join(traceback.format_exception(exc))
    assert 'raise ValueError(f"no neighbours for {x}")' in text
    assert f'File "{__file__}"' in text
    assert isinstance(exc.__cause__, ValueError)
    assert f"(at {__file__}:" in str(exc) and "in knn)" in str(exc)


def test_live_rate_is_a_sliding_window_and_never_0_for_a_moving_node():
    from papy._progress import SlidingRate

    r = SlidingRate(0.0, window=5.0)
    assert r.rate(0, 1.0) == 0.0  # nothing done yet
    for t in range(1, 11):  # 100 items/s for 10 s
        assert r.rate(100 * t, float(t)) == pytest.approx(100.0)
    # The node slows to one item every 10 s: the window follows, and between two
    # completions the rate decays instead of dropping to 0.
    seen = []
    done = 1000
    for t in range(11, 60):
        if t % 10 == 0:
            done += 1
        seen.append(r.rate(done, float(t)))
    assert all(x > 0 for x in seen)
    assert seen[-1] < 1.0  # the old burst has left the window
    from papy._progress import _rate_text

    assert _rate_text(0.04) == "0.04" and _rate_text(0.5) == "0.5" and _rate_text(0) == "0"


def test_live_table_in_a_real_run_shows_a_nonzero_rate_for_a_slow_node():
    import io

    from rich.console import Console

    from papy._progress import Progress
    from papy._scheduler import Scheduler

    console = Console(file=io.StringIO(), width=120, force_terminal=False)
    progress = Progress(console=console, refresh_per_second=20)
    pipe = Pipeline("live", pool=ThreadPool(1))
    node = pipe.add(slow, batch=1)  # 20 ms per item, one at a time
    sched = Scheduler(pipe, output=node, errors="raise", observers=[progress])
    rates = []
    for i, _ in enumerate(sched.iterate(range(40))):
        if i >= 5:
            row = [str(c) for c in progress._render().columns[5].cells]
            rates.append(float(row[0].replace(",", "")))
    assert rates and all(r > 0 for r in rates)


def test_the_failure_that_aborted_a_run_is_in_its_report():
    from papy import RunAborted

    pipe = Pipeline("abort", pool=ThreadPool(2))
    pipe.add(knn, on_error="raise")
    with pytest.raises(RunAborted) as info:
        pipe.run([1, 2, 3, 4])
    assert isinstance(info.value.__cause__, ValueError)
    report = pipe.last_report
    assert report is not None
    assert [(f.node, f.item, f.exc_type) for f in report.failures] == [("knn", 2, "ValueError")]
    assert report.failure_counts == {"knn": {"ValueError": 1}}
    pipe.pool.close()


def _fail_0_and_1(x: int) -> int:
    if x < 2:
        raise ValueError(f"bad {x}")
    return x


def test_failed_counts_input_items_once_whatever_sinks_and_sub_items_they_fail_in():
    with ThreadPool(2) as pool:
        pipe = Pipeline("sinks", pool=pool)
        src = pipe.add(_fail_0_and_1, name="src")
        for name in ("s1", "s2", "s3"):  # three sinks get each Failure
            pipe.add(lambda x: x, after=src, name=name)
        report = pipe.run(range(4))
        assert (report.items, report.failed) == (4, 2)
        assert "4 items" in report.table() and "2 failed" in report.table()

        pipe = Pipeline("subs", pool=pool)
        split = pipe.add(lambda x: [x, x + 1, x + 2], scatter=True, name="split")
        pipe.add(_fail_0_and_1, after=split, name="sub")  # item 0: 2 sub-items fail
        report = pipe.run(range(3))
        assert report.nodes["sub"].failed == 3  # sub-items 0, 1 of item 0; 0 of item 1
        assert (report.items, report.failed) == (3, 2)


def _sub_fails(s: int) -> int:
    if s == 10:
        raise ValueError("v10")
    if s == 11:
        raise KeyError("k11")
    return s


def test_every_failure_group_has_its_first_failure_even_when_a_gather_kept_another():
    with ThreadPool(2) as pool:
        pipe = Pipeline("groups", pool=pool)
        split = pipe.add(lambda x: [10 * x, 10 * x + 1], scatter=True, name="split")
        w = pipe.add(_sub_fails, after=split, name="w")
        pipe.add(sum, after=w, gather=True, name="total")
        report = pipe.run(range(3))  # item 1: sub-item 0 ValueError, sub-item 1 KeyError
    groups = {(node, exc): (n, first) for node, exc, n, first in report.failure_groups()}
    assert set(groups) == {("w", "ValueError"), ("w", "KeyError")}
    for (node, exc), (n, first) in groups.items():
        assert n == 1 and first is not None, (node, exc)
        assert (first.node, first.exc_type) == (node, exc)
    assert groups[("w", "KeyError")][1].item == (1, 1)
    assert groups[("w", "KeyError")][1].message == "'k11'"
