"""Resumable runs: a journal so that no finished work is lost or redone."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from papy import Failure, JournalError, Pipeline, ProcessPool, ThreadPool
from papy._journal import content_digest

ROOT = Path(__file__).resolve().parent.parent


def counting(log: Path):
    def work(x):
        with open(log, "a") as fh:
            fh.write(f"{x}\n")
        return x * 10

    return work


def test_second_run_skips_finished_items_and_replays_outputs_in_order(tmp_path):
    log = tmp_path / "computed.txt"
    journal = tmp_path / "run.db"
    pipe = Pipeline("resume", pool=ThreadPool(3))
    pipe.add(counting(log), name="work")
    assert list(pipe.map(range(100), journal=journal)) == [x * 10 for x in range(100)]
    assert list(pipe.map(range(100), journal=journal)) == [x * 10 for x in range(100)]
    assert pipe.last_report is not None and pipe.last_report.skipped == 100
    assert sorted(Counter(log.read_text().split()).values()) == [1] * 100
    # A longer input: only the new items run.
    assert list(pipe.map(range(120), journal=journal)) == [x * 10 for x in range(120)]
    assert len(log.read_text().split()) == 120


def test_run_with_journal_and_scatter_gather_resumes(tmp_path):
    log = tmp_path / "computed.txt"
    journal = tmp_path / "run.db"
    with ProcessPool(2) as pool:
        pipe = Pipeline("sg", pool=pool)
        s = pipe.add(lambda x: range(x), scatter=True, name="split")
        w = pipe.add(counting(log), after=s, name="work")
        pipe.add(sum, after=w, gather=True, name="total")
        pipe.add(list, after=s, name="flat")  # an ungathered sink as well
        first = pipe.run(range(20), journal=journal)
        assert first.skipped == 0
        again = pipe.run(range(20), journal=journal)
    assert again.skipped == 20
    assert len(log.read_text().split()) == sum(range(20))


def test_key_function_survives_reordered_input(tmp_path):
    log = tmp_path / "computed.txt"
    journal = tmp_path / "run.db"
    pipe = Pipeline("keys", pool=ThreadPool(2))
    pipe.add(counting(log), name="work")
    items = list(range(50))
    assert list(pipe.map(items[:30], journal=journal, key=lambda x: x)) == [
        x * 10 for x in items[:30]
    ]
    shuffled = items[::-1]
    assert list(pipe.map(shuffled, journal=journal, key=lambda x: x)) == [x * 10 for x in shuffled]
    assert sorted(int(x) for x in log.read_text().split()) == items


def test_retry_failed_reruns_only_failures(tmp_path):
    journal = tmp_path / "run.db"
    broken = tmp_path / "broken"  # outside the function: its code and closure stay the same
    broken.write_text("3 7")

    def flaky(x):
        if str(x) in broken.read_text().split():
            raise ValueError(f"bad {x}")
        return x

    pipe = Pipeline("retry", pool=ThreadPool(2))
    pipe.add(flaky)
    out = list(pipe.map(range(10), journal=journal, errors="yield"))
    assert [o.item for o in out if isinstance(o, Failure)] == [3, 7]
    again = list(pipe.map(range(10), journal=journal, errors="yield"))
    assert [o.item for o in again if isinstance(o, Failure)] == [3, 7]  # replayed as failures
    broken.write_text("")
    fixed = list(pipe.map(range(10), journal=journal, retry_failed=True))
    assert fixed == list(range(10))
    assert pipe.last_report is not None and pipe.last_report.skipped == 8


def test_corrupt_or_foreign_journal_is_refused_clearly(tmp_path):
    pipe = Pipeline("p", pool=ThreadPool(1))
    pipe.add(abs)
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(JournalError, match="not a papy journal"):
        list(pipe.map([1], journal=junk))
    foreign = tmp_path / "foreign.db"
    con = sqlite3.connect(foreign)
    con.execute("CREATE TABLE t (x)")
    con.commit()
    con.close()
    with pytest.raises(JournalError, match="not a papy journal"):
        list(pipe.map([1], journal=foreign))


_DRIVER = textwrap.dedent(
    """
    import sys, time
    from papy import Pipeline, ProcessPool

    computed, delivered, journal = sys.argv[1:4]

    def compute(x):
        time.sleep(0.0005)
        with open(computed, "a") as fh:
            fh.write(f"{{x}}\\n")
        return x

    def sink(x):
        with open(delivered, "a") as fh:
            fh.write(f"{{x}}\\n")
        return x

    if __name__ == "__main__":
        pipe = Pipeline("journaled", pool=ProcessPool(2))
        c = pipe.add(compute, batch=16)
        pipe.add(sink, after=c)
        report = pipe.run(range(10_000), journal=journal, progress=False)
        print("SKIPPED", report.skipped, flush=True)
    """
)


def test_sigkilled_driver_resumes_with_every_item_delivered_exactly_once(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER.format())
    computed, delivered, journal = tmp_path / "computed", tmp_path / "delivered", tmp_path / "j.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, str(script), str(computed), str(delivered), str(journal)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if delivered.exists() and len(delivered.read_bytes().splitlines()) >= 3000:
            break
        time.sleep(0.01)
    workers = psutil.Process(proc.pid).children()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    psutil.wait_procs(workers, timeout=30)  # they finish their task and its commit, then exit
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
    first = Counter(delivered.read_text().split())
    assert 3000 <= len(first) < 10_000, "the kill did not land mid-run"
    con = sqlite3.connect(journal)
    ident = {f"c:{content_digest(i)}:0": str(i) for i in range(10_000)}
    rows = con.execute("SELECT item FROM outputs WHERE node='sink'")
    finished = {ident[row[0]] for row in rows}
    con.close()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    skipped = int(done.stdout.split()[-1])
    assert skipped == len(finished)
    delivered_ids = Counter(delivered.read_text().split())
    assert set(delivered_ids) == {str(i) for i in range(10_000)}
    assert set(delivered_ids.values()) == {1}, "an item reached the sink twice"
    computed_ids = Counter(computed.read_text().split())
    assert set(computed_ids) == {str(i) for i in range(10_000)}
    recomputed = [i for i in finished if computed_ids[i] != 1]
    assert not recomputed, f"finished items computed again: {recomputed[:10]}"
