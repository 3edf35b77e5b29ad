"""The papy command end to end, in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

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


def test_graph_svg_goes_to_stdout_like_dot_tsvg(tmp_path):
    r = papy("graph", CHAIN, "--format", "svg")
    assert r.returncode == 0, r.stderr
    assert "<svg" in r.stdout and ">describe<" in r.stdout and r.stdout.rstrip().endswith("</svg>")


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


KNN = """
from papy import Pipeline, ProcessPool

def parse(line):
    return int(line)

def knn(x):
    if x % 2 == 0:
        raise ValueError(f"no neighbours for {x}")
    return x

pipe = Pipeline("knn", pool=ProcessPool(2))
pipe.add(knn, after=pipe.add(parse))
"""


def test_many_failures_print_ten_lines_then_one_count_per_group(tmp_path):
    script = tmp_path / "knn.py"
    script.write_text(KNN)
    lines = [str(i) for i in range(1, 2001)] + ["x", "y", "z"]
    r = papy("run", str(script), "--no-progress", stdin="\n".join(lines) + "\n")
    assert r.returncode == 1
    err = r.stderr.splitlines()
    one_by_one = [x for x in err if x.startswith("failed: ")]
    assert len(one_by_one) == 10
    # Each names node, item, input, cause, and the user's line (not papy's).
    assert one_by_one[0] == (
        "failed: node 'knn' failed on item 1 (input 2): ValueError: no neighbours for 2 "
        f"(at {script}:9 in knn)"
    )
    assert "... and 990 more: node 'knn' ValueError" in err
    assert "... and 3 more: node 'parse' ValueError" in err
    assert "1,003 item(s) failed" in err
    assert len(r.stdout.splitlines()) == 1000
    assert "Traceback" not in r.stderr


def test_when_every_item_failed_there_is_no_throughput_advice(tmp_path):
    script = tmp_path / "knn.py"
    script.write_text(KNN)
    r = papy("run", str(script), "--no-progress", stdin="".join(f"{2 * i}\n" for i in range(50)))
    assert r.returncode == 1
    assert "50 failed" in r.stderr and "50 item(s) failed" in r.stderr
    for advice in ("limits throughput", "is the busiest", "more workers", "larger batch"):
        assert advice not in r.stderr


def test_end_of_run_table_fits_80_columns(tmp_path):
    script = tmp_path / "long.py"
    script.write_text(
        "from papy import Pipeline, ThreadPool\n"
        "pipe = Pipeline('a-pipeline-with-a-long-name', pool=ThreadPool(3))\n"
        "a = pipe.add(lambda x: int(x), name='parse_the_input_lines_carefully')\n"
        "pipe.add(lambda x: x * 2, after=a, name='double_every_value')\n"
    )
    r = papy("run", str(script), "--no-progress", stdin="".join(f"{i}\n" for i in range(5000)))
    assert r.returncode == 0, r.stderr
    assert "double_every_value" in r.stderr and "util" in r.stderr
    too_wide = [x for x in r.stderr.splitlines() if len(x) > 80]
    assert not too_wide, too_wide


def test_a_file_with_one_pipeline_needs_no_name_whatever_it_is_called(tmp_path):
    script = tmp_path / "snippet.py"
    script.write_text(
        "from papy import Pipeline, InlinePool\n"
        "pipe = Pipeline('snippet', pool=InlinePool())\n"
        "pipe.add(lambda x: int(x) * 10)\n"
    )
    r = papy("run", str(script), "--no-progress", stdin="1\n2\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["10", "20"]
    assert papy("graph", str(script)).stdout.startswith("flowchart TD")
    two = tmp_path / "two.py"
    two.write_text(
        "from papy import Pipeline\n"
        "first = Pipeline('first')\nfirst.add(int)\n"
        "second = Pipeline('second')\nsecond.add(str)\n"
    )
    r = papy("run", str(two), "--no-progress", stdin="1\n")
    assert r.returncode == 2 and "several (first, second)" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_input_line_stops_the_run_after_earlier_outputs_are_written(tmp_path):
    script = tmp_path / "adder.py"
    script.write_text(
        "from papy import Pipeline, ThreadPool\n"
        "pipe = Pipeline('adder', pool=ThreadPool(2))\n"
        "pipe.add(lambda d: d['a'] + d['b'], name='add')\n"
    )
    out = tmp_path / "out.jsonl"
    stdin = '{"a": 1, "b": 2}\n{"a": 2, "b": 2}\n{"a": 3, "b": 2}\n{"a": 4,\n{"a": 5, "b": 1}\n'
    args = ["--input-format", "jsonl", "--output", str(out), "--no-progress"]
    r = papy("run", str(script), *args, stdin=stdin)
    assert r.returncode == 2
    assert out.read_text().splitlines() == ["3", "4", "5"]
    errors = [x for x in r.stderr.splitlines() if x.startswith("Error:")]
    assert len(errors) == 1 and "input line 4 is not JSON" in errors[0]
    assert "Traceback" not in r.stderr


def test_unwritable_output_is_a_one_line_usage_error(tmp_path):
    for target in (tmp_path / "no" / "such" / "dir" / "out.jsonl", tmp_path):
        r = papy("run", CHAIN, "--no-progress", "--output", str(target), stdin="1\n")
        assert r.returncode == 2, r.stderr
        assert r.stderr.strip().count("\n") == 0 and "cannot write --output" in r.stderr
        assert "Traceback" not in r.stderr
    report = tmp_path / "x" / "r.html"
    r = papy("run", CHAIN, "--no-progress", "--report", str(report), stdin="1\n")
    assert r.returncode == 2 and "cannot write --report" in r.stderr


SLOW = """
import time
from papy import Pipeline, ProcessPool

