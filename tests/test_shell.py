"""External programs as nodes: placeholders, stdin/stdout modes, failures, no shell."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from papy import Failure, Pipeline, ShellError, ThreadPool, shell


def test_placeholders_fill_single_arguments_and_never_reach_a_shell(tmp_path):
    canary = tmp_path / "canary"
    canary.write_text("alive")
    evil = [
        f"; rm -rf {canary}",
        f"$(rm -rf {canary})",
        f"`rm -rf {canary}`",
        f"x && rm -rf {canary}",
        "a b  c",
        "'quoted' \"double\"",
        "*",
    ]
    pipe = Pipeline("echo", pool=ThreadPool(4))
    pipe.add(shell(["printf", "%s|", "{item}"]), name="echo")
    out = list(pipe.map(evil))
    assert out == [f"{e}|" for e in evil]  # each item arrived as exactly one argument
    assert canary.read_text() == "alive"


def test_path_placeholder_and_mapping_keys(tmp_path):
    f = tmp_path / "data.txt"
    f.write_text("one\ntwo\nthree\n")
    count = shell(["wc", "-l", "{path}"])
    assert count(f).split()[0] == "3"
    grep = shell(["grep", "-c", "{word}", "{file}"])
    assert grep({"word": "t", "file": str(f)}).strip() == "2"


def test_stdin_item_and_bytes_output():
    gz = shell(["gzip", "-c"], stdin="item", stdout="bytes")
    gunzip = shell(["gzip", "-dc"], stdin="item", stdout="text")
    pipe = Pipeline("gzip", pool=ThreadPool(2))
    a = pipe.add(gz, name="compress")
    pipe.add(gunzip, after=a, name="decompress")
    texts = [f"line {i}\n" * i for i in range(1, 20)]
    assert list(pipe.map(texts)) == texts


def test_stdout_to_file_in_the_run_directory(tmp_path):
    pipe = Pipeline("files", pool=ThreadPool(2), workdir=tmp_path / "work")
    a = pipe.add(shell(["seq", "{item}"], stdout="file"), name="seq")
    pipe.add(lambda p: Path(p).read_text().split(), after=a, name="read")
    out = list(pipe.map([3, 5]))
    assert out == [["1", "2", "3"], ["1", "2", "3", "4", "5"]]
    assert len(list((tmp_path / "work").iterdir())) == 2  # kept: the pipeline has a workdir


def test_run_directory_is_removed_after_the_run_by_default():
    seen = []

    def remember(path):
        seen.append(Path(path).parent)
        return path

    pipe = Pipeline("tmp", pool=ThreadPool(1))
    a = pipe.add(shell(["echo", "hi"], stdout="file"), name="echo")
    pipe.add(remember, after=a)
    list(pipe.map([1]))
    assert seen and not seen[0].exists()


def test_nonzero_exit_is_a_failure_with_code_and_stderr():
    fail = shell(["sh", "-c", "echo first >&2; echo 'bad thing happened' >&2; exit 3"])
    pipe = Pipeline("exit", pool=ThreadPool(1))
    pipe.add(fail, name="sh")
    (f,) = list(pipe.map([1], errors="yield"))
    assert isinstance(f, Failure)
    assert f.exc_type == "papy.ShellError"
    assert isinstance(f.exception, ShellError) and f.exception.returncode == 3
    assert "exited with code 3" in f.message and "bad thing happened" in f.message


def test_timeout_kills_the_program():
    slow = shell(["sleep", "10"], timeout=0.2)
    with pytest.raises(TimeoutError, match="did not finish within 0.2 s"):
        slow(1)


def test_missing_program_and_string_argv_are_clear():
    with pytest.raises(FileNotFoundError, match="program not found: 'no-such-program-x'"):
        shell(["no-such-program-x"])(1)
    with pytest.raises(TypeError, match="argv as a list"):
        shell("ls -l")  # type: ignore[arg-type]


def test_env_and_cwd(tmp_path):
    show = shell(["sh", "-c", 'echo "$GREETING $(pwd)"'], env={"GREETING": "hello"}, cwd=tmp_path)
    assert show(None).strip() == f"hello {os.path.realpath(tmp_path)}"


def test_shell_node_runs_in_a_process_pool_too(process_pool):
    pipe = Pipeline("proc-shell", pool=process_pool)
    pipe.add(shell(["expr", "{item}", "+", "1"]), name="expr")
    assert [int(x) for x in pipe.map(range(5))] == [1, 2, 3, 4, 5]


def test_stdin_template_and_function():
    upper = shell(["tr", "a-z", "A-Z"], stdin="{item}!\n")
    assert upper("hey") == "HEY!\n"
    count = shell(["wc", "-c"], stdin=lambda item: b"x" * item)
    assert count(5).strip() == "5"


def test_ok_codes_accept_grep_no_match(tmp_path):
    pipe = Pipeline("grep", pool=ThreadPool(2))
    pipe.add(shell(["grep", "-c", "x"], stdin="item", ok_codes=(0, 1)), name="count")
    assert [int(v) for v in pipe.map(["axb\nx\n", "none\n"])] == [2, 0]
    # Without it, grep's 1 is an error; 2 (a real grep error) still is one with ok_codes.
    strict = Pipeline("strict", pool=ThreadPool(2))
    strict.add(shell(["grep", "-c", "x"], stdin="item"), name="count")
    (f,) = strict.map(["none\n"], errors="yield")
    assert isinstance(f, Failure) and f.exception.returncode == 1
    bad = Pipeline("bad", pool=ThreadPool(2))
    bad.add(shell(["grep", "-c", "x", str(tmp_path / "missing")], ok_codes=(0, 1)), name="g")
    (f,) = bad.map([1], errors="yield")
    assert isinstance(f, Failure) and f.exception.returncode == 2
    with pytest.raises(ValueError, match="ok_codes"):
        shell(["true"], ok_codes=())


def test_shell_error_carries_the_end_of_stdout_too():
    script = "for i in $(seq 1 50); do echo out-$i; done; echo err-last >&2; exit 4"
    pipe = Pipeline("sh", pool=ThreadPool(2))
    pipe.add(shell(["sh", "-c", script], stderr_lines=5), name="loud")
    (f,) = pipe.map([0], errors="yield")
    exc = f.exception
    assert isinstance(exc, ShellError) and exc.returncode == 4
    assert exc.stderr_tail == "err-last"
    assert exc.stdout_tail.splitlines() == [f"out-{i}" for i in range(46, 51)]
    assert "out-50" in str(exc) and "out-45" not in str(exc) and "err-last" in str(exc)
    import pickle

    again = pickle.loads(pickle.dumps(exc))
    assert again.stdout_tail == exc.stdout_tail and str(again) == str(exc)
