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
