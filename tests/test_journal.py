"""Resumable runs: a journal so that no finished work is lost or redone."""

from __future__ import annotations

import ctypes
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import pytest

from papy import Failure, JournalError, Pipeline, ProcessPool, ThreadPool
from papy._journal.digest import content_digest

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
    assert pipe.last_report.failure_counts == {"flaky": {"ValueError": 2}}
    again = list(pipe.map(range(10), journal=journal, errors="yield"))
    assert [o.item for o in again if isinstance(o, Failure)] == [3, 7]  # replayed as failures
    report = pipe.last_report
    assert report.skipped == 10 and report.nodes["flaky"].failed == 0  # nothing ran again
    assert report.failure_counts == {"flaky": {"ValueError": 2}}  # the replayed ones
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


# -- identity: an item never gets another item's output ---------------------------------------


def upper_logged(log: Path):
    def upper(s):
        with open(log, "a") as fh:
            fh.write(f"{s}\n")
        return s.upper()

    return upper


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_inserted_removed_reordered_edited_and_repeated_inputs_get_their_own_outputs(
    tmp_path, kind
):
    log = tmp_path / "computed.txt"
    journal = tmp_path / "run.db"
    pool = ThreadPool(2) if kind == "thread" else ProcessPool(2)
    with pool:
        pipe = Pipeline("fruit", pool=pool)
        pipe.add(upper_logged(log), name="upper")
        runs = [
            ["apple", "banana", "cherry"],
            ["avocado", "apple", "banana", "cherry"],  # inserted at the top
            ["apple", "cherry"],  # removed
            ["cherry", "avocado", "banana", "apple"],  # reordered
            ["cherry", "avocado", "BANANA!", "apple"],  # edited
            ["apple", "apple", "cherry", "apple"],  # repeated
        ]
        for items in runs:
            assert list(pipe.map(items, journal=journal)) == [s.upper() for s in items]
        assert pipe.last_report is not None and pipe.last_report.skipped == 2
    computed = Counter(log.read_text().split())
    # each distinct (value, occurrence) computed once over all runs
    assert computed == {"apple": 3, "banana": 1, "cherry": 1, "avocado": 1, "BANANA!": 1}


def test_a_journal_written_with_key_and_read_without_it_never_mixes_outputs(tmp_path):
    journal = tmp_path / "run.db"
    pipe = Pipeline("k", pool=ThreadPool(2))
    pipe.add(lambda x: x * 3, name="triple")
    assert list(pipe.map(range(20), journal=journal, key=lambda x: x)) == [x * 3 for x in range(20)]
    shuffled = [7, 3, 19, 0, 12, 5]
    assert list(pipe.map(shuffled, journal=journal)) == [x * 3 for x in shuffled]
    assert list(pipe.map(shuffled[::-1], journal=journal, key=lambda x: x)) == [
        x * 3 for x in shuffled[::-1]
    ]
    assert pipe.last_report is not None and pipe.last_report.skipped == len(shuffled)


def test_duplicate_keys_are_refused_naming_the_key_before_any_output_is_used(tmp_path):
    journal = tmp_path / "run.db"
    pipe = Pipeline("dup", pool=ThreadPool(2))
    pipe.add(lambda x: x * 10, name="work")
    assert list(pipe.map(range(7), journal=journal, key=lambda x: x % 7)) == [
        x * 10 for x in range(7)
    ]
    with pytest.raises(JournalError, match=r"key 0 is given to more than one input item"):
        list(pipe.map(range(15), journal=journal, key=lambda x: x % 7))
    delivered = []
    with pytest.raises(JournalError, match="key 3"):
        for v in pipe.map([3, 10], journal=journal, key=lambda x: x % 7):
            delivered.append(v)
    assert 100 not in delivered and 30 not in delivered  # item 10 never got item 3's output


# -- code identity and the per-node cache ------------------------------------------------------


def _logger(log: Path, name: str):
    def note(x):
        with open(log, "a") as fh:
            fh.write(f"{name} {x}\n")

    return note


def _calls(log: Path) -> Counter:
    if not log.exists():
        return Counter()
    return Counter(line.split()[0] for line in log.read_text().splitlines())


def _three(log: Path, *, clean=None, score=None, summary=None, score_args=(), pool=None):
    note_clean, note_score, note_sum = (_logger(log, n) for n in ("clean", "score", "summary"))

    def clean_v1(x):
        note_clean(x)
        return x + 1

    def score_v1(x, weight=2):
        note_score(x)
        return x * weight

    def summary_v1(x):
        note_sum(x)
        return f"{x}"

    pipe = Pipeline("three", pool=pool or ThreadPool(2))
    a = pipe.add(clean or clean_v1, name="clean", cache=True)
    b = pipe.add(score or score_v1, after=a, name="score", cache=True, args=score_args)
    pipe.add(summary or summary_v1, after=b, name="summary")
    return pipe, (note_clean, note_score, note_sum)


def test_a_changed_node_is_recomputed_with_its_descendants_and_cached_upstream_is_reused(
    tmp_path, caplog
):
    log = tmp_path / "calls.txt"
    journal = tmp_path / "run.db"
    items = list(range(30))
    pipe, (note_clean, note_score, note_sum) = _three(log)
    assert list(pipe.map(items, journal=journal)) == [str((x + 1) * 2) for x in items]
    assert _calls(log) == {"clean": 30, "score": 30, "summary": 30}

    # 1. the last node's body changes: only it runs again
    def summary(x):
        note_sum(x)
        return f"<{x}>"

    log.unlink()
    pipe, _ = _three(log, summary=summary)
    with caplog.at_level("WARNING", logger="papy"):
        assert list(pipe.map(items, journal=journal)) == [f"<{(x + 1) * 2}>" for x in items]
    assert _calls(log) == {"summary": 30}
    assert "node 'summary': function body changed" in caplog.text
    assert pipe.last_report is not None
    assert pipe.last_report.changed == {"summary": "function body changed"}
    assert "node 'summary': function body changed" in pipe.last_report.table()

    # 2. a default changes in the middle: that node and below
    def score_v1(x, weight=3):
        note_score(x)
        return x * weight

    log.unlink()
    pipe, _ = _three(log, score=score_v1, summary=summary)
    assert list(pipe.map(items, journal=journal)) == [f"<{(x + 1) * 3}>" for x in items]
    assert _calls(log) == {"score": 30, "summary": 30}
    assert pipe.last_report is not None
    assert pipe.last_report.changed == {
        "score": "defaults changed",
        "summary": "upstream node 'score' changed",
    }

    # 3. args change: the same
    log.unlink()
    pipe, _ = _three(log, score=score_v1, summary=summary, score_args=(5,))
    assert list(pipe.map(items, journal=journal)) == [f"<{(x + 1) * 5}>" for x in items]
    assert _calls(log) == {"score": 30, "summary": 30}
    assert pipe.last_report is not None and pipe.last_report.changed["score"] == "args changed"

    # 4. a closure value of the first node changes: everything
    def make_clean(step):
        def clean_v1(x):
            note_clean(x)
            return x + step

        return clean_v1

    log.unlink()
    pipe, _ = _three(log, clean=make_clean(1), score=score_v1, summary=summary, score_args=(5,))
    list(pipe.map(items, journal=journal))
    log.unlink()
    pipe, _ = _three(log, clean=make_clean(2), score=score_v1, summary=summary, score_args=(5,))
    assert list(pipe.map(items, journal=journal)) == [f"<{(x + 2) * 5}>" for x in items]
    assert _calls(log) == {"clean": 30, "score": 30, "summary": 30}
    assert pipe.last_report is not None
    assert pipe.last_report.changed["clean"] == "closure values changed"

    # 5. new input items: only they run, through every node
    log.unlink()
    pipe, _ = _three(log, clean=make_clean(2), score=score_v1, summary=summary, score_args=(5,))
    more = items + list(range(100, 110))
    assert list(pipe.map(more, journal=journal)) == [f"<{(x + 2) * 5}>" for x in more]
    assert _calls(log) == {"clean": 10, "score": 10, "summary": 10}


