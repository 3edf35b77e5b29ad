"""A run that stops early withdraws its queued tasks from a pool the user keeps."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from papy import Pipeline, ProcessPool, RunAborted, ThreadPool


def _work(x: int, log: str) -> int:
    with open(log, "a") as fh:
        fh.write(f"start {x}\n")
    if x == 0:
        time.sleep(0.3)
        raise ValueError("item 0 stops the run")
    time.sleep(2.0)
    return x


def _started(log: Path) -> set[int]:
    return {int(line.split()[1]) for line in log.read_text().splitlines()}


@pytest.mark.parametrize("kind", [ThreadPool, ProcessPool])
def test_an_aborted_run_withdraws_its_queued_tasks(kind: type, tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.touch()
    with kind(2) as pool:
        pipe = Pipeline("abort", pool=pool)
        pipe.add(_work, args=(str(log),), batch=1, on_error="raise")
        # Two workers, two tasks each in flight: items 0-3. Item 0 fails at 0.3 s, then
        # its worker takes item 2; item 3 stays queued behind items 1 and 2 (2 s each).
        with pytest.raises(RunAborted):
            list(pipe.map(range(40)))
        time.sleep(3.0)  # long after items 1 and 2 ended: a queued task would have started
        started = _started(log)
        # Nothing of the dead run ran after it, and the pool the user keeps still works.
        after = Pipeline("after", pool=pool)
        after.add(abs)
        assert list(after.map([-1, -2])) == [1, 2]
    assert 3 not in started, started
    assert started <= {0, 1, 2}
