"""The benchmark harness measures what it says: the limit row does the workload's work, a
wrong output is never timed, efficiencies pair rounds, W10 times its first outputs.

No timing is asserted here (timing targets live in benchmarks/); these check the method.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from benchmarks import __main__ as runner
from benchmarks import cell


@pytest.mark.parametrize("workload", ["W1", "W2", "W7", "W9"])
def test_limit_row_computes_the_workload_on_plain_processes(workload: str) -> None:
    gen = cell.limit(workload, 2)
    run = next(gen)
    try:
        for n in (0, 1, 7):
            assert run(n) == cell.expected(workload, n)
    finally:
        gen.close()


def _run_cell(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    contestant: Callable[[str, int], Iterator[Callable[[int], Any]]],
    workload: str = "W2",
    n: int = 20,
) -> dict[str, Any]:
    monkeypatch.setitem(cell.CONTESTANTS, "probe", contestant)
    monkeypatch.setattr(sys, "argv", ["cell", workload, "probe", str(n), "--repeats", "2"])
    cell.main()
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_a_wrong_output_before_the_clock_is_never_timed(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def wrong(workload: str, workers: int) -> Iterator[Callable[[int], Any]]:
        yield lambda n: [0] * n

    out = _run_cell(monkeypatch, capsys, wrong)
    assert out["ok"] is False
    assert out["times"] == []
    assert "check run" in out["wrong"]


def test_a_wrong_output_on_a_timed_run_drops_every_time(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def wrong_when_large(workload: str, workers: int) -> Iterator[Callable[[int], Any]]:
        yield lambda n: cell.expected(workload, n) if n < 10 else [0] * n

    out = _run_cell(monkeypatch, capsys, wrong_when_large)
    assert out["ok"] is False
    assert out["times"] == []
    assert "timed run" in out["wrong"]


def test_a_right_output_is_timed_with_the_load_average(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = _run_cell(monkeypatch, capsys, cell.serial, workload="W1")
    assert out["ok"] is True
    assert len(out["times"]) == 2
    assert len(out["load"]) == 2


def test_w10_records_when_the_first_tenth_arrived(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def slow_tail(workload: str, workers: int) -> Iterator[Callable[[int], Any]]:
        def gen(n: int) -> Iterator[int]:
            for x in range(n):
                if x >= n // 10:
                    time.sleep(0.005)
                yield 3 * x + 3

        yield gen

    out = _run_cell(monkeypatch, capsys, slow_tail, workload="W10", n=40)
    assert out["ok"] is True
    for first, total in zip(out["first_10pct"], out["times"]):
        assert first < total


def test_efficiency_pairs_rounds_and_scales_by_items() -> None:
    spec = {"limit": "cpu"}
    rows: list[dict[str, Any]] = [
        {"contestant": "limit", "n": 100, "times": [1.0, 2.0, 1.0], "size": 100},
        {"contestant": "serial", "n": 100, "times": [2.0, 4.0, 2.0], "size": 100},
        # half the items, each round twice the limit's time per item
        {"contestant": "slow", "n": 50, "times": [1.0, 2.0, 1.0], "size": 100},
        {"contestant": "bad", "n": 100, "times": [], "size": 100, "ok": False},
    ]
    for r in rows:
        if r["times"]:
            r["median_s"] = sorted(r["times"])[1]
    runner._efficiencies(spec, rows, cores=2, workers=2)
    by = {r["contestant"]: r for r in rows}
    assert by["limit"]["vs_limit"] == 1.0
    assert by["limit"]["vs_ideal"] == 1.0  # serial 2.0 s / 2 cores = 1.0 s
    assert by["serial"]["vs_limit"] == 0.5
    assert by["slow"]["vs_limit"] == 0.5
    assert by["bad"]["vs_limit"] is None and by["bad"]["vs_ideal"] is None


_BURN = "import time\nend = time.process_time() + 1.0\nwhile time.process_time() < end: pass"


def test_others_counts_other_programs_and_not_the_suites_own() -> None:
    """The machine's state for a cell: a second of CPU burnt by the suite's own child is
    the suite's; one burnt by a program outside the suite is the others'. (Lower bounds:
    whatever else runs meanwhile only adds to the others.)"""
    import subprocess

    from benchmarks import others

    before = others.sample()
    subprocess.run([sys.executable, "-c", _BURN], check=True)  # the suite's own: reaped
    after = others.sample()
    assert after is not None and before is not None
    _, own, _ = others.used(before, after)
    assert own >= 0.9, own
    # Another program: started through a shell that exits at once, so it is nobody's child
    # here; it burns a second of CPU.
    before = others.sample()
    shell = ["sh", "-c", f'{sys.executable} -c "{_BURN}" & echo $!']
    pid = int(subprocess.run(shell, check=True, capture_output=True, text=True).stdout)
    deadline = time.monotonic() + 60
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.02)
    after = others.sample()
    assert after is not None and before is not None
    _, own, theirs = others.used(before, after)
    assert own < 0.5 and theirs >= 0.9, (own, theirs)
    assert others.share(others.sample(), os.cpu_count() or 1) is not None


@pytest.mark.parametrize(
    ("argv", "name"),
    [
        ([], "latest"),
        (["--repeats", "5"], "latest"),
        (["--quick"], "quick"),
        (["--quick", "--only", "W1"], "quick"),
        (["--only", "W1"], "partial"),
        (["--peers", "limit,papy"], "partial"),
        (["--skip", "ray_data"], "partial"),
    ],
)
def test_only_a_full_run_replaces_the_recorded_results(argv: list[str], name: str) -> None:
    assert runner.results_name(runner.parse_args(argv)) == name