def test_the_cache_works_in_worker_processes_and_across_fused_nodes(tmp_path):
    log = tmp_path / "calls.txt"
    journal = tmp_path / "run.db"
    with ProcessPool(2) as pool:
        pipe, _ = _three(log, pool=pool)
        assert list(pipe.map(range(50), journal=journal)) == [str((x + 1) * 2) for x in range(50)]

        def summary(x):
            return f"={x}"

        log.unlink()
        pipe, _ = _three(log, summary=summary, pool=pool)
        assert list(pipe.map(range(50), journal=journal)) == [f"={(x + 1) * 2}" for x in range(50)]
    assert _calls(log) == {}  # clean and score came from the journal


# -- one writer, one file, errors about the place --------------------------------------------

_SLOW = textwrap.dedent(
    """
    import sys, time
    from papy import Pipeline, ThreadPool

    delivered, journal, n = sys.argv[1], sys.argv[2], int(sys.argv[3])

    def sink(x):
        time.sleep(0.002)
        with open(delivered, "a") as fh:
            fh.write(f"{x}\\n")
        return x

    if __name__ == "__main__":
        pipe = Pipeline("slow", pool=ThreadPool(2))
        pipe.add(sink, name="sink", batch=8)
        print("STARTED", flush=True)
        report = pipe.run(range(n), journal=journal, progress=False)
        print("SKIPPED", report.skipped, flush=True)
    """
)


def test_a_second_run_on_a_journal_in_use_is_refused_at_once_naming_the_first(tmp_path):
    script = tmp_path / "slow.py"
    script.write_text(_SLOW)
    delivered, journal = tmp_path / "delivered", tmp_path / "run.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, str(script), str(delivered), str(journal), "1500"]
    first = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (delivered.exists() and delivered.read_text()) and time.monotonic() < deadline:
        time.sleep(0.01)
    t0 = time.monotonic()
    second = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert second.returncode != 0
    assert "JournalError" in second.stderr
    assert f"in use by another run (pid {first.pid} on host" in second.stderr
    assert time.monotonic() - t0 < 30  # at once, not after the first run
    assert first.wait(timeout=120) == 0
    lines = delivered.read_text().split()
    assert sorted(map(int, lines)) == list(range(1500))  # nobody saw an item twice
    # the same process cannot run twice on one journal either
    pipe = Pipeline("again", pool=ThreadPool(1))
    pipe.add(abs, name="sink")
    it = pipe.map([1, 2, 3], journal=journal)
    next(it)
    with pytest.raises(JournalError, match="in use by another run"):
        list(pipe.map([1], journal=journal))
    it.close()
    assert list(pipe.map([1, 2, 3], journal=journal)) == [1, 2, 3]


