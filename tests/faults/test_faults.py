"""Real faults: dead workers, segfaults, hangs, bad items, interruption.

Every test checks that the run ends, every good item is delivered exactly once, every bad
one is reported once with the right cause, and the pool is back to its size.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
from helpers import explode, fail_on_7, inc, live_descendants

from faults.crashers import (
    DriverOnly,
    cpu_ms,
    exit_on,
    flaky_once,
    segfault_on,
    sleep_on,
    unpicklable_result,
)
from papy import (
    Failure,
    InlinePool,
    Pipeline,
    ProcessPool,
    RunAborted,
    ThreadPool,
    WorkerCrashed,
)

ROOT = Path(__file__).resolve().parents[2]


def _split(out):
    good = [o for o in out if not isinstance(o, Failure)]
    bad = [o for o in out if isinstance(o, Failure)]
    return good, bad


def test_sigkill_of_a_worker_mid_batch_loses_nothing():
    with ProcessPool(2) as pool:
        pipe = Pipeline("kill", pool=pool)
        pipe.add(cpu_ms, kwargs={"ms": 2.0}, batch=50)
        out = []
        killed = None
        for o in pipe.map(range(1000), errors="yield"):
            out.append(o)
            if len(out) == 100:
                killed = pool.pids()[0]
                os.kill(killed, signal.SIGKILL)
        assert out == list(range(1000))
        assert pool.restarts >= 1
        pids = pool.pids()
        assert len(pids) == 2 and killed not in pids


@pytest.mark.parametrize("make_bad", [segfault_on, exit_on], ids=["segfault", "os._exit"])
def test_item_that_kills_its_worker_every_time_is_isolated(make_bad):
    bad = {13, 777}
    # faulthandler (on under pytest) would print every crash; the crash is the point here
    with ProcessPool(2, initializer=faulthandler.disable) as pool:
        pipe = Pipeline("poison", pool=pool)
        pipe.add(make_bad(bad), name="risky", batch=64)
        out = list(pipe.map(range(1000), errors="yield"))
        assert len(pool.pids()) == 2
    good, failures = _split(out)
    assert good == [2 * x for x in range(1000) if x not in bad]
    assert sorted(f.item for f in failures) == sorted(bad)
    for f in failures:
        assert f.node == "risky"
        assert f.exc_type == "papy.WorkerCrashed"
        assert isinstance(f.exception, WorkerCrashed)
        if make_bad is segfault_on:
            assert "SIGSEGV" in f.message and f.exception.exitcode == -signal.SIGSEGV
        else:
            assert "exited with code 3" in f.message and f.exception.exitcode == 3


def test_exceptions_in_one_percent_of_items(process_pool):
    pipe = Pipeline("one-percent", pool=process_pool)
    a = pipe.add(fail_on_7, name="check")
    pipe.add(inc, after=a)
    n = 10_000
    items = [x * 10 if x % 100 == 0 else x * 10 + 1 for x in range(n)]
    items = [x - 3 if i % 100 == 0 else x for i, x in enumerate(items)]  # 1% end in 7
    out = list(pipe.map(items, errors="yield"))
    good, failures = _split(out)
    assert len(failures) == n // 100
    assert {f.item for f in failures} == {i for i in range(n) if i % 100 == 0}
    assert all(f.exc_type == "ValueError" and isinstance(f.exception, ValueError) for f in failures)
    assert good == [x + 1 for x in items if x % 10 != 7]
    report = pipe.last_report
    assert report is not None and report.nodes["check"].failed == n // 100


def test_timeout_in_a_process_pool_kills_and_replaces_the_worker():
    with ProcessPool(2) as pool:
        pipe = Pipeline("timeout", pool=pool)
        pipe.add(sleep_on({3}, seconds=60), name="stuck", timeout=1.0)
        t0 = time.monotonic()
        out = list(pipe.map(range(20), errors="yield"))
        elapsed = time.monotonic() - t0
        assert len(pool.pids()) == 2
    good, failures = _split(out)
    assert good == [x for x in range(20) if x != 3]
    assert [f.item for f in failures] == [3]
    assert failures[0].exc_type == "TimeoutError" and "timeout of 1 s" in failures[0].message
    assert elapsed < 20


def test_timeout_in_a_process_pool_with_a_batch_fails_only_the_slow_item():
    with ProcessPool(2) as pool:
        pipe = Pipeline("timeout-batch", pool=pool)
        pipe.add(sleep_on({5}, seconds=60), name="stuck", timeout=0.3, batch=10)
        out = list(pipe.map(range(30), errors="yield"))
    good, failures = _split(out)
    assert good == [x for x in range(30) if x != 5]
    assert [f.item for f in failures] == [5]


def test_timeout_in_a_thread_pool_abandons_the_item_and_keeps_the_pool_size():
    with ThreadPool(3) as pool:
        pipe = Pipeline("timeout-threads", pool=pool)
        pipe.add(sleep_on({2}, seconds=3), name="stuck", timeout=0.3)
        t0 = time.monotonic()
        out = list(pipe.map(range(10), errors="yield"))
        assert time.monotonic() - t0 < 2.5  # did not wait for the stuck call
        good, failures = _split(out)
        assert good == [x for x in range(10) if x != 2]
        assert [f.item for f in failures] == [2]
        assert "abandoned" in failures[0].message
        assert pool.alive_threads >= 3 + 1  # the replacement, and the abandoned one still busy
        # The pool still works: three more quick items at once.
        assert list(pipe.map([10, 11, 12])) == [10, 11, 12]


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_retries_succeed_on_the_second_try(tmp_path, kind):
    pool = ThreadPool(2) if kind == "thread" else ProcessPool(2)
    with pool:
        pipe = Pipeline("retry", pool=pool)
        pipe.add(flaky_once(str(tmp_path)), name="flaky", retries=1, retry_on=ConnectionError)
        assert list(pipe.map(range(20))) == list(range(20))
    assert len(list(tmp_path.iterdir())) == 40  # two attempts per item, no more


@pytest.mark.parametrize("batch", [1, 3])  # a call of one item, and a last short call
def test_a_batched_node_retries_an_item_called_alone(tmp_path, batch):
    flaky = flaky_once(str(tmp_path))

    def batched(xs):
        return [flaky(x) for x in xs]

    with ThreadPool(2) as pool:
        pipe = Pipeline("retry-batched", pool=pool)
        pipe.add(batched, batched=True, batch=batch, retries=1, retry_on=ConnectionError)
        assert list(pipe.map(range(4))) == list(range(4))


def test_a_batched_node_gives_up_after_its_retries():
    def always(xs):
        raise ConnectionError("down")

    with ThreadPool(1) as pool:
        pipe = Pipeline("give-up", pool=pool)
        pipe.add(always, batched=True, batch=1, retries=2, retry_on=ConnectionError)
        out = list(pipe.map(range(3), errors="yield"))
    assert [(o.item, o.exc_type, o.attempts) for o in out] == [
        (i, "ConnectionError", 3) for i in range(3)
    ]


class _BadStr(Exception):
    def __str__(self) -> str:
        raise RuntimeError("str broke")


def _raise_bad_str(x: int) -> int:
    if x == 1:
        raise _BadStr()
    return x


@pytest.mark.parametrize("kind", ["thread", "process"])
def test_an_exception_that_cannot_be_printed_fails_only_its_item(kind):
    pool = ThreadPool(2) if kind == "thread" else ProcessPool(2)
    with ThreadPool(1) as first, pool:
        pipe = Pipeline("bad-str")
        a = pipe.add(inc, pool=first, name="src")
        pipe.add(_raise_bad_str, after=a, pool=pool, name="f")
        out = list(pipe.map(range(4), errors="yield"))
    good, failures = _split(out)
    assert good == [2, 3, 4]
    (f,) = failures
    assert (f.node, f.item, f.input_repr) == ("f", 0, "1")
    assert f.exc_type.endswith("_BadStr") and "str broke" in f.message
    if kind == "process":
        assert pool.restarts == 0  # the worker did not die building the Failure


def test_retry_on_filter_does_not_retry_other_errors(tmp_path):
    pipe = Pipeline("no-retry", pool=ThreadPool(2))
    pipe.add(flaky_once(str(tmp_path)), name="flaky", retries=3, retry_on=KeyError)
    out = list(pipe.map(range(5), errors="yield"))
    assert all(isinstance(o, Failure) and o.attempts == 1 for o in out)
    assert len(list(tmp_path.iterdir())) == 5


def test_unpicklable_result_fails_that_item_naming_node_and_type(process_pool):
    pipe = Pipeline("unpicklable-out", pool=process_pool)
    pipe.add(unpicklable_result, name="make_lock")
    out = list(pipe.map(range(10), errors="yield"))
    good, failures = _split(out)
    assert good == [x for x in range(10) if x != 5]
    (f,) = failures
    assert f.item == 5 and f.node == "make_lock"
    assert "_thread.lock" in f.message and "cannot be sent back" in f.message


def test_unpicklable_item_fails_that_item_naming_node_and_type(process_pool):
    pipe = Pipeline("unpicklable-in", pool=process_pool)
    pipe.add(lambda x: x if isinstance(x, int) else "?", name="consume")
    items = [1, 2, threading.Lock(), 4]
    out = list(pipe.map(items, errors="yield"))
    good, failures = _split(out)
    assert good == [1, 2, 4]
    (f,) = failures
    assert f.item == 2 and f.node == "consume"
    assert "_thread.lock" in f.message and "cannot be sent to a worker" in f.message


@pytest.mark.parametrize("batch", [1, 4])
def test_an_item_that_cannot_be_rebuilt_in_the_worker_fails_alone(process_pool, batch):
    # The batch of 4 cannot be rebuilt as a whole: nothing ran, so its halves are sent
    # again until the item at fault is alone; its batch-mates run once.
    items = [0, DriverOnly(1, os.getpid()), 2, 3, DriverOnly(4, os.getpid()), 5]
    pipe = Pipeline("rebuild", pool=process_pool)
    pipe.add(lambda x: x * 10, name="times_ten", batch=batch)
    out = list(pipe.map(items, errors="yield"))
    good, failures = _split(out)
    assert good == [0, 20, 30, 50]
    assert [(f.node, f.item, f.exc_type, f.input_repr) for f in failures] == [
        ("times_ten", 1, "TypeError", "DriverOnly(1)"),
        ("times_ten", 4, "TypeError", "DriverOnly(4)"),
    ]
    assert "could not be rebuilt in the worker" in failures[0].message
    assert pipe.last_report.nodes["times_ten"].failed == 2


def test_exception_inside_a_scatter_and_inside_a_gather(pool):
    def split(x):
        if x == 3:
            raise RuntimeError("cannot split 3")
        return range(x)

    def total(xs):
        if len(xs) == 5:
            raise ArithmeticError("cannot sum five")
        return sum(xs)

    pipe = Pipeline("sg-faults", pool=pool)
    s = pipe.add(split, scatter=True)
    d = pipe.add(inc, after=s)
    pipe.add(total, after=d, gather=True)
    out = list(pipe.map(range(8), errors="yield"))
    assert len(out) == 8
    assert isinstance(out[3], Failure) and out[3].node == "split"
    assert "cannot split 3" in out[3].message
    assert isinstance(out[5], Failure) and out[5].node == "total"
    assert out[5].exc_type == "ArithmeticError"
    assert [o for i, o in enumerate(out) if i not in (3, 5)] == [
        sum(range(1, x + 1)) for x in range(8) if x not in (3, 5)
    ]


def test_on_error_raise_stops_the_run_cleanly():
    pipe = Pipeline("abort")
    pipe.add(fail_on_7, on_error="raise")
    with pytest.raises(RunAborted) as info:
        list(pipe.map(range(100), errors="yield"))
    # the first failure a task reports: with tasks in parallel, any item that fails
    assert info.value.failure.item % 10 == 7 and info.value.failure.node == "fail_on_7"


def test_early_break_stops_the_run_and_frees_own_pools():
    pipe = Pipeline("break")  # its own ProcessPool
    pipe.add(cpu_ms)
    for out in pipe.map(range(100_000)):
        if out == 10:
            break
    else:  # pragma: no cover
        pytest.fail("did not break")
    # The generator was closed by the break: pools are gone (checked by the fixture too).
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        kids = live_descendants()
        if not kids:
            break
        time.sleep(0.05)
    assert not kids


def test_abandoned_iterator_is_closed_by_garbage_collection():
    import gc

    pipe = Pipeline("gc")
    pipe.add(cpu_ms)
    it = pipe.map(range(100_000))
    next(it)
    del it
    gc.collect()
    deadline = time.monotonic() + 5
    while live_descendants() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not live_descendants()


def test_user_pool_survives_an_abandoned_run(process_pool):
    pipe = Pipeline("reuse-after-break", pool=process_pool)
    pipe.add(inc)
    for _ in pipe.map(range(100_000)):
        break
    assert list(pipe.map(range(10))) == list(range(1, 11))


def test_exception_keeps_type_message_and_user_frame_across_processes(process_pool):
    pipe = Pipeline("types", pool=process_pool)
    pipe.add(explode, scatter=True)
    out = list(pipe.map([-1 + 0.5], errors="yield"))
    (f,) = out
    assert isinstance(f.exception, TypeError)
    assert f.message == str(f.exception)
    assert "explode" in f.traceback and "helpers.py" in f.traceback


_DRIVER = textwrap.dedent(
    """
    import faulthandler, signal, sys, time
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for stacks if stuck
    # As in a terminal: a test runner started in the background (``cmd &``) passes SIGINT
    # down as ignored, and Python then leaves Ctrl-C ignored too.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path.insert(0, {tests!r})
    from faults.crashers import cpu_ms
    from papy import Pipeline, ProcessPool

    if __name__ == "__main__":
        pipe = Pipeline("interrupted", pool=ProcessPool(2))
        pipe.add(cpu_ms, kwargs={{"ms": 5.0}}, batch=1)
        for i, out in enumerate(pipe.map(range(1_000_000))):
            if i == 20:
                print("RUNNING", flush=True)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupting_a_driver_leaves_no_worker_behind(tmp_path, sig):
    script = tmp_path / "driver.py"
    script.write_text(_DRIVER.format(tests=str(ROOT / "tests")))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "RUNNING", proc.stderr.read() if proc.stderr else ""
        workers = live_descendants(proc.pid)
        assert len(workers) == 2
        proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)
            time.sleep(1)
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"the driver did not exit after {sig!r}; its threads:\n{err}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert "KeyboardInterrupt" in err
    deadline = time.monotonic() + 5
    alive = workers
    while alive and time.monotonic() < deadline:
        alive = [w for w in alive if w.is_running() and w.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.05)
    assert not alive, f"workers survived the driver: {alive}"
    # No zombie either: the workers were reaped (ps shows nothing for their pids).
    ps = subprocess.run(
        ["ps", "-o", "pid=,stat=", "-p", ",".join(str(w.pid) for w in workers)],
        capture_output=True,
        text=True,
    )
    assert ps.stdout.strip() == ""


