"""The papy command end to end, in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHAIN = str(ROOT / "examples" / "chain.py")


def papy(*args: str, stdin: str | None = None, cwd: Path | None = None):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "papy", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


def test_run_reads_lines_writes_jsonl_and_prints_the_report(tmp_path):
    inp = tmp_path / "in.txt"
    inp.write_text("".join(f"{i}\n" for i in range(1, 21)))
    out = tmp_path / "out.jsonl"
    r = papy(
        "run", CHAIN, "--input", str(inp), "--output", str(out), "--workers", "2", "--no-progress"
    )
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"square": i * i, "even": i % 2 == 0} for i in range(1, 21)]
    assert "parse" in r.stderr and "items/s" in r.stderr


def test_run_from_stdin_to_stdout_with_jsonl_and_named_pipeline(tmp_path):
    script = tmp_path / "pipes.py"
    script.write_text(
        "from papy import Pipeline, InlinePool\n"
        "adder = Pipeline('adder', pool=InlinePool())\n"
        "adder.add(lambda d: d['a'] + d['b'], name='add')\n"
    )
    r = papy(
        "run",
        f"{script}:adder",
        "--input-format",
        "jsonl",
        "--no-progress",
        stdin='{"a": 1, "b": 2}\n{"a": 5, "b": 5}\n',
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["3", "10"]


def test_failed_items_give_nonzero_exit_with_the_count(tmp_path):
    r = papy("run", CHAIN, "--no-progress", stdin="1\nx\n3\ny\n")
    assert r.returncode == 1
    assert [json.loads(x)["square"] for x in r.stdout.splitlines()] == [1, 9]
    assert "2 item(s) failed" in r.stderr
    assert "node 'parse' failed on item 1" in r.stderr and "ValueError" in r.stderr


def test_journal_option_resumes(tmp_path):
    journal = tmp_path / "run.db"
    r = papy("run", CHAIN, "--no-progress", "--journal", str(journal), stdin="1\n2\n3\n")
    assert r.returncode == 0, r.stderr
    r = papy("run", CHAIN, "--no-progress", "--journal", str(journal), stdin="1\n2\n3\n4\n")
    assert r.returncode == 0, r.stderr
    assert [json.loads(x)["square"] for x in r.stdout.splitlines()] == [1, 4, 9, 16]
    assert "3 finished earlier (journal)" in r.stderr


def test_html_report_option(tmp_path):
    report = tmp_path / "run.html"
    r = papy("run", CHAIN, "--no-progress", "--report", str(report), stdin="1\n2\n")
    assert r.returncode == 0, r.stderr
    assert "<svg" in report.read_text()


def test_user_errors_are_one_line_not_a_traceback(tmp_path):
    r = papy("run", "missing.py")
    assert r.returncode == 2 and "file not found: missing.py" in r.stderr
    assert "Traceback" not in r.stderr
    script = tmp_path / "empty.py"
    script.write_text("x = 1\n")
    r = papy("run", str(script))
    assert r.returncode == 2 and "has no object named 'pipeline'" in r.stderr
    assert "Traceback" not in r.stderr
    r = papy("run", CHAIN, "--workers", "0")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    r = papy("run", CHAIN, "--input", str(tmp_path / "nope.txt"))
    assert r.returncode == 2 and "input file not found" in r.stderr
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('boom')\n")
    r = papy("graph", str(broken))
    assert r.returncode == 1 and "raised RuntimeError while loading: boom" in r.stderr
    assert "Traceback" not in r.stderr


def test_graph_formats(tmp_path):
    r = papy("graph", CHAIN)
    assert r.returncode == 0 and r.stdout.startswith("flowchart TD")
    r = papy("graph", CHAIN, "--format", "dot")
    assert r.returncode == 0 and "digraph" in r.stdout
    svg = tmp_path / "g.svg"
    r = papy("graph", CHAIN, "--format", "svg", "-o", str(svg))
    assert r.returncode == 0 and "<svg" in svg.read_text() and ">describe<" in svg.read_text()
    r = papy("graph", CHAIN, "--format", "png")
    assert r.returncode == 2 and "-o PATH" in r.stderr


def test_help_everywhere_has_examples():
    for args in (["--help"], ["run", "--help"], ["graph", "--help"], ["demo", "--help"]):
        r = papy(*args)
        assert r.returncode == 0 and "Usage:" in r.stdout
    assert "Examples:" in papy("run", "--help").stdout
    assert "Examples:" in papy("graph", "--help").stdout


def test_demo_runs_on_a_few_files():
    r = papy("demo", "--files", "25", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "25 modules" in r.stdout and "most complex" in r.stdout
    assert "limits throughput" in r.stdout or "is the busiest" in r.stdout