def test_two_runs_started_at_once_on_a_new_journal_never_both_run(tmp_path):
    script = tmp_path / "slow.py"
    script.write_text(_SLOW)
    delivered, journal = tmp_path / "delivered", tmp_path / "run.db"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, str(script), str(delivered), str(journal), "300"]
    procs = [
        subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    results = [(p.wait(timeout=120), *p.communicate()) for p in procs]
    ok = [r for r in results if r[0] == 0]
    refused = [r for r in results if r[0] != 0]
    assert ok, results
    for _, _, err in refused:
        assert "in use by another run (pid" in err, err  # never a false "different pipeline"
    counts = Counter(delivered.read_text().split())
    assert set(counts) == {str(i) for i in range(300)}
    assert set(counts.values()) == {1}


def test_a_finished_journal_is_one_self_contained_file(tmp_path):
    journal = tmp_path / "run.db"
    pipe = Pipeline("one", pool=ThreadPool(2))
    pipe.add(lambda x: x + 1, name="inc")
    assert list(pipe.map(range(500), journal=journal)) == list(range(1, 501))
    assert not Path(f"{journal}-wal").exists() or Path(f"{journal}-wal").stat().st_size == 0
    elsewhere = tmp_path / "copy"
    elsewhere.mkdir()
    (elsewhere / "run.db").write_bytes(journal.read_bytes())  # the file alone
    assert list(pipe.map(range(500), journal=elsewhere / "run.db")) == list(range(1, 501))
    assert pipe.last_report is not None and pipe.last_report.skipped == 500


def test_a_journal_removed_or_replaced_during_the_run_stops_it(tmp_path):
    journal = tmp_path / "run.db"

    def remove_at_50(x):
        if x == 50:
            journal.unlink()
        time.sleep(0.005)
        return x

    pipe = Pipeline("gone", pool=ThreadPool(2))
    pipe.add(remove_at_50, name="work", batch=4)
    with pytest.raises(JournalError, match="was removed during the run"):
        list(pipe.map(range(400), journal=journal))

    other = tmp_path / "other.db"

    def replace_at_50(x):
        if x == 50:
            other.write_bytes(b"")
            os.replace(other, journal)
        time.sleep(0.005)
        return x

    pipe = Pipeline("replaced", pool=ThreadPool(2))
    pipe.add(replace_at_50, name="work", batch=4)
    journal.unlink(missing_ok=True)
    with pytest.raises(JournalError, match="was replaced by another file"):
        list(pipe.map(range(400), journal=journal))


def _replace_file_at_50(journal: str, other: str):  # type: ignore[no-untyped-def]
    def replace_at_50(x: int) -> int:
        if x == 50:
            Path(other).write_bytes(b"")
            os.replace(other, journal)
        time.sleep(0.005)
        return x

    return replace_at_50


def test_a_journal_replaced_under_process_workers_stops_the_run_without_killing_them(tmp_path):
    # A worker whose journal failed let the error escape its task: it died (19 workers in
    # one run), and where the driver saw nothing wrong its items were reported as crashes.
    journal = tmp_path / "run.db"
    with ProcessPool(2) as pool:
        pipe = Pipeline("replaced", pool=pool)
        pipe.add(_replace_file_at_50(str(journal), str(tmp_path / "other.db")), batch=4)
        with pytest.raises(JournalError, match="was replaced by another file"):
            list(pipe.map(range(400), journal=journal))
        assert pool.restarts == 0
        journal.unlink()
        assert list(pipe.map(range(10), journal=tmp_path / "again.db")) == list(range(10))


def _swap_in_at_30(journal: str, other: str):  # type: ignore[no-untyped-def]
    def swap_in_at_30(x: int) -> int:
        if x == 30 and os.path.exists(other):  # once
            os.replace(other, journal)  # another pipeline's journal takes the name
        time.sleep(0.002)
        return x * 2

    return swap_in_at_30


def _other_journal(path: Path) -> None:
    other = Pipeline("other", pool=ThreadPool(2))
    other.add(lambda x: str(x) * 3, name="h")
    assert other.run(range(500), journal=path).items == 500


def _stored(path: Path) -> dict[str, int]:
    from papy._journal.admin import describe

    return {n["name"]: n["done"] for n in describe(str(path))["nodes"]}


def _stopped_by_a_swap(tmp_path: Path, pool: ProcessPool) -> tuple[Pipeline, Path]:
    """Run a pipeline on ``pool`` whose node swaps another journal in at item 30; return
    the pipeline and the journal's path once the run has stopped."""
    journal, other = tmp_path / "run.db", tmp_path / "other.db"
    _other_journal(other)
    pipe = Pipeline("swapped", pool=pool)
    pipe.add(_swap_in_at_30(str(journal), str(other)), name="work", batch=4)
    with pytest.raises(JournalError, match="was replaced by another file"):
        pipe.run(range(300), journal=journal)
    return pipe, journal


def test_a_journal_swapped_in_during_a_run_keeps_its_own_records(tmp_path, caplog):
    # The stopped run left the old file's write-ahead log next to the new file, and the
    # next open (papy journal show included) applied it: the other journal's 500 records
    # were gone, replaced by the stopped run's.
    with ProcessPool(2) as pool:
        _, journal = _stopped_by_a_swap(tmp_path, pool)
    assert _stored(journal) == {"h": 500}
    wal = tmp_path / "run.db-wal"  # folded into the old file by the stopped run itself
    assert not wal.exists() or wal.stat().st_size == 0
    again = Pipeline("other", pool=ThreadPool(2))
    again.add(lambda x: str(x) * 3, name="h")
    assert again.run(range(500), journal=journal).skipped == 500


_SWAP_THEN_DIE = textwrap.dedent(
    """
    import os, sys
    from papy import Pipeline, ThreadPool

    journal, other = sys.argv[1], sys.argv[2]
    pipe = Pipeline("swapped", pool=ThreadPool(2))
    pipe.add(lambda x: x * 2, name="work", batch=4)
    for i, _ in enumerate(pipe.map(range(3000), journal=journal)):
        if i == 1000:
            os.replace(other, journal)  # another journal takes the name...
            os._exit(0)  # ...and the driver dies before it could fold its log
    """
)


@pytest.mark.parametrize("opener", ["run", "papy journal show"])
def test_a_log_a_dead_run_left_is_never_applied_to_the_journal_swapped_in(tmp_path, opener):
    # The dead run's log (records it committed, not yet folded into its file) is named
    # after the path: the next open would apply it to the journal that has the name now.
    script, journal, other = tmp_path / "die.py", tmp_path / "run.db", tmp_path / "other.db"
    script.write_text(_SWAP_THEN_DIE)
    _other_journal(other)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(script), str(journal), str(other)], env=env, timeout=120
    )
    assert done.returncode == 0
    assert (tmp_path / "run.db-wal").stat().st_size > 0  # the dead run's commits
    if opener == "run":
        again = Pipeline("other", pool=ThreadPool(2))
        again.add(lambda x: str(x) * 3, name="h")
        assert again.run(range(500), journal=journal).skipped == 500
    assert _stored(journal) == {"h": 500}
    assert [p.name for p in tmp_path.glob("run.db-wal.of-inode-*")]


_LOCK_FILE_REMOVED = textwrap.dedent(
    """
    import os, sys, time
    from papy import Pipeline, ThreadPool

    journal, ready, go = sys.argv[1], sys.argv[2], sys.argv[3]

    def work(x):
        if x == 10:
            os.unlink(journal + ".lock")  # a clean-up job, or a user, removes it
            open(ready, "w").close()
            while not os.path.exists(go):
                time.sleep(0.01)
        return x * 2

    pipe = Pipeline("first", pool=ThreadPool(2))
    pipe.add(work, name="work", batch=1)
    print("ITEMS", pipe.run(range(300), journal=journal).items)
    """
)


@pytest.mark.timeout(120)
def test_a_second_run_cannot_start_when_the_lock_file_was_removed_during_the_first(tmp_path):
    # With its lock file removed, a second run made a new one and ran beside the first on
    # the same journal: 188-236 of 300 items ran twice, their side effects repeated.
    script, journal = tmp_path / "first.py", tmp_path / "run.db"
    ready, go = tmp_path / "ready", tmp_path / "go"
    script.write_text(_LOCK_FILE_REMOVED)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    argv = [sys.executable, str(script), str(journal), str(ready), str(go)]
    first = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ready.exists()
        second = Pipeline("second", pool=ThreadPool(2))
        second.add(lambda x: x * 2, name="work")
        with pytest.raises(JournalError, match="lock file .* was removed or replaced"):
            second.run(range(300), journal=journal)
    finally:
        go.touch()
        out, _ = first.communicate(timeout=60)
    assert first.returncode == 0 and "ITEMS 300" in out
    assert second.run(range(300), journal=journal).items == 300  # free once the first ended