def slow(x):
    time.sleep(0.1)
    return x

pipe = Pipeline("slow", pool=ProcessPool(2))
pipe.add(slow)
"""


def _start_slow(tmp_path: Path) -> subprocess.Popen[str]:
    script = tmp_path / "slow.py"
    script.write_text(SLOW)
    out = tmp_path / "out.jsonl"
    inp = tmp_path / "in.txt"
    inp.write_text("".join(f"{i}\n" for i in range(5000)))
    args = ["run", str(script), "--no-progress", "--input", str(inp), "--output", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "papy", *args],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    import psutil

    deadline = time.time() + 60
    while time.time() < deadline and len(psutil.Process(proc.pid).children()) < 2:
        time.sleep(0.1)  # wait until it runs: both workers started
    time.sleep(1.0)
    return proc


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signals_exit_with_128_plus_the_signal_and_no_traceback(tmp_path, sig, code):
    import psutil

    proc = _start_slow(tmp_path)
    workers = psutil.Process(proc.pid).children(recursive=True)
    assert workers
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "interrupted" in err and "Traceback" not in err
    psutil.wait_procs(workers, timeout=10)
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]


def test_a_second_signal_during_shutdown_prints_no_second_traceback(tmp_path):
    proc = _start_slow(tmp_path)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_input_that_is_not_utf8_and_unwritable_graph_output_are_usage_errors(tmp_path):
    inp = tmp_path / "in.txt"
    inp.write_bytes(b"1\n2\n\xff\xfe\n4\n")
    out = tmp_path / "out.jsonl"
    r = papy("run", CHAIN, "--no-progress", "--input", str(inp), "--output", str(out))
    assert r.returncode == 2 and "is not UTF-8" in r.stderr and "Traceback" not in r.stderr
    assert [json.loads(x)["square"] for x in out.read_text().splitlines()] == [1, 4]
    target = tmp_path / "missing-dir" / "g.png"
    r = papy("graph", CHAIN, "--format", "png", "-o", str(target))
    assert r.returncode == 2 and "cannot write -o" in r.stderr and "Traceback" not in r.stderr


_NESTED_MP = """
import multiprocessing, os
from concurrent.futures import ProcessPoolExecutor
from papy import Pipeline, ProcessPool, ThreadPool

class Square:
    def __init__(self, v):
        self.v = v * v

def square(v):
    return Square(v)

def work(line):
    method = os.environ["NESTED_METHOD"]
    if os.environ["NESTED_API"] == "executor":
        ctx = multiprocessing.get_context(method)
        with ProcessPoolExecutor(2, mp_context=ctx) as ex:
            squares = list(ex.map(square, range(int(line))))
    else:
        with multiprocessing.get_context(method).Pool(2) as p:
            squares = p.map(square, range(int(line)))
    assert all(type(s) is Square for s in squares)  # the class of this file, here too
    return sum(s.v for s in squares)

kind = os.environ["NESTED_POOL"]
pipeline = Pipeline("nested-mp", pool=ThreadPool(2) if kind == "thread" else ProcessPool(2, kind))
pipeline.add(work, timeout=60)
"""


@pytest.mark.parametrize(
    "pool, method, api",
    [("thread", "spawn", "pool"), ("fork", "forkserver", "executor"), ("spawn", "spawn", "pool")],
)
def test_run_a_file_whose_nodes_hand_its_functions_to_multiprocessing(tmp_path, pool, method, api):
    """Under ``papy run`` the file's functions belong to a module named ``__papy__``; a
    process spawned by a node could not import it (``multiprocessing.Pool.map`` then waited
    forever). They now load it as ``python file.py`` loads the script's ``__main__``."""
    script = tmp_path / "nested.py"
    script.write_text(_NESTED_MP)
    inp = tmp_path / "in.txt"
    inp.write_text("1\n2\n3\n")
    out = tmp_path / "out.jsonl"
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    env = {"NESTED_POOL": pool, "NESTED_METHOD": method, "NESTED_API": api}
    env["TMPDIR"] = str(private_tmp)
    argv = ["run", str(script), "--input", str(inp), "--output", str(out), "--no-progress"]
    r = subprocess.run(
        [sys.executable, "-m", "papy", *argv],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        cwd=tmp_path,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert [json.loads(line) for line in out.read_text().splitlines()] == [0, 1, 5]
    # the directory that made ``__papy__`` importable is gone with the run
    assert not list(private_tmp.glob("papy-file-*"))
