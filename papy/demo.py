"""The flagship demo: index the Python standard library's own source files.

Data every machine with Python has, and a pipeline that shows the whole engine::

    files ──► read_text (threads) ─┬─► list_functions (processes, scatter)
                                   │        └─► complexity (processes, per function)
                                   │              └─► summarize (gather)      ─┐
                                   ├─► count_lines ──────────────────────────── ├─► make_row (join)
    files ──► gzip (external program, threads) ─► len ────────────────────────┘

Run it with ``make demo``, ``papy demo`` or ``python -m papy.demo``.
"""

from __future__ import annotations

import ast
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from papy import Pipeline, ProcessPool, ThreadPool, shell
from papy.io import files

_BRANCHES = (
    ast.If,
    ast.For,
    ast.AsyncFor,
    ast.While,
    ast.IfExp,
    ast.ExceptHandler,
    ast.With,
    ast.AsyncWith,
    ast.Assert,
    ast.comprehension,
    ast.match_case,
)


def read_text(path: Path) -> tuple[str, str]:
    """Read one source file (I/O: runs on threads)."""
    return str(path), path.read_text(encoding="utf-8", errors="replace")


def list_functions(source: tuple[str, str]) -> list[tuple[str, str]]:
    """Parse a module and return (name, code) for every function in it (CPU: processes)."""
    path, text = source
    tree = ast.parse(text, filename=path)
    lines = text.splitlines()
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            end = node.end_lineno or node.lineno
            code = "\n".join(lines[node.lineno - 1 : end])
            out.append((node.name, code))
    return out


def complexity(function: tuple[str, str]) -> tuple[str, int]:
    """Score one function: 1 + its branches and boolean operators (cyclomatic-like)."""
    name, code = function
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(code))
    except SyntaxError:  # a decorated or oddly indented fragment: score it as one path
        return name, 1
    score = 1
    for node in ast.walk(tree):
        if isinstance(node, _BRANCHES):
            score += 1
        elif isinstance(node, ast.BoolOp):
            score += len(node.values) - 1
    return name, score


def summarize(scores: list[tuple[str, int]]) -> dict[str, Any]:
    """Gather a module's function scores into totals and its most complex function."""
    worst = max(scores, key=lambda s: s[1], default=("-", 0))
    return {
        "functions": len(scores),
        "complexity": sum(s for _, s in scores),
        "worst": worst[0],
        "worst_score": worst[1],
    }


def count_lines(source: tuple[str, str]) -> int:
    """Count the lines of a module."""
    return source[1].count("\n") + 1


def make_row(
    source: tuple[str, str], summary: dict[str, Any], lines: int, gz_bytes: int
) -> dict[str, Any]:
    """Join what the branches found about one module into a table row."""
    path, text = source
    return {
        "module": path,
        "lines": lines,
        "bytes": len(text.encode()),
        "gz_bytes": gz_bytes,
        **summary,
    }


def stdlib_files(limit: int | None = None) -> Iterator[Path]:
    """Yield the standard library's .py files (tests and site-packages left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    n = 0
    for path in files(str(root / "**" / "*.py")):
        rel = path.relative_to(root).parts
        if rel[0] in ("test", "site-packages", "idlelib", "lib2to3") or "tests" in rel:
            continue
        yield path
        n += 1
        if limit is not None and n >= limit:
            return


def build(io: ThreadPool, cpu: ProcessPool) -> Pipeline:
    """Build the demo pipeline on the given pools."""
    pipe = Pipeline("stdlib-index", pool=cpu)
    read = pipe.add(read_text, pool=io)
    funcs = pipe.add(list_functions, after=read, scatter=True)
    cost = pipe.add(complexity, after=funcs)
    total = pipe.add(summarize, after=cost, gather=True)
    lines = pipe.add(count_lines, after=read, pool=io)
    gz = pipe.add(
        [shell(["gzip", "-c", "-6", "{path}"], stdout="bytes"), len], pool=io, name="gzip"
    )
    pipe.add(make_row, after=[read, total, lines, gz], pool=io)
    return pipe


pipeline = None  # ``papy graph papy/demo.py:build_default`` draws it


def build_default() -> Pipeline:
    """Build the demo pipeline on fresh pools (for ``papy graph``)."""
    return build(ThreadPool(8), ProcessPool())


def main(
    limit: int | None = None, progress: bool | None = None, report: str | None = None
) -> list[dict[str, Any]]:
    """Run the demo, print a summary table and the run report; return the rows."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    with ThreadPool(8) as io, ProcessPool() as cpu:
        pipe = build(io, cpu)
        t0 = time.perf_counter()
        rows = list(pipe.map(stdlib_files(limit), errors="skip", progress=progress, report=report))
        wall = time.perf_counter() - t0
    table = Table(title="The 10 most complex standard-library modules")
    for col in (
        "module",
        "lines",
        "functions",
        "complexity",
        "most complex function",
        "gzip ratio",
    ):
        table.add_column(
            col, justify="left" if col in ("module", "most complex function") else "right"
        )
    root = Path(sysconfig.get_paths()["stdlib"])
    for r in sorted(rows, key=lambda r: r["complexity"], reverse=True)[:10]:
        table.add_row(
            str(Path(r["module"]).relative_to(root)),
            f"{r['lines']:,}",
            f"{r['functions']:,}",
            f"{r['complexity']:,}",
            f"{r['worst']} ({r['worst_score']})",
            f"{r['bytes'] / max(1, r['gz_bytes']):.1f}x",
        )
    console.print(table)
    n_lines = sum(r["lines"] for r in rows)
    n_funcs = sum(r["functions"] for r in rows)
    raw = sum(r["bytes"] for r in rows)
    gz = sum(r["gz_bytes"] for r in rows)
    console.print(
        f"{len(rows):,} modules, {n_lines:,} lines, {n_funcs:,} functions scored, "
        f"{raw / 2**20:.1f} MiB of source gzip to {gz / 2**20:.1f} MiB, "
        f"in {wall:.1f} s"
    )
    if pipe.last_report is not None:
        print(pipe.last_report.table(), flush=True)
    if report:
        console.print(f"HTML report written to {report}")
    return rows


if __name__ == "__main__":
    main(limit=int(sys.argv[1]) if len(sys.argv) > 1 else None)