def test_a_pool_reused_after_a_journal_swap_keeps_the_next_runs_records(tmp_path):
    # The pool's worker keeps its connection to the replaced file until the next run's first
    # task, and closes it then: the next run's own log and records must survive that.
    with ProcessPool(1) as pool:
        pipe, journal = _stopped_by_a_swap(tmp_path, pool)
        assert pipe.run(range(300), journal=journal).items == 300  # the worker lets go here
        assert pipe.run(range(300), journal=journal).skipped == 300
    assert _stored(journal) == {"h": 500, "work": 300}


def _rename_at_30(journal: str, away: str, crash: bool = False):  # type: ignore[no-untyped-def]
    def rename_at_30(x: int) -> int:
        if x == 30 and not os.path.exists(away + ".done"):
            open(away + ".done", "w").close()  # once
            os.replace(journal, away)
            if crash:  # its fork pool forks a replacement: the driver's connection closes
                os._exit(7)
        time.sleep(0.002)
        return x * 2

    return rename_at_30


@pytest.mark.parametrize("pool", ["thread", "process", "fork pool, the worker crashes"])
@pytest.mark.parametrize("then", ["moved back", "used where it went"])
def test_a_journal_renamed_away_during_a_run_keeps_what_the_run_recorded(tmp_path, pool, then):
    # The stopped run moved its own write-ahead log aside, as if another file's: the
    # journal, moved back (or used where it went), lost every commit still in the log
    # ("not a papy journal" for a new journal; recorded items run again otherwise). With
    # a fork pool replacing a crashed worker, the driver's connection was closed for the
    # fork, so the log cannot be folded through it: it is set aside whole, not lost.
    journal, away = tmp_path / "run.db", tmp_path / "away.db"
    crash = pool.startswith("fork")
    if pool == "thread":
        workers: Any = ThreadPool(2)
    else:
        workers = ProcessPool(2, start_method="fork" if crash else None)
    with workers:
        pipe = Pipeline("renamed", pool=workers)
        pipe.add(_rename_at_30(str(journal), str(away), crash), name="work", batch=4)
        with pytest.raises(JournalError, match="was removed"):
            pipe.run(range(300), journal=journal)
        if crash:  # its log was folded before the fork, or it is set aside whole
            aside = list(tmp_path.glob("run.db-wal.of-inode-*"))
            if aside:
                assert aside[0].stat().st_size > 0
                assert aside[0].name.endswith(str(away.stat().st_ino))
            else:
                assert _stored(away)["work"] > 0
            return
        if then == "moved back":
            os.replace(away, journal)
        else:
            journal = away
        recorded = _stored(journal)["work"]
        assert recorded > 0
        again = pipe.run(range(300), journal=journal)
        # and those its sinks recorded beside the journal (folded in by this run)
        assert again.items == 300 and again.skipped >= recorded
    assert _stored(journal) == {"work": 300}


def _sink_renaming_at_10(journal: str, away: str, effects: str):  # type: ignore[no-untyped-def]
    def sink(x: int) -> int:
        with open(effects, "a") as fh:
            fh.write(f"{x}\n")  # the side effect
        if x == 10 and not os.path.exists(away + ".done"):
            open(away + ".done", "w").close()
            os.replace(journal, away)  # its batch-mates' records cannot be committed now
        return x

    return sink


@pytest.mark.parametrize("then", ["moved back", "used where it went"])
def test_a_sinks_pending_records_stay_with_the_journal_file_they_belong_to(tmp_path, then):
    # A run stopped by its journal renamed away left its sink batch's records in a pending
    # file named after the path; the next run of another pipeline at that path folded them
    # into its own new journal, and the renamed journal, resumed, ran those items again:
    # their side effects repeated.
    journal, away, effects = tmp_path / "run.db", tmp_path / "away.db", tmp_path / "effects"
    pipe = Pipeline("sunk", pool=ThreadPool(2))
    pipe.add(_sink_renaming_at_10(str(journal), str(away), str(effects)), name="sink", batch=4)
    with pytest.raises(JournalError, match="was removed"):
        pipe.run(range(100), journal=journal)
    other = Pipeline("other", pool=ThreadPool(2))
    other.add(lambda x: -x, name="neg")
    assert other.run(range(5), journal=journal).items == 5  # a new journal at the path
    assert _stored(journal) == {"neg": 5}  # and none of the stopped run's records
    if then == "moved back":
        os.replace(journal, tmp_path / "other.db")
        os.replace(away, journal)
    else:
        journal = away
    pipe.run(range(100), journal=journal)
    done = Counter(effects.read_text().split())
    assert set(done) == {str(x) for x in range(100)}
    assert set(done.values()) == {1}, [x for x, k in done.items() if k > 1]


def _slow_sink(effects: str):  # type: ignore[no-untyped-def]
    def sink(x: int) -> int:
        time.sleep(0.03)
        with open(effects, "a") as fh:
            fh.write(f"{x}\n")  # the side effect, then the record
        return x

    return sink


def _leave_early(pipe: Pipeline, journal: Path, n: int, read: int, by_signal: bool) -> None:
    """Leave a journaled run of ``n`` items early: after ``read`` outputs (the caller
    stops reading), or by a real SIGINT 0.3 s in."""
    if by_signal:
        threading.Timer(0.3, signal.raise_signal, (signal.SIGINT,)).start()
        with pytest.raises(KeyboardInterrupt):
            pipe.run(range(n), journal=journal)
        return
    outputs = pipe.map(range(n), journal=journal, errors="yield")
    for _ in zip(range(read), outputs):
        pass
    outputs.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize("how", ["map left early", "interrupted"])
def test_a_run_right_after_one_left_early_on_threads_waits_for_its_tasks(tmp_path, how):
    # A thread pool lets a run left early finish the tasks it started: their sinks did
    # their side effects after the next run had read what the journal held, and that run
    # did them again (3-6 items twice in 8 of 11 tries).
    journal, effects = tmp_path / "run.db", tmp_path / "effects"
    with ThreadPool(4) as pool:
        pipe = Pipeline("early", pool=pool)
        pipe.add(_slow_sink(str(effects)), name="sink", batch=1)
        _leave_early(pipe, journal, 200, 20, by_signal=how != "map left early")
        assert sorted(pipe.map(range(200), journal=journal)) == list(range(200))
    done = Counter(effects.read_text().split())
    assert set(done) == {str(x) for x in range(200)}
    assert set(done.values()) == {1}, sorted(int(x) for x, k in done.items() if k > 1)


def _sink_hanging_on_5(effects: str):  # type: ignore[no-untyped-def]
    def sink(x: int) -> int:
        with open(effects, "a") as fh:
            fh.write(f"{x}\n")  # the side effect, then (item 5) a hang past the timeout
        if x == 5:
            time.sleep(3)
        return x

    return sink


