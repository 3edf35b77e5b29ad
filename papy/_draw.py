"""Drawings of a pipeline's graph: Mermaid text, Graphviz DOT, and SVG/PNG through ``dot``.

Each node shows its name, pool, batch size and whether it scatters or gathers, so a reader
sees how the work is spread without reading the code.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

from papy._errors import PapyError

if TYPE_CHECKING:
    from papy._node import Node
    from papy._plan import Graph


def _pool_label(pipe: Graph, n: Node) -> str:
    pool = n.pool or pipe.pool
    return pool.describe() if pool is not None else "process (default)"


def node_label(pipe: Graph, n: Node) -> list[str]:
    """Return the lines that describe a node in a drawing."""
    lines = [n.name, _pool_label(pipe, n), f"batch {n.batch if n.batch else 'auto'}"]
    marks = [
        m
        for m, on in (
            ("scatter", n.scatter),
            ("gather", n.gather),
            ("batched", n.batched),
            ("async", n.is_async),
            (f"timeout {n.timeout:g}s" if n.timeout else "", bool(n.timeout)),
            (f"retries {n.retries}", bool(n.retries)),
        )
        if on
    ]
    if marks:
        lines.append(", ".join(marks))
    return lines


def _ident(name: str, i: int) -> str:
    return f"n{i}_" + re.sub(r"\W", "_", name)


def to_mermaid(pipe: Graph) -> str:
    """Return a Mermaid flowchart of the pipeline (paste into Markdown)."""
    ids = {n.name: _ident(n.name, i) for i, n in enumerate(pipe.nodes)}
    out = ["flowchart TD"]
    for n in pipe.nodes:
        label = "<br/>".join(node_label(pipe, n)).replace('"', "'")
        shape = ('[/"', '"/]') if n.scatter else ('[\\"', '"\\]') if n.gather else ('["', '"]')
        out.append(f"    {ids[n.name]}{shape[0]}{label}{shape[1]}")
    for n in pipe.nodes:
        for p in n.parents:
            out.append(f"    {ids[p.name]} --> {ids[n.name]}")
    return "\n".join(out) + "\n"


def _dot_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def to_dot(pipe: Graph, bottleneck: str | None = None) -> str:
    """Return the pipeline as a Graphviz DOT digraph.

    ``bottleneck`` names a node to mark (red outline and fill, "bottleneck" in its label),
    as the HTML run report does with the node that limited the run.
    """
    ids = {n.name: _ident(n.name, i) for i, n in enumerate(pipe.nodes)}
    out = [
        f'digraph "{_dot_escape(pipe.name)}" {{',
        "    rankdir=TB;",
        '    node [shape=box, style="rounded,filled", fillcolor="#eef4ff", '
        'fontname="Helvetica", fontsize=11];',
        '    edge [color="#555555"];',
    ]
    for n in pipe.nodes:
        lines = node_label(pipe, n)
        if n.name == bottleneck:
            lines = [*lines, "bottleneck"]
        label = "\\n".join(_dot_escape(line) for line in lines)
        extra = ""
        if n.scatter:
            extra = ', shape=invhouse, fillcolor="#fff1d6"'
        elif n.gather:
            extra = ', shape=house, fillcolor="#e3f7e3"'
        if n.name == bottleneck:
            extra += ', color="#c00000", fillcolor="#ffd6d6", penwidth=3, fontcolor="#900000"'
        out.append(f'    {ids[n.name]} [label="{label}"{extra}];')
    for n in pipe.nodes:
        for i, p in enumerate(n.parents):
            attr = f' [label="{i + 1}"]' if len(n.parents) > 1 else ""
            out.append(f"    {ids[p.name]} -> {ids[n.name]}{attr};")
    out.append("}")
    return "\n".join(out) + "\n"


def dot_binary() -> str:
    """Return the path of Graphviz's ``dot``, or raise a PapyError saying how to get it."""
    path = shutil.which("dot")
    if path is None:
        raise PapyError(
            "Graphviz 'dot' was not found on PATH; install Graphviz (for example "
            "'apt-get install graphviz' or 'brew install graphviz'), or use "
            "to_dot() / to_mermaid() for text output"
        )
    return path


def render_dot(dot_text: str, fmt: str) -> bytes:
    """Render DOT text to ``fmt`` (svg, png, pdf) with Graphviz."""
    proc = subprocess.run(
        [dot_binary(), f"-T{fmt}"], input=dot_text.encode(), capture_output=True, timeout=60
    )
    if proc.returncode != 0:
        raise PapyError(f"Graphviz failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def draw(pipe: Graph, path: str | Path, fmt: str | None = None) -> Path:
    """Draw the pipeline to ``path``; the format follows the suffix (svg, png, pdf, dot)."""
    path = Path(path)
    fmt = (fmt or path.suffix.lstrip(".") or "svg").lower()
    if fmt == "dot":
        path.write_text(to_dot(pipe))
    elif fmt in ("mmd", "mermaid"):
        path.write_text(to_mermaid(pipe))
    else:
        path.write_bytes(render_dot(to_dot(pipe), fmt))
    return path
