"""The HTML run report: graph, per-node table and an in-flight timeline, in one file.

The file is self-contained (inline SVG and CSS, no script, no network), so it opens
offline and can be attached to a ticket. The timeline is drawn here as plain SVG: a few
polylines do not justify a plotting dependency.
"""

from __future__ import annotations

import html
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from papy._draw import render_dot, to_dot, to_mermaid
from papy._observe import Observer, RunView
from papy._report import UTIL_MEANING
from papy._rundir import open_private

if TYPE_CHECKING:
    from papy._plan import Graph
    from papy._report import Report

_COLORS = [
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#ff7f0e",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
]


def _graph_svg(pipe: Graph, bottleneck: str | None = None) -> str:
    try:
        svg = render_dot(to_dot(pipe, bottleneck), "svg").decode()
    except Exception:
        return f"<pre class='mermaid'>{html.escape(to_mermaid(pipe))}</pre>"
    start = svg.find("<svg")
    return svg[start:] if start >= 0 else svg


def timeline_svg(
    samples: list[dict[str, Any]], nodes: list[str], width: int = 900, height: int = 320
) -> str:
    """Return an SVG line chart of items in flight per node over time."""
    left, right, top, bottom = 60, 170, 20, 40
    pw, ph = width - left - right, height - top - bottom
    t_max = max((s["t"] for s in samples), default=0.0) or 1.0
    y_max = max((max(0, s.get(n, 0)) for s in samples for n in nodes), default=0) or 1
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="items in flight per node">',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fafafa" stroke="#ccc"/>',
    ]
    for i in range(5):
        y = top + ph - ph * i / 4
        value = y_max * i / 4
        parts.append(
            f'<line x1="{left}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#e5e5e5"/>'
        )
        parts.append(
            f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" '
            f'text-anchor="end">{value:,.0f}</text>'
        )
        x = left + pw * i / 4
        parts.append(
            f'<text x="{x:.1f}" y="{top + ph + 16}" font-size="11" '
            f'text-anchor="middle">{t_max * i / 4:.2f}s</text>'
        )
    parts.append(
        f'<text x="{left + pw / 2}" y="{height - 4}" font-size="12" '
        'text-anchor="middle">time since start</text>'
    )
    for k, name in enumerate(nodes):
        color = _COLORS[k % len(_COLORS)]
        points = []
        prev_y = None
        for s in samples:
            x = left + pw * s["t"] / t_max
            y = top + ph - ph * max(0, s.get(name, 0)) / y_max
            if prev_y is not None:
                points.append(f"{x:.1f},{prev_y:.1f}")  # steps, not slopes
            points.append(f"{x:.1f},{y:.1f}")
            prev_y = y
        if points:
            parts.append(
                f'<polyline fill="none" stroke="{color}" stroke-width="2" '
                f'points="{" ".join(points)}"><title>{html.escape(name)}</title>'
                "</polyline>"
            )
        ly = top + 14 + 18 * k
        parts.append(
            f'<rect x="{left + pw + 12}" y="{ly - 9}" width="12" height="12" fill="{color}"/>'
        )
        parts.append(
            f'<text x="{left + pw + 30}" y="{ly + 1}" font-size="12">{html.escape(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def failures_html(report: Report) -> str:
    """Return the "Failures" section: one block per (node, exception type), largest first.

    Each block gives the count and the first failure of the group kept in the report (its
    item, input and traceback); the other kept failures of the group are listed below it.
    Empty text when nothing failed.
    """
    groups = report.failure_groups()
    if not groups:
        return ""
    kept = len(report.failures)
    total = sum(g[2] for g in groups)
    parts = [
        '<section class="failures" id="failures"><h2>Failures</h2>',
        f"<p>{total:,} failed item{'s' if total != 1 else ''} in {len(groups)} group"
        f"{'s' if len(groups) != 1 else ''} (node, exception type); "
        f"the report keeps the first {kept:,}.</p>",
    ]
    for node, exc, count, first in groups:
        parts.append(
            '<div class="group"><h3>'
            f"node <code>{html.escape(node)}</code>: {html.escape(exc)} "
            f'<span class="count">&times; {count:,}</span></h3>'
        )
        if first is not None:
            parts.append(
                f"<p>first: item <code>{html.escape(repr(first.item))}</code>, input "
                f"<code>{html.escape(first.input_repr)}</code>: "
                f"{html.escape(first.message)}</p>"
                f"<pre class='traceback'>{html.escape(first.traceback.rstrip())}</pre>"
            )
            others = [
                f
                for f in report.failures
                if f.node == node and f.exc_type == exc and f is not first
            ]
            if others:
                items = "".join(
                    f"<li>item <code>{html.escape(repr(f.item))}</code> "
                    f"(input <code>{html.escape(f.input_repr)}</code>): "
                    f"{html.escape(f.message)}</li>"
                    for f in others[:20]
                )
                more = (
                    f"<li>&hellip; and {count - 1 - len(others[:20]):,} more</li>"
                    if count - 1 > len(others[:20])
                    else ""
                )
                parts.append(f"<ul>{items}{more}</ul>")
        parts.append("</div>")
    parts.append("</section>")
    return "".join(parts)


def render_html(pipe: Graph, report: Report) -> str:
    """Return the whole HTML report as text."""
    rows = []
    for n in report.nodes.values():
        mark = ' class="bottleneck"' if n.name == report.bottleneck else ""
        rows.append(
            f"<tr{mark}><td>{html.escape(n.name)}</td><td>{html.escape(n.pool)}</td>"
            f"<td>{n.items_in:,}</td><td>{n.items_out:,}</td><td>{n.failed:,}</td>"
            f"<td>{n.busy_s:.2f}</td><td>{n.mean_item_s * 1e3:.2f}</td>"
            f"<td>{n.p95_item_s * 1e3:.2f}</td><td>{n.throughput:,.0f}</td>"
            f"<td>{n.utilization:.0%}</td><td>{n.wait_input_s:.2f}</td>"
            f"<td>{n.wait_room_s:.2f}</td><td>{n.wait_pool_s:.2f}</td></tr>"
        )
    rate = report.items / report.wall_s if report.wall_s else 0.0
    nodes = list(report.nodes)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>papy run report: {html.escape(report.pipeline)}</title>
<style>
body {{ font-family: Helvetica, Arial, sans-serif; margin: 24px; color: #222; }}
h1 {{ font-size: 22px; }} h2 {{ font-size: 17px; margin-top: 28px; }}
table {{ border-collapse: collapse; font-size: 13px; }}
th, td {{ border: 1px solid #ddd; padding: 4px 8px; text-align: right; }}
th {{ background: #f0f0f0; }} td:first-child, td:nth-child(2) {{ text-align: left; }}
tr.bottleneck td {{ background: #ffe9e9; font-weight: bold; }}
.summary {{ font-size: 15px; }} .suggestion {{ color: #a00; }}
.graph svg {{ max-width: 100%; height: auto; }}
.failures .group {{ border-left: 6px solid #d9534f; background: #fdecea; margin: 10px 0;
  padding: 6px 12px; }}
.failures h3 {{ font-size: 15px; margin: 4px 0; }} .failures .count {{ color: #a00; }}
.failures pre {{ background: #fff; border: 1px solid #eee; padding: 8px; font-size: 12px;
  overflow-x: auto; }}
.legend {{ font-size: 12px; color: #555; }}
</style></head><body>
<h1>Run report: {html.escape(report.pipeline)}</h1>
<p class="summary">{report.items:,} items in {report.wall_s:.2f} s ({rate:,.0f} items/s),
{report.failed:,} failed.</p>
<p class="suggestion">{html.escape(report.suggestion)}</p>
{failures_html(report)}
<h2>Graph</h2>
<div class="graph">{_graph_svg(pipe, report.bottleneck)}</div>
<h2>Nodes</h2>
<table><thead><tr><th>node</th><th>pool</th><th>in</th><th>out</th><th>failed</th>
<th>busy s</th><th>mean ms</th><th>p95 ms</th><th>items/s</th><th>util</th>
<th>wait input s</th><th>wait room s</th><th>wait pool s</th></tr></thead>
<tbody>{"".join(rows)}</tbody></table>
<p class="legend">Bold row: the bottleneck. {html.escape(UTIL_MEANING)}.</p>
<h2>Items in flight per node</h2>
<div class="timeline">{timeline_svg(report.timeline, nodes)}</div>
</body></html>
"""


def write_html(pipe: Graph, report: Report, path: str | Path) -> Path:
    """Write the HTML report to ``path``, readable by its owner only (mode 0600).

    An existing file is replaced (never written through if it is a symbolic link).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    with open_private(tmp, "w", private=True) as fh:
        fh.write(render_html(pipe, report))
    os.replace(tmp, path)
    return path


class HtmlReport(Observer):
    """Write the run's HTML report to ``path`` when the run ends, however it ends."""

    def __init__(self, graph: Graph, path: str | Path) -> None:
        self.graph = graph
        self.path = path

    def finished(self, sched: RunView, error: BaseException | None) -> None:
        if sched.report is not None:
            write_html(self.graph, sched.report, self.path)