@pytest.mark.parametrize("batch", [4, 16])
def test_a_thread_given_up_on_does_not_make_its_batch_mates_side_effects_repeat(tmp_path, batch):
    # The batch-mates a thread had finished before its late item were re-run on another
    # thread: their records sat in the abandoned thread's pending file, which nothing
    # folded in while its thread lived (2-34 items twice in 7 of 7 runs).
    journal, effects = tmp_path / "run.db", tmp_path / "effects"
    with ThreadPool(2) as pool:
        pipe = Pipeline("late", pool=pool)
        pipe.add(_sink_hanging_on_5(str(effects)), name="sink", batch=batch, timeout=1.0)
        out = list(pipe.map(range(40), journal=journal, errors="yield"))
    assert [o for o in out if not isinstance(o, Failure)] == [x for x in range(40) if x != 5]
    assert [(o.item, o.exc_type) for o in out if isinstance(o, Failure)] == [(5, "TimeoutError")]
    done = Counter(effects.read_text().split())
    assert set(done) == {str(x) for x in range(40)}
    assert set(done.values()) == {1}, sorted(int(x) for x, k in done.items() if k > 1)


def _recording(effects: str, slow: set[int], slow_s: float):  # type: ignore[no-untyped-def]
    def fn(x: int) -> int:
        time.sleep(slow_s if x in slow else 0.01)
        with open(effects, "a") as fh:
            fh.write(f"{x}\n")  # the side effect, after the (late) work
        return x

    return fn


@pytest.mark.parametrize("late_in", ["sink", "node before the sink"])
def test_a_thread_that_ends_its_late_item_as_the_pool_gives_up_starts_nothing_more(
    tmp_path, monkeypatch, late_in
):
    # The watchdog judged item 0 late, but before it gave up on the task, the thread had
    # finished item 0 and started the next item's sink; the pool then re-ran that item on
    # another thread: two side effects in one run, nothing reported (1 of 15 runs; 3 of 3
    # with the watchdog 30 ms slower). The delay below is the watchdog being descheduled.
    import papy.pools.thread as thread_pool

    give_up = thread_pool._abandon

    def slow_watchdog(*args: Any) -> None:
        time.sleep(0.05)
        give_up(*args)

    monkeypatch.setattr(thread_pool, "_abandon", slow_watchdog)
    journal, effects = tmp_path / "run.db", tmp_path / "effects"
    sink = _recording(str(effects), {0}, 0.32)
    with ThreadPool(2) as pool:
        pipe = Pipeline("late", pool=pool)
        if late_in == "sink":
            pipe.add(sink, name="sink", batch=8, timeout=0.3)
        else:
            up = pipe.add(_recording(str(tmp_path / "up"), {0}, 0.32), batch=8, timeout=0.3)
            pipe.add(_recording(str(effects), set(), 0), after=up, name="sink", batch=8)
        out = list(pipe.map(range(8), journal=journal, errors="yield"))
        again = list(pipe.map(range(8), journal=journal, errors="yield"))
    ok = [o for o in out if not isinstance(o, Failure)]
    assert ok == [x for x in range(8) if x in ok] and len(out) == 8
    assert all(o.exc_type == "TimeoutError" for o in out if isinstance(o, Failure))
    assert again == out  # replayed, nothing run again
    done = Counter(effects.read_text().split())
    assert set(done.values()) == {1}, done
    assert set(done) >= {str(x) for x in range(1, 8)}


@pytest.mark.parametrize("stop", ["break", "SIGINT"])
def test_a_sink_item_that_timed_out_in_a_run_left_early_is_not_called_again(tmp_path, stop):
    # Its TimeoutError was recorded only by the re-run of its batch-mates, which could
    # not write to the journal of a run that had ended: the next run called the sink
    # again while the late call still ran (2 side effects in 7 of 7 runs; 3 after a
    # break, an interrupt and a full run).
    journal, effects = tmp_path / "run.db", tmp_path / "effects"
    slow = {12, 13, 17, 24, 31, 38}
    with ThreadPool(4) as pool:
        pipe = Pipeline("left", pool=pool)
        pipe.add(_recording(str(effects), slow, 0.5), name="sink", batch=2, timeout=0.15)
        _leave_early(pipe, journal, 60, 10, by_signal=stop != "break")
        out = list(pipe.map(range(60), journal=journal, errors="yield"))
        time.sleep(0.6)  # every late call has ended
    failed = {o.item for o in out if isinstance(o, Failure)}
    assert failed <= slow
    assert all(o.exc_type == "TimeoutError" for o in out if isinstance(o, Failure))
    assert [o for o in out if not isinstance(o, Failure)] == [
        x for x in range(60) if x not in failed
    ]
    done = Counter(effects.read_text().split())
    assert set(done) == {str(x) for x in range(60)}
    assert set(done.values()) == {1}, sorted(int(x) for x, k in done.items() if k > 1)


def _double(x: int) -> int:
    return x * 2


@pytest.mark.parametrize("at", ["checkpointer", "lock"])
def test_a_ctrl_c_while_a_run_closes_its_journal_leaves_it_usable(tmp_path, monkeypatch, at):
    # A SIGINT that landed while the run closed its journal (waiting for the checkpoint
    # thread) cut the close short: the run's lock stayed held, and every later run in the
    # process failed "in use by another run" with its own pid (found at 1 of 14 runs).
    from papy._journal import checkpoint
    from papy._journal import journal as journal_module

    target = (
        (checkpoint.Checkpointer, "stop")
        if at == "checkpointer"
        else (journal_module.Journal, "_release")
    )
    original = getattr(*target)

    def interrupted(self: Any) -> None:
        signal.raise_signal(signal.SIGINT)  # the handler runs at the next bytecode
        original(self)

    journal = tmp_path / "run.db"
    with ThreadPool(2) as pool:
        pipe = Pipeline("closing", pool=pool)
        pipe.add(_double, name="f")
        monkeypatch.setattr(*target, interrupted)
        with pytest.raises(KeyboardInterrupt):
            pipe.run(range(20), journal=journal)
        monkeypatch.setattr(*target, original)
        assert list(pipe.map(range(20), journal=journal)) == [2 * x for x in range(20)]