def test_crashes_are_logged_under_the_papy_logger(caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="papy"), ProcessPool(2) as pool:
        pipe = Pipeline("logged", pool=pool)
        pipe.add(exit_on({2}), name="risky", batch=1)
        list(pipe.map(range(5), errors="yield"))
    messages = [r.getMessage() for r in caplog.records if r.name == "papy"]
    assert any("exited with code 3" in m and "replaced" in m for m in messages)
    assert any("run of 'logged' finished: 5 items, 1 failed" in m for m in messages)


def _interrupts_on_1(x: int) -> int:
    if x == 1:
        raise KeyboardInterrupt("the node's own")
    return x


def test_a_ctrl_c_caught_outside_an_open_run_does_not_make_later_node_interrupts_real():
    # Ctrl-C arrives in the caller's loop body (not inside the run), the caller catches
    # it and keeps the iterator (a REPL or a notebook does): a later run's node raising
    # KeyboardInterrupt itself was taken for a real Ctrl-C and stopped that run.
    first = Pipeline("first", pool=InlinePool())
    first.add(inc)
    it = first.map(range(100))
    with pytest.raises(KeyboardInterrupt):
        for _ in it:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the signal is handled here, in the caller's frame
    later = Pipeline("later", pool=InlinePool())
    later.add(_interrupts_on_1, name="ki")
    out = list(later.map(range(3), errors="yield"))
    assert out[0] == 0 and out[2] == 2
    assert isinstance(out[1], Failure) and out[1].exc_type == "KeyboardInterrupt"
    it.close()