def test_a_ctrl_c_while_the_run_submits_to_a_thread_pool_leaves_the_pool_working(monkeypatch):
    # A SIGINT that landed inside the pool's submit (in Condition.__enter__, after its
    # lock was taken) left that lock held: the pool's threads waited for it forever and
    # every later run on the pool hung (1 of 6 processes of 14 interrupted runs each).
    import papy.pools.thread as thread_pool

    put = thread_pool._State.put
    calls = [0]

    def interrupted(self: Any, running: Any) -> None:
        calls[0] += 1
        if calls[0] == 3:
            signal.raise_signal(signal.SIGINT)  # the handler runs at the next bytecode
        put(self, running)

    with ThreadPool(2) as pool:
        pipe = Pipeline("submitting", pool=pool)
        pipe.add(_double, name="f", batch=1)
        monkeypatch.setattr(thread_pool._State, "put", interrupted)
        with pytest.raises(KeyboardInterrupt):
            pipe.run(range(50))
        monkeypatch.setattr(thread_pool._State, "put", put)
        assert list(pipe.map(range(50))) == [2 * x for x in range(50)]


def _fork_a_lingering_child_on_3(pids: str, how: str):  # type: ignore[no-untyped-def]
    def fn(x: int) -> int:
        if x == 3:
            # libc's fork, called directly, runs none of Python's at-fork handlers
            pid = os.fork() if how == "os.fork" else ctypes.PyDLL(None).fork()
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            with open(pids, "a") as fh:
                fh.write(f"{pid}\n")
        return x * 2

    return fn


@pytest.mark.parametrize("how", ["os.fork", "libc fork"])
def test_a_child_a_node_forked_does_not_keep_the_journal_locked(tmp_path, how):
    # The run's lock is on an open file description that a forked child shares: the next
    # run failed with "in use by another run (pid ?...)" for as long as the child lived.
    journal, pids = tmp_path / "run.db", tmp_path / "children"
    pipe = Pipeline("linger", pool=ThreadPool(2))
    pipe.add(_fork_a_lingering_child_on_3(str(pids), how), name="f")
    try:
        with pipe.pool:
            assert pipe.run(range(10), journal=journal).items == 10
            assert pipe.run(range(12), journal=journal).skipped == 10
    finally:
        for pid in map(int, pids.read_text().split()):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


def test_journal_in_a_missing_directory_names_the_cause(tmp_path):
    pipe = Pipeline("p", pool=ThreadPool(1))
    pipe.add(abs)
    with pytest.raises(JournalError, match="directory .*nowhere does not exist"):
        list(pipe.map([1], journal=tmp_path / "nowhere" / "run.db"))


# -- papy journal ----------------------------------------------------------------------------


def test_papy_journal_show_failures_and_forget(tmp_path):
    from click.testing import CliRunner

    from papy.cli import main

    log = tmp_path / "calls.txt"
    journal = tmp_path / "run.db"
    note = _logger(log, "score")

    def score(x):
        note(x)
        if x == 4:
            raise ValueError("four is not allowed")
        return x * 2

    def build():
        pipe = Pipeline("cli", pool=ThreadPool(2))
        a = pipe.add(lambda x: x + 1, name="clean", cache=True)
        b = pipe.add(score, after=a, name="score", cache=True)
        pipe.add(str, after=b, name="summary")
        return pipe

    list(build().map(range(10), journal=journal, errors="skip"))
    runner = CliRunner()
    shown = runner.invoke(main, ["journal", "show", str(journal)])
    assert shown.exit_code == 0, shown.output
    lines = {line.split()[0]: line.split() for line in shown.output.splitlines() if line}
    assert "pipeline" in lines and lines["pipeline"][1] == "cli"
    assert lines["clean"][2:5] == ["cached", "10", "0"]
    assert lines["score"][2:5] == ["cached", "9", "1"]
    assert lines["summary"][2:5] == ["terminal", "9", "1"]
    as_json = runner.invoke(main, ["journal", "show", "--json", str(journal)])
    import json

    info = json.loads(as_json.output)
    assert info["size"] == journal.stat().st_size
    assert all(len(n["fingerprint"]) == 40 and n["bytes"] > 0 for n in info["nodes"])

    failed = runner.invoke(main, ["journal", "failures", str(journal)])
    assert failed.exit_code == 0
    assert "score" in failed.output and "ValueError: four is not allowed" in failed.output

    forgot = runner.invoke(main, ["journal", "forget", str(journal), "--node", "score"])
    assert forgot.exit_code == 0, forgot.output
    assert "'score', 'summary'" in forgot.output
    log.unlink()
    assert list(build().map(range(10), journal=journal, errors="skip")) == [
        str((x + 1) * 2) for x in range(10) if x != 3
    ]
    assert Counter(log.read_text().split()[1::2]) == Counter(str(x + 1) for x in range(10))

    bad = runner.invoke(main, ["journal", "forget", str(journal), "--node", "nope"])
    assert bad.exit_code == 1 and "no node 'nope'" in bad.output
    missing = runner.invoke(main, ["journal", "show", str(tmp_path / "none.db")])
    assert missing.exit_code == 1 and "no journal at" in missing.output


@pytest.mark.parametrize("command", [["show"], ["forget", "--node", "h"]])
def test_papy_journal_on_a_malformed_journal_says_so_in_one_line(tmp_path, command):
    # A damaged page made "papy journal show" print sqlite3's raw traceback.
    from click.testing import CliRunner

    from papy.cli import main

    journal = tmp_path / "run.db"
    pipe = Pipeline("m", pool=ThreadPool(2))
    pipe.add(lambda x: str(x) * 100, name="h")
    assert pipe.run(range(2000), journal=journal).items == 2000
    with open(journal, "r+b") as fh:  # damage the pages after the schema's
        fh.seek(3 * 4096)
        fh.write(b"\xff" * 8192)
    got = CliRunner().invoke(main, ["journal", command[0], str(journal), *command[1:]])
    assert got.exit_code == 1, got.output
    assert "malformed" in got.output and "Traceback" not in got.output, got.output


def test_cached_nodes_below_a_scatter_are_reused_when_the_gather_changes(tmp_path):
    log = tmp_path / "calls.txt"
    journal = tmp_path / "run.db"
    note_split, note_work = _logger(log, "split"), _logger(log, "work")

    def split(x):
        note_split(x)
        return range(x % 5 + 1)

    def work(s):
        note_work(s)
        return s * 10

    def total_v1(xs):
        return sum(xs)

    def total_v2(xs):
        return sum(xs) + 1

    def build(total, pool):
        pipe = Pipeline("sg", pool=pool)
        a = pipe.add(split, scatter=True, cache=True)
        b = pipe.add(work, after=a, cache=True)
        pipe.add(total, after=b, gather=True, name="total")
        return pipe

    expected = [sum(s * 10 for s in range(x % 5 + 1)) for x in range(20)]
    with ProcessPool(2) as pool:
        assert list(build(total_v1, pool).map(range(20), journal=journal)) == expected
        assert _calls(log) == {"split": 20, "work": sum(x % 5 + 1 for x in range(20))}
        log.unlink()
        assert list(build(total_v2, pool).map(range(20), journal=journal)) == [
            e + 1 for e in expected
        ]
    assert _calls(log) == {}


def _open_files_under(folder: Path) -> list[str]:
    """The files under ``folder`` this process has open (from /proc/self/fd)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # the directory's own descriptor, closed meanwhile
        if target.startswith(str(folder)):
            out.append(target)
    return out


def test_runs_on_a_thread_pool_close_every_connection_and_lock_they_open(tmp_path):
    journal = tmp_path / "run.db"
    with ThreadPool(4) as pool:
        pipe = Pipeline("fds", pool=pool)
        a = pipe.add(lambda x: x + 1, name="a", cache=True)
        pipe.add(lambda x: x * 2, name="b", after=a)
        out = tmp_path / "sunk.txt"

        def sink(x):
            with open(out, "a") as fh:
                fh.write(f"{x}\n")

        pipe.add(sink, name="sink", after=a)
        before = len(os.listdir("/proc/self/fd"))
        for run in range(50):
            # every run records new items on several pool threads, and replays the old ones
            got = pipe.map(range(run * 4, run * 4 + 40), journal=journal, output="b")
            assert list(got) == [(x + 1) * 2 for x in range(run * 4, run * 4 + 40)]
            assert _open_files_under(tmp_path) == [], run
        assert len(os.listdir("/proc/self/fd")) <= before  # (an earlier test may close some)
        assert pipe.last_report is not None and pipe.last_report.skipped == 36
    assert sorted(map(int, out.read_text().split())) == list(range(1, 237))


def test_process_workers_close_the_journal_of_a_run_once_it_is_gone(tmp_path):
    with ProcessPool(1) as pool:
        pipe = Pipeline("fds", pool=pool)
        pipe.add(lambda x: x + 1, name="inc")
        for run in range(6):
            journal = tmp_path / f"run{run}.db"
            assert list(pipe.map(range(30), journal=journal)) == list(range(1, 31))
            for p in tmp_path.glob(f"run{run}.db*"):
                p.unlink()  # a journal used once, then thrown away
        (pid,) = pool.pids()
        held = []
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(str(tmp_path)):
                held.append(target)
        # the last run's connection and lock at most; none of the five before it
        assert not [t for t in held if "run5.db" not in t], held


def test_a_pool_forked_during_a_run_does_not_keep_the_journal_in_use(tmp_path):
    journal = tmp_path / "run.db"
    pool = ProcessPool(2, start_method="fork")  # not started yet
    try:
        pipe = Pipeline("forked", pool=pool)
        pipe.add(lambda x: x + 1, name="inc")
        # the pool starts inside the first run: its workers are forked while the run holds
        # the journal's lock, and live on after it
        assert list(pipe.map(range(5), journal=journal)) == [1, 2, 3, 4, 5]
        assert list(pipe.map(range(7), journal=journal)) == list(range(1, 8))
        assert pipe.last_report is not None and pipe.last_report.skipped == 5
    finally:
        pool.close()


def test_a_locked_journal_is_called_locked_not_corrupt(tmp_path):
    from papy._journal.files import sqlite_error

    path = str(tmp_path / "run.db")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    other = sqlite3.connect(path, timeout=0)
    try:
        with pytest.raises(sqlite3.OperationalError) as caught:
            other.execute("SELECT * FROM t").fetchall()
        message = str(sqlite_error(path, caught.value))
        assert "is locked by another connection" in message and "not a papy journal" not in message
    finally:
        other.close()
        holder.close()


def _exits_on_7_mod_20(x: int) -> int:
    if x % 20 == 7:
        os._exit(3)
    return x


@pytest.mark.timeout(120)
def test_a_fork_worker_that_inherits_a_held_sqlite_lock_stops_the_run_instead_of_hanging(
    tmp_path,
):
    # Another thread of the driver uses SQLite outside papy (a program checking a database)
    # while a fork pool replaces crashed workers: a worker forked while that thread held
    # one of SQLite's mutexes waited for good in its first sqlite3.connect.
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            sqlite3.connect(":memory:").close()

    thread = threading.Thread(target=hammer, daemon=True)
    thread.start()
    journal = tmp_path / "run.db"
    try:
        for _ in range(3):
            with ProcessPool(2, start_method="fork") as pool:
                pipe = Pipeline("hammered", pool=pool)
                pipe.add(_exits_on_7_mod_20, name="work", batch=2)
                try:
                    report = pipe.run(range(400), journal=journal)
                except JournalError as exc:  # what a worker that inherited the lock says
                    assert "SQLite waits for good on a lock another thread" in str(exc)
                else:
                    assert (report.items, report.failed) == (400, 20)
    finally:
        stop.set()
        thread.join()


def _exits_on_13_mod_97(x: int) -> tuple[int, str]:
    if x % 97 == 13:
        os._exit(3)
    return x, f"{x:04d}" * 1000  # 4 KB a record: the write-ahead log passes its mark


def test_workers_forked_while_the_journal_is_in_use_neither_hang_nor_corrupt_it(tmp_path):
    # A fork pool the run starts, and replacements forked after each crash, while driver
    # threads (the checkpointer, a thread pool's recorder, the scheduler) use SQLite: such
    # a worker inherited SQLite's record of the driver's locks without the locks, or a
    # mutex held by another thread; the journal was corrupt by the second run, or a
    # replacement hung in sqlite3.connect for good.
    journal = tmp_path / "run.db"
    procs = ProcessPool(2, start_method="fork")  # not started yet
    threads = ThreadPool(2)
    try:
        pipe = Pipeline("forked-replacements", pool=procs)
        work = pipe.add(_exits_on_13_mod_97, name="work", batch=8, cache=True)
        pipe.add(lambda t: t[0], name="first", after=work, pool=threads, cache=True)
        for n in (500, 1000, 1500):
            report = pipe.run(range(n), journal=journal)
            crashers = [x for x in range(n) if x % 97 == 13]
            assert (report.items, report.failed, report.skipped) == (n, len(crashers), n - 500)
            conn = sqlite3.connect(journal)
            try:
                assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            finally:
                conn.close()
        got = list(pipe.map(range(1500), journal=journal, errors="yield"))
        assert pipe.last_report is not None and pipe.last_report.skipped == 1500
        for x, out in enumerate(got):
            if x % 97 == 13:
                assert isinstance(out, Failure) and out.exc_type == "papy.WorkerCrashed"
            else:
                assert out == x
    finally:
        procs.close()
        threads.close()


def test_tasks_running_on_after_a_run_is_stopped_close_their_connections_when_done(tmp_path):
    journal = tmp_path / "run.db"

    def slow(x):
        time.sleep(0.2)
        return x

    with ThreadPool(2) as pool:
        pipe = Pipeline("stopped", pool=pool)
        a = pipe.add(slow, name="slow", cache=True, batch=4)
        pipe.add(lambda x: x, name="out", after=a)
        it = pipe.map(range(40), journal=journal)
        assert next(it) == 0
        it.close()  # the pool's threads finish the tasks they were running, after the run
        deadline = time.monotonic() + 30
        while _open_files_under(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _open_files_under(tmp_path) == []
        assert list(pipe.map(range(40), journal=journal)) == list(range(40))
    assert _open_files_under(tmp_path) == []


def _fails_on_1_and_3(x: int) -> int:
    if x in (1, 3):
        raise ValueError(f"bad {x}")
    return x


def _fails_on_2(x: int) -> int:
    if x == 2:
        raise KeyError(x)
    return x


def test_a_resumed_run_reports_the_failures_it_replays_at_every_sink(tmp_path):
    journal = tmp_path / "run.db"
    with ThreadPool(2) as pool:
        pipe = Pipeline("resume-failures", pool=pool)
        pipe.add(_fails_on_1_and_3, name="work")
        for attempt in range(2):  # the second run skips every item
            report = pipe.run(range(5), journal=journal)
            assert report.skipped == 5 * attempt
            assert (report.items, report.failed) == (5, 2)
            assert report.failure_counts == {"work": {"ValueError": 2}}
            assert [(f.node, f.item) for f in report.failures] == [("work", 1), ("work", 3)]

        journal = tmp_path / "sinks.db"  # two sinks; map() yields one of them
        pipe = Pipeline("two-sinks", pool=pool)
        src = pipe.add(lambda x: x, name="src")
        pipe.add(_fails_on_1_and_3, after=src, name="sa")
        pipe.add(_fails_on_2, after=src, name="sb")
        for attempt in range(2):
            out = list(pipe.map(range(4), output="sa", errors="yield", journal=journal))
            assert [o.item for o in out if isinstance(o, Failure)] == [1, 3]
            report = pipe.last_report
            assert report.skipped == 4 * attempt
            assert report.failed == 3  # items 1 and 3 at sa, 2 at sb
            assert report.failure_counts == {"sa": {"ValueError": 2}, "sb": {"KeyError": 1}}


def _lock_on_1(x: int) -> Any:
    import threading

    return threading.Lock() if x == 1 else x


@pytest.mark.parametrize("kind", ["thread", "process"])
@pytest.mark.parametrize("cache", [False, True])  # the recorded node is a sink, or cached
def test_an_output_that_cannot_be_recorded_fails_its_item_not_the_run(tmp_path, kind, cache):
    journal = tmp_path / "run.db"
    with ThreadPool(2) if kind == "thread" else ProcessPool(2) as pool:
        pipe = Pipeline("unrecordable", pool=pool)
        made = pipe.add(_lock_on_1, name="mk", cache=cache)
        if cache:
            pipe.add(lambda v: "lock" if not isinstance(v, int) else v, after=made, name="tail")
        for attempt in range(2):  # the second run replays what the first recorded
            out = list(pipe.map(range(3), errors="yield", journal=journal))
            assert out[0] == 0 and out[2] == 2
            assert isinstance(out[1], Failure)
            assert (out[1].node, out[1].item, out[1].exc_type) == ("mk", 1, "TypeError")
            assert "cannot be recorded in the journal" in out[1].message
            report = pipe.last_report
            assert report.failure_counts == {"mk": {"TypeError": 1}}
            if attempt == 0:
                assert report.nodes["mk"].failed == 1


#: whether _Rec's records cannot be loaded (mutable state, not part of a fingerprint)
_REC_BROKEN = {"now": False}


class _Rec:
    """A record whose class changed since it was recorded: it cannot be loaded back."""

    def __init__(self, x: int) -> None:
        self.x = x

    def __setstate__(self, state: dict[str, Any]) -> None:
        if _REC_BROKEN["now"] and state["x"] == 1:
            raise AttributeError("_Rec has no field x any more")
        self.__dict__.update(state)


def test_a_cached_record_that_cannot_be_loaded_is_computed_again(tmp_path):
    journal = tmp_path / "run.db"
    calls = tmp_path / "calls"
    calls.write_text("")

    def make(x: int) -> _Rec:
        with open(calls, "a") as fh:
            fh.write(f"{x}\n")
        return _Rec(x)

    with ThreadPool(2) as pool:
        for version in (1, 2):  # a changed consumer: the cached records are read
            pipe = Pipeline("cache-load", pool=pool)
            rec = pipe.add(make, name="make", cache=True)
            pipe.add(eval(f"lambda r: r.x * {version}"), after=rec, name="use")
            _REC_BROKEN["now"] = version == 2
            try:
                assert list(pipe.map(range(3), journal=journal)) == [0, version, 2 * version]
            finally:
                _REC_BROKEN["now"] = False
    assert sorted(calls.read_text().split()) == ["0", "1", "1", "2"]  # item 1 again only


def test_a_journal_path_with_characters_special_in_uris_works(tmp_path):
    # Connections open the journal through an SQLite URI (so they never create the file):
    # spaces, "?", "#" and "%" in the path must name that file, not a query or a fragment.
    folder = tmp_path / "we ird?#%x"
    folder.mkdir()
    journal = folder / "r%20un?.db"
    pipe = Pipeline("uri", pool=ThreadPool(2))
    pipe.add(lambda x: x * 2, name="h")
    assert pipe.run(range(100), journal=journal).items == 100
    assert pipe.run(range(100), journal=journal).skipped == 100
    assert sorted(p.name for p in folder.iterdir()) == ["r%20un?.db", "r%20un?.db.lock"]
    assert _stored(journal) == {"h": 100}


def test_an_sqlite_error_raised_while_a_ctrl_c_unwinds_is_the_ctrl_c(tmp_path):
    # A SIGINT during a journal's open made SQLite fail "cannot rollback - no transaction
    # is active", reported as "not a papy journal ... corrupt: move it away" for a healthy
    # journal (3 processes of 11 interrupted at random).
    from papy._journal.files import sqlite_error

    conn = sqlite3.connect(tmp_path / "run.db")
    with pytest.raises(KeyboardInterrupt):
        try:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                conn.execute("ROLLBACK")  # what a `with conn:` does as the interrupt unwinds
        except sqlite3.Error as exc:
            raise sqlite_error(str(tmp_path / "run.db"), exc) from None
    conn.close()
