"""ProcessPool workers: start, per-item deadlines, crashes, driver death, exit, resources.

Everything here uses real worker processes, real signals and real child programs.
"""

from __future__ import annotations

import faulthandler
import functools
import gc
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import psutil
import pytest
from faults.crashers import (
    ExitsWhenRebuilt,
    big_item_pid,
    child_handlers,
    child_signal_handlers,
    close_pipes_then_sleep_on,
    exit_on,
    exits_when_pickled_on,
    failing_initializer,
    fork_then_exit_on,
    initializer_exits,
    initializer_killed,
    kill_siblings_on,
    nested_executor,
    nested_fork_pool,
    nested_mp_pool,
    nested_papy,
    shut_sockets_then_sleep_on,
    sigterm_self_on,
    slow_on,
    start_sleeper_and_hang,
)
from helpers import inc, live_descendants
from pool_helpers import append_then_wait, logged

from papy import (
    Failure,
    InlinePool,
    Pipeline,
    PoolError,
    ProcessPool,
    RunAborted,
    ThreadPool,
    WorkerCrashed,
)
from papy._task import Stage, StepSpec
from papy.pools import Task

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}


def _split(out):
    return [o for o in out if not isinstance(o, Failure)], [
        o for o in out if isinstance(o, Failure)
    ]


def _gone(pids: list[int], within: float) -> list[int]:
    """Wait up to ``within`` seconds for ``pids`` to exit; return those still alive."""
    deadline = time.monotonic() + within
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


# -- start method ---------------------------------------------------------------------------


def test_default_start_method_does_not_fork_the_driver():
    pool = ProcessPool(1)
    expected = "forkserver" if sys.platform.startswith("linux") else "spawn"
    assert pool.start_method == expected
    pool.close()


_LOCKED_DRIVER = """
import threading
from papy import Pipeline, ProcessPool
from faults import crashers

if __name__ == "__main__":
    # Another thread of the driver holds a module-level lock the node functions use, the
    # whole time workers start (as a logging handler's lock may be held mid-write).
    held, release = threading.Event(), threading.Event()
    def hold():
        with crashers.GUARD:
            held.set()
            release.wait()
    threading.Thread(target=hold, daemon=True).start()
    held.wait()
    with ProcessPool(2) as pool:
        pipe = Pipeline("locked", pool=pool)
        pipe.add(crashers.under_guard, batch=1)
        out = list(pipe.map(range(20)))
    release.set()
    print("OK", sum(out))
"""


def test_a_lock_held_by_a_driver_thread_does_not_block_any_worker(tmp_path):
    script = tmp_path / "locked.py"
    script.write_text(_LOCKED_DRIVER)
    proc = subprocess.run(
        [sys.executable, str(script)], env=ENV, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["OK", str(sum(range(20)))]


# -- per-item timeouts ----------------------------------------------------------------------


def test_timeout_is_per_item_whatever_the_batch():
    slow = {3, 11}
    with ProcessPool(2) as pool:
        pipe = Pipeline("per-item", pool=pool)
        pipe.add(slow_on(slow, 3.0), name="sometimes_slow", timeout=1.0, batch=20)
        out = list(pipe.map(range(20), errors="yield"))
        assert len(pool.pids()) == 2
    good, bad = _split(out)
    assert good == [x for x in range(20) if x not in slow]
    assert sorted(f.item for f in bad) == sorted(slow)
    for f in bad:
        assert f.node == "sometimes_slow" and f.exc_type == "TimeoutError"
        assert "timeout of 1 s" in f.message


def test_items_within_the_limit_never_fail():
    # 20 items of 0.3 s in one batch under a 0.8 s limit: the batch takes 6 s, no item fails.
    with ProcessPool(1) as pool:
        pipe = Pipeline("within", pool=pool)
        pipe.add(slow_on(set(range(20)), 0.3), timeout=0.8, batch=20)
        out = list(pipe.map(range(20), errors="yield"))
    assert out == list(range(20))


def test_a_fused_node_keeps_its_own_timeout():
    with ProcessPool(2) as pool:
        pipe = Pipeline("fused", pool=pool)
        a = pipe.add(inc, name="first", batch=10)
        pipe.add(slow_on({5}, 60.0), name="second", after=a, timeout=0.5)
        t0 = time.monotonic()
        out = list(pipe.map(range(10), errors="yield"))
        elapsed = time.monotonic() - t0
    good, bad = _split(out)
    assert good == [x + 1 for x in range(10) if x + 1 != 5]
    assert [(f.node, f.item, f.exc_type) for f in bad] == [("second", 4, "TimeoutError")]
    assert elapsed < 30  # a 60 s hang was cut short (latency is measured in benchmarks)


def test_a_hung_item_is_cut_short_and_its_batch_mates_rerun():
    with ProcessPool(2) as pool:
        pipe = Pipeline("hang", pool=pool)
        pipe.add(slow_on({7}, 300.0), name="hangs", timeout=0.5, batch=16)
        t0 = time.monotonic()
        out = list(pipe.map(range(16), errors="yield"))
        elapsed = time.monotonic() - t0
        assert pool.restarts == 1
    good, bad = _split(out)
    assert good == [x for x in range(16) if x != 7]
    assert [f.item for f in bad] == [7]
    assert elapsed < 30


def test_a_timed_out_worker_takes_its_children_along(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    with ProcessPool(1) as pool:
        pipe = Pipeline("grandchild", pool=pool)
        pipe.add(start_sleeper_and_hang(str(pidfile)), name="spawner", timeout=1.0)
        out = list(pipe.map([1], errors="yield"))
    assert isinstance(out[0], Failure) and out[0].exc_type == "TimeoutError"
    assert _gone([int(pidfile.read_text())], within=5) == []


# -- crashes --------------------------------------------------------------------------------


def test_a_crash_names_its_item_in_few_restarts():
    bad = {37}
    with ProcessPool(2, initializer=faulthandler.disable) as pool:
        pipe = Pipeline("poison", pool=pool)
        pipe.add(exit_on(bad), name="risky", batch=64)
        out = list(pipe.map(range(64), errors="yield"))
        # one crash, one to learn which item, one to confirm it: never a halving search
        assert pool.restarts == 3
    good, bad_out = _split(out)
    assert good == [2 * x for x in range(64) if x not in bad]
    assert [f.item for f in bad_out] == [37]
    assert isinstance(bad_out[0].exception, WorkerCrashed) and bad_out[0].attempts == 2


@pytest.mark.parametrize("phase", ["rebuilding", "pickling"])
def test_a_crash_outside_the_node_names_its_item_in_few_restarts(phase):
    """A worker that dies rebuilding an item, or pickling a result, names that item as
    fast as a crash inside the node: three restarts per item, no halving search."""
    bad = {13, 37}
    if phase == "rebuilding":
        items = [ExitsWhenRebuilt(x, 6, os.getpid()) if x in bad else x for x in range(64)]
        fn, code = exit_on(set()), 6
    else:
        items, fn, code = list(range(64)), exits_when_pickled_on(bad, 5), 5
    with ProcessPool(2, initializer=faulthandler.disable) as pool:
        pipe = Pipeline("poison", pool=pool)
        pipe.add(fn, name="risky", batch=64)
        out = list(pipe.map(items, errors="yield"))
        assert pool.restarts == 3 * len(bad)
    good, bad_out = _split(out)
    assert good == [2 * x for x in range(64) if x not in bad]
    assert [f.item for f in bad_out] == sorted(bad)
    for f in bad_out:
        assert isinstance(f.exception, WorkerCrashed) and f.exception.exitcode == code
        assert f.node == "risky"
        assert f"exited with code {code} while {phase} this item" in str(f.exception)


def test_a_worker_that_sigterms_itself_is_reported_killed_by_sigterm():
    with ProcessPool(2, initializer=faulthandler.disable) as pool:
        pipe = Pipeline("terminated", pool=pool)
        pipe.add(sigterm_self_on({5}), name="term", batch=4)
        out = list(pipe.map(range(12), errors="yield"))
    good, bad_out = _split(out)
    assert good == [2 * x for x in range(12) if x != 5]
    assert [f.item for f in bad_out] == [5]
    assert bad_out[0].exception.exitcode == -signal.SIGTERM
    assert "killed by SIGTERM while running this item" in str(bad_out[0].exception)


def test_crashes_and_timeouts_count_in_the_report():
    with ProcessPool(2, initializer=faulthandler.disable) as pool:
        pipe = Pipeline("counted", pool=pool)
        a = pipe.add(exit_on({3}), name="crashy", batch=8)
        pipe.add(slow_on({10}, 60.0), name="slow", after=a, timeout=0.5, batch=8)
        out = list(pipe.map(range(16), errors="yield"))
        report = pipe.last_report
    assert len(out) == 16
    assert report is not None
    assert (report.nodes["crashy"].items_in, report.nodes["crashy"].failed) == (16, 1)
    assert report.nodes["slow"].failed == 1


@pytest.mark.parametrize("fault", ["crash", "timeout"])
def test_on_error_raise_stops_the_run_on_a_crash_or_a_timeout(fault):
    fn = exit_on({5}) if fault == "crash" else slow_on({10}, 60.0)
    with ProcessPool(2, initializer=faulthandler.disable) as pool:
        pipe = Pipeline("raise", pool=pool)
        pipe.add(fn, name="node", on_error="raise", timeout=0.5 if fault == "timeout" else None)
        with pytest.raises(RunAborted) as info:
            list(pipe.map(range(50), errors="yield"))
    expected = "papy.WorkerCrashed" if fault == "crash" else "TimeoutError"
    assert info.value.failure.exc_type == expected and info.value.failure.node == "node"


# -- start failures -------------------------------------------------------------------------


def test_a_failing_initializer_fails_the_run_fast_with_its_message():
    t0 = time.monotonic()
    with ProcessPool(2, initializer=failing_initializer) as pool:
        pipe = Pipeline("init", pool=pool)
        pipe.add(inc)
        with pytest.raises(PoolError) as info:
            list(pipe.map(range(100)))
        restarts = pool.restarts
    assert time.monotonic() - t0 < 30
    assert "cannot reach the license server" in str(info.value)
    assert "failing_initializer" in str(info.value)  # the traceback, naming the function
    assert isinstance(info.value.__cause__, RuntimeError)
    assert restarts == 0


def test_a_function_that_cannot_be_loaded_fails_its_items_with_the_import_error(tmp_path):
    # A module the driver can import but the workers cannot (not on their path).
    mod = tmp_path / "only_here_mod.py"
    mod.write_text("def twice(x):\n    return 2 * x\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import only_here_mod

        sys.path.remove(str(tmp_path))  # workers start after this, without that path
        with ProcessPool(1) as pool:
            pipe = Pipeline("unloadable", pool=pool)
            pipe.add(only_here_mod.twice, name="twice")
            out = list(pipe.map(range(5), errors="yield"))
            assert pool.restarts == 0
            report = pipe.last_report
    finally:
        if str(tmp_path) in sys.path:
            sys.path.remove(str(tmp_path))
        sys.modules.pop("only_here_mod", None)
    assert all(isinstance(f, Failure) for f in out)
    assert {f.exc_type for f in out} == {"ModuleNotFoundError"}
    assert {f.node for f in out} == {"twice"}
    assert report is not None and report.nodes["twice"].failed == 5


# -- nested processes -----------------------------------------------------------------------


@pytest.mark.parametrize("fn", [nested_mp_pool, nested_executor, nested_papy])
def test_nodes_can_use_processes_themselves(fn):
    with ProcessPool(2) as pool:
        pipe = Pipeline("nested", pool=pool)
        pipe.add(fn)
        assert list(pipe.map(range(4))) == [x + 1 for x in range(4)]


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_a_node_leaving_a_fork_pool_at_once_never_hangs(method):
    # CPython drops a signal that reaches a child between fork() and its re-initialisation
    # there. A worker's children inherited its SIGTERM handler, so Pool.terminate() in a
    # node could lose a SIGTERM and wait for that worker forever: 1 run of 8 in 1 to 5
    # hung on fork. A hang shows up as a timeout Failure here, not a stuck test.
    with ProcessPool(2, start_method=method) as pool:
        pipe = Pipeline("nested-fork", pool=pool)
        pipe.add(nested_fork_pool, timeout=20)
        for _ in range(8):
            assert list(pipe.map(range(6))) == [x * (x + 1) // 2 for x in range(6)]


@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_processes_a_node_starts_get_default_signal_handling(method):
    with ProcessPool(1, start_method=method) as pool:
        pipe = Pipeline("child-signals", pool=pool)
        pipe.add(child_signal_handlers)
        (out,) = list(pipe.map([0]))
    # A forked child: SIGTERM kills it, Ctrl-C raises KeyboardInterrupt; a program run
    # by the node does not inherit an ignored SIGINT.
    assert out == ("default", "python-default", "True")
    # Handlers the node set itself before forking are the child's, not replaced.
    with ProcessPool(1, start_method=method) as pool:
        pipe = Pipeline("own-signals", pool=pool)
        pipe.add(child_signal_handlers)
        assert list(pipe.map([1])) == [("_own_sigterm", "ignored", "")]


def test_a_fork_worker_starts_its_own_fork_server_when_its_driver_has_one():
    # A forked worker inherited the driver's record of the driver's multiprocessing fork
    # server; a node using get_context("forkserver") then raised ChildProcessError (found
    # by tests/faults/test_recovery_search.py).
    import multiprocessing.forkserver

    multiprocessing.forkserver.ensure_running()  # the driver's own fork server
    spec = ("untouched", "untouched", "mp_forkserver")
    with ProcessPool(2, start_method="fork") as pool:
        pipe = Pipeline("fork-server-in-a-fork-worker", pool=pool)
        pipe.add(child_handlers, batch=1)
        assert list(pipe.map([spec] * 4)) == [("default", "python-default")] * 4


def test_a_thread_pool_node_forking_during_a_run_gives_its_children_default_handlers(capfd):
    # A run traps SIGINT and SIGTERM in the driver; a child forked by a node running in
    # one of its threads inherited that trap: every worker of a node's fork Pool printed
    # "KeyboardInterrupt: SIGTERM" when the Pool was left, and could lose the signal.
    with ThreadPool(2) as pool:
        pipe = Pipeline("thread-fork", pool=pool)
        pipe.add(nested_fork_pool, timeout=20)
        for _ in range(4):
            assert list(pipe.map(range(6))) == [x * (x + 1) // 2 for x in range(6)]
        pipe = Pipeline("thread-child-signals", pool=pool)
        pipe.add(child_signal_handlers)
        assert list(pipe.map([0])) == [("default", "python-default", "True")]
        pipe = Pipeline("thread-own-signals", pool=InlinePool())  # the main thread's run
        pipe.add(child_signal_handlers)
        assert list(pipe.map([1])) == [("_own_sigterm", "ignored", "")]
    assert "KeyboardInterrupt" not in capfd.readouterr().err


# -- one busy worker does not block the others ----------------------------------------------


def test_a_stalled_worker_with_large_items_does_not_starve_the_other():
    size = 4 * 2**20
    items = [b"S" + bytes(size)] + [bytes(size) for _ in range(150)]
    with ProcessPool(2) as pool:
        pipe = Pipeline("starve", pool=pool)
        pipe.add(big_item_pid, batch=1)
        out = list(pipe.map(items))
    stalled_pid, stall_end = out[0]
    during = [t for pid, t in out[1:] if pid != stalled_pid and t < stall_end]
    # Before each worker had its own sender, the stall let one item through, not dozens.
    assert len(during) >= 20, len(during)


def test_a_task_queued_behind_a_long_one_moves_to_an_idle_worker():
    """A run left while an item is hung keeps that worker busy; the next run's task queued
    behind it must not wait for it while other workers idle (it took the hung item's 60 s)."""
    with ProcessPool(4) as pool:
        hung = Pipeline("hung", pool=pool)
        hung.add(slow_on({2}, 60.0), batch=1)
        quick = Pipeline("quick", pool=pool)
        quick.add(slow_on(set(range(100)), 0.01), batch=1)
        outputs = hung.map(range(5))
        assert next(outputs) == 0
        time.sleep(0.2)  # item 2 is running
        outputs.close()
        started = time.monotonic()
        assert list(quick.map(range(50))) == list(range(50))
        assert time.monotonic() - started < 30  # 0.2 s here; never the hung item's 60 s
        assert list(quick.map(range(50))) == list(range(50))


# -- workers never outlive the driver -------------------------------------------------------

_KILLED_DRIVER = """
import os, sys, time
from papy import Pipeline, ProcessPool
from faults.crashers import cpu_ms, exit_on, slow_on

if __name__ == "__main__":
    mode = sys.argv[1]
    pool = ProcessPool(2)
    pipe = Pipeline("victim", pool=pool)
    if mode == "crashing":  # workers are being replaced all the time
        pipe.add(exit_on(set(range(0, 10_000, 7))), batch=1)
    elif mode == "hung":  # workers stuck in a long call
        pipe.add(slow_on(set(range(10_000)), 300.0), batch=1)
    else:
        pipe.add(cpu_ms, kwargs={"ms": 2.0}, batch=16)
    n = 40 if mode == "exiting" else 10_000
    for i, out in enumerate(pipe.map(range(n), errors="yield")):
        pass
"""


def test_workers_die_with_a_sigkilled_driver_at_random_moments(tmp_path):
    script = tmp_path / "victim.py"
    script.write_text(_KILLED_DRIVER)
    rng = random.Random(12)
    modes = ["busy", "crashing", "hung", "exiting"] * 5
    leftovers = []
    for batch_start in range(0, len(modes), 5):  # five drivers at a time
        procs = []
        for mode in modes[batch_start : batch_start + 5]:
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(script), mode],
                    env=ENV,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        started = time.monotonic()
        killed = []
        for proc in procs:
            time.sleep(max(0.0, started + rng.uniform(0.5, 3.0) - time.monotonic()))
            family = [c.pid for c in live_descendants(proc.pid)]
            proc.kill()
            proc.wait()
            # the ones found at the kill, and any started in the last instant
            killed.append(family)
        gc.collect()
        for family in killed:
            leftovers.extend(_gone(family, within=5))
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    assert leftovers == []


_MANY_FDS_DRIVER = """
import os, resource, sys
from papy import Pipeline, ProcessPool
from faults.crashers import slow_on

if __name__ == "__main__":
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1200 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]  # numbers above 1023
    pipe = Pipeline("many_fds", pool=ProcessPool(2, sys.argv[1]))
    pipe.add(slow_on(set(range(100)), 300.0), batch=1)
    for out in pipe.map(range(100)):
        pass
"""


@pytest.mark.parametrize("start_method", ["fork", "forkserver"])
def test_workers_die_with_a_sigkilled_driver_that_holds_over_a_thousand_descriptors(
    tmp_path, start_method
):
    """A forked worker inherits the driver's descriptors, so the one it watches the driver
    with was numbered above 1023, which select() refuses: the watch died, the workers lived."""
    script = tmp_path / "victim.py"
    script.write_text(_MANY_FDS_DRIVER)
    proc = subprocess.Popen(
        [sys.executable, str(script), start_method],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 60
    family: list[int] = []
    while len(family) < 2 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
        family = [c.pid for c in live_descendants(proc.pid)]
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    time.sleep(1.0)  # the workers are running their 300 s items
    family = [c.pid for c in live_descendants(proc.pid)]
    proc.kill()
    proc.wait()
    left = _gone(family, within=5)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == []
    assert b"out of range" not in (proc.stderr.read() if proc.stderr else b"")


def test_killing_the_drivers_process_group_leaves_nothing_in_dev_shm(tmp_path):
    """A hangup or ``kill -9 -PGID`` kills the driver and its resource tracker at once: the
    workers' named semaphores (their slots' claim locks) must not stay in /dev/shm."""
    script = tmp_path / "victim.py"
    script.write_text(_KILLED_DRIVER)
    before = set(os.listdir("/dev/shm"))
    for sig in (signal.SIGKILL, signal.SIGHUP):
        proc = subprocess.Popen(
            [sys.executable, str(script), "busy"],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, as a terminal session is
        )
        deadline = time.monotonic() + 30
        while len(live_descendants(proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)  # two workers at work (10,000 items of 2 ms: 10 s)
        time.sleep(0.5)
        assert proc.poll() is None, "the run ended before it was killed"
        family = [c.pid for c in live_descendants(proc.pid)]
        os.killpg(proc.pid, sig)
        proc.wait()
        assert _gone(family, within=5) == []
    left = sorted(f for f in set(os.listdir("/dev/shm")) - before if f.startswith("sem."))
    assert left == []


_CTRL_C_AT_START = """
import os, signal, sys, time
from multiprocessing import forkserver, popen_forkserver
from papy import ProcessPool

connect = forkserver.connect_to_new_process
where = sys.argv[1]


def ctrl_c_while_starting(fds):
    # The forkserver has forked the new worker, which now reads its arguments (the slot's
    # named semaphore among them) from a pipe the driver is about to fill.
    got = connect(fds)
    os.kill(os.getpid(), signal.SIGINT)
    return got


popen_forkserver.forkserver.connect_to_new_process = ctrl_c_while_starting
pool = ProcessPool(2)
try:
    pool.start()
except KeyboardInterrupt:
    print("interrupted", flush=True)
pool.close()
time.sleep(1.0)  # a worker that outlived the interrupt would write its traceback now
"""


def test_a_ctrl_c_while_a_worker_starts_leaves_no_traceback_and_nothing_behind(tmp_path):
    # An interrupt between the forkserver's fork and the driver's writing of the worker's
    # arguments dropped the semaphore's name under the new process, which printed a
    # FileNotFoundError traceback from the forkserver (or an EOFError).
    script = tmp_path / "ctrl_c.py"
    script.write_text(_CTRL_C_AT_START)
    before = set(os.listdir("/dev/shm"))
    proc = subprocess.Popen(
        [sys.executable, str(script), "start"],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.strip() == "interrupted"
    assert "Traceback" not in err, err
    session = [p.pid for p in psutil.process_iter() if _session(p.pid) == proc.pid]
    assert _gone(session, within=5) == []
    left = sorted(f for f in set(os.listdir("/dev/shm")) - before if f.startswith("sem."))
    assert left == []


def _session(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:
        return None


_NESTED_TIMEOUT = """
import time
from papy import Pipeline, ProcessPool

def inner(v):
    time.sleep(30)  # the outer item times out while its own pool works
    return v

def outer(x):
    with ProcessPool(1) as pool:
        pipe = Pipeline("inner", pool=pool)
        pipe.add(inner)
        return sum(pipe.map(range(2), progress=False))

if __name__ == "__main__":
    with ProcessPool(2) as pool:
        pipe = Pipeline("outer", pool=pool)
        pipe.add(outer, timeout=2.0)
        print([o.exc_type for o in pipe.map(range(2), errors="yield", progress=False)])
"""


def test_a_timed_out_node_with_a_pool_of_its_own_leaves_no_tracker_warnings(tmp_path):
    # The inner pool's worker removed its semaphore when its driver (the outer worker) was
    # killed, but the resource tracker the two share still counted it: "There appear to be
    # 2 leaked semaphore objects" and a "No such file or directory" per name at exit.
    script = tmp_path / "nested.py"
    script.write_text(_NESTED_TIMEOUT)
    proc = subprocess.run(
        [sys.executable, str(script)], env=ENV, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[0] == "['TimeoutError', 'TimeoutError']"
    assert "resource_tracker" not in proc.stderr, proc.stderr


# -- exit, garbage collection, long-lived pools ---------------------------------------------

_EARLY_EXIT = """
import gc, sys
from papy import Pipeline, ProcessPool, imap
from faults.crashers import cpu_ms

if __name__ == "__main__":
    how = sys.argv[1]
    if how == "imap":
        it = imap(cpu_ms, range(100), pool=ProcessPool(2))
        next(it)
        sys.exit(0)
    pipe = Pipeline("early", pool=ProcessPool(2))
    pipe.add(cpu_ms, batch=1)
    it = pipe.map(range(100))
    first = next(it)
    if how == "raise":
        raise SystemExit(3)
    if how == "gc":
        del it
        gc.collect()
    if how == "break":
        for x in it:
            break
"""

_EXIT_MODES = ["return", "raise", "gc", "break", "imap"]


_EXIT_PROGRAMS = int(os.environ.get("PAPY_EXIT_PROGRAMS", "10"))  # make soak: 200


@pytest.mark.timeout(120 + 5 * _EXIT_PROGRAMS)
def test_programs_that_stop_after_one_result_exit_promptly(tmp_path):
    script = tmp_path / "early.py"
    script.write_text(_EARLY_EXIT)
    n = _EXIT_PROGRAMS
    slow = []
    procs = []
    for i in range(n):
        how = _EXIT_MODES[i % len(_EXIT_MODES)]
        procs.append(
            (
                how,
                subprocess.Popen(
                    [sys.executable, str(script), how], env=ENV, stderr=subprocess.PIPE
                ),
            )
        )
        if len(procs) >= 4 or i == n - 1:  # four programs at a time on a shared machine
            for how, proc in procs:
                try:
                    _, err = proc.communicate(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.communicate()
                    slow.append(how)
                    continue
                assert proc.returncode == (3 if how == "raise" else 0), err.decode(errors="replace")
            procs = []
    assert slow == []


def test_an_unclosed_pool_is_closed_when_garbage_collected():
    pool = ProcessPool(2)
    pipe = Pipeline("gc-pool", pool=pool)
    pipe.add(inc)
    assert list(pipe.map(range(10))) == list(range(1, 11))
    pids = pool.pids()
    collected = weakref.ref(pool)
    del pipe, pool
    deadline = time.monotonic() + 10
    while collected() is not None and time.monotonic() < deadline:
        gc.collect()  # the run's own threads may still be finishing (loaded machine)
        time.sleep(0.05)
    assert collected() is None, "the pool is still referenced after its run ended"
    assert _gone(pids, within=5) == []


_UNCLOSED_AT_EXIT = """
from papy import Pipeline, ProcessPool
from helpers import inc

if __name__ == "__main__":
    pool = ProcessPool(2)  # never entered with `with`, never closed: kept alive to the end
    pipe = Pipeline("open", pool=pool)
    pipe.add(inc)
    assert list(pipe.map(range(10))) == list(range(1, 11))
    print(" ".join(map(str, pool.pids())), flush=True)
"""


def test_an_unclosed_pool_is_closed_at_interpreter_exit(tmp_path):
    script = tmp_path / "unclosed.py"
    script.write_text(_UNCLOSED_AT_EXIT)
    proc = subprocess.run(
        [sys.executable, str(script)], env=ENV, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    pids = [int(p) for p in proc.stdout.split()]
    assert len(pids) == 2
    assert _gone(pids, within=5) == []


def test_many_runs_on_one_pool_leave_no_trace():
    runs = int(os.environ.get("PAPY_POOL_RUNS", "150"))
    me = psutil.Process()
    with ProcessPool(2) as pool:

        def one_run(i: int) -> None:
            pipe = Pipeline(f"run-{i}", pool=pool)
            pipe.add(eval(f"lambda x: x + {i}"))  # a new function each run
            assert list(pipe.map(range(5))) == [x + i for x in range(5)]

        for i in range(20):  # warm up: caches, forkserver, lazily imported modules
            one_run(i)
        gc.collect()
        workers = [psutil.Process(p) for p in pool.pids()]
        threads = set(threading.enumerate())  # new ones count (others' may end meanwhile)
        before = (
            len(live_descendants()),
            0,
            me.num_fds(),
            [w.memory_info().rss for w in workers],
        )
        for i in range(20, 20 + runs):
            one_run(i)
        gc.collect()
        time.sleep(0.2)
        after = (
            len(live_descendants()),
            len(set(threading.enumerate()) - threads),
            me.num_fds(),
            [w.memory_info().rss for w in workers],
        )
        assert pool.pids() == [w.pid for w in workers]  # no worker was replaced
    assert after[:3] == before[:3]
    for rss_before, rss_after in zip(before[3], after[3]):
        assert rss_after < rss_before + 8 * 2**20  # flat: well under 8 MiB growth


# -- worker output --------------------------------------------------------------------------

_PRINTING = """
import sys
from papy import Pipeline, ProcessPool

def shout(x):
    print(f"item {x} " + "o" * 200)
    print(f"warning {x}", file=sys.stderr)
    return x

if __name__ == "__main__":
    with ProcessPool(2) as pool:
        pipe = Pipeline("loud", pool=pool)
        pipe.add(shout, batch=1)
        assert list(pipe.map(range(50))) == list(range(50))
"""


def test_worker_output_reaches_the_driver_line_by_line(tmp_path):
    script = tmp_path / "loud.py"
    script.write_text(_PRINTING)
    proc = subprocess.run(
        [sys.executable, str(script)], env=ENV, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert sorted(lines) == sorted(f"item {x} " + "o" * 200 for x in range(50))
    assert sorted(proc.stderr.splitlines()) == sorted(f"warning {x}" for x in range(50))


_PROGRESS = """
import os, sys, time
from papy import Pipeline, ProcessPool

def long_job(flag):
    sys.stdout.write("tick 1/2\\r")  # a progress bar, redrawn in place
    sys.stdout.flush()
    deadline = time.monotonic() + 30
    while not os.path.exists(flag) and time.monotonic() < deadline:
        time.sleep(0.01)
    print("\u00e9" * 1_500_000)  # 3 MB on one line, characters split between reads
    sys.stdout.flush()
    return "seen" if os.path.exists(flag) else "not seen"

if __name__ == "__main__":
    with ProcessPool(1) as pool:
        pipe = Pipeline("progress", pool=pool)
        pipe.add(long_job)
        print(list(pipe.map([sys.argv[1]])))
"""


def test_a_progress_bar_shows_while_its_node_runs_and_a_long_line_arrives_whole(tmp_path):
    # Only lines ending in a newline were written: a progress bar redrawn with carriage
    # returns showed nothing until its node ended, and each read re-scanned the whole
    # unfinished line (16 MB without a newline took 7-12 s, 64 MB minutes).
    script = tmp_path / "progress.py"
    script.write_text(_PROGRESS)
    flag = tmp_path / "seen"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(flag)], env=ENV, stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + 25
    while b"tick 1/2\r" not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            seen += os.read(proc.stdout.fileno(), 1 << 16)
    assert b"tick 1/2\r" in seen, "the progress bar did not show while its node ran"
    flag.touch()
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0
    lines = sorted((seen + rest).decode("utf-8").split("\n"))
    long_line = "\u00e9" * 1_500_000  # after the progress bar, or after the driver's line
    assert lines in (
        sorted(["tick 1/2\r" + long_line, "['seen']", ""]),
        sorted(["tick 1/2\r['seen']", long_line, ""]),
    )


# -- a user's file behaves as under Python ---------------------------------------------------

_USER_FILE = '''
"""A pipeline file with module-level state that cannot be pickled."""
import functools, os, sqlite3, sys, threading
from papy import Pipeline, ProcessPool

LOCK = threading.Lock()
DB = sqlite3.connect(":memory:", check_same_thread=False)
STATE = {}
LOADS = []


class LookupFailed(Exception):
    def __init__(self, key, reason):
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def setup():
    STATE["offset"] = 100


@functools.cache
def table():
    LOADS.append(os.getpid())
    return {i: i * i for i in range(10)}


def square(x):
    with LOCK:
        (one,) = DB.execute("select 1").fetchone()
    if x == 7:
        raise LookupFailed(x, "seven is not allowed")
    return table()[x] * one


def shift(x):
    table()
    return x + STATE["offset"] + 1000 * (len(LOADS) - 1)


def make():
    pipe = Pipeline("userfile", pool=ProcessPool(2, initializer=setup))
    a = pipe.add(square, batch=2)
    pipe.add(shift, after=a, batch=2)
    return pipe


pipeline = make()


def main():
    out = []
    for v in pipeline.map(range(10), errors="yield"):
        if hasattr(v, "exception"):
            e = v.exception
            assert isinstance(e, LookupFailed), type(e)
            assert "seven is not allowed" in v.traceback and "raise LookupFailed" in v.traceback
            out.append(f"failed:{e.key}:{e.reason}")
        else:
            out.append(str(v))
    print(" ".join(out))
    pipeline.pool.close()


if __name__ == "__main__":
    main()
'''


def test_a_user_file_behaves_the_same_as_script_module_and_papy_run(tmp_path):
    user = tmp_path / "userpipe.py"
    user.write_text(_USER_FILE)
    expected = " ".join(
        "failed:7:seven is not allowed" if x == 7 else str(x * x + 100) for x in range(10)
    )
    as_script = subprocess.run(
        [sys.executable, str(user)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert as_script.returncode == 0, as_script.stderr
    assert as_script.stdout.strip() == expected
    as_import = subprocess.run(
        [sys.executable, "-c", "import userpipe; userpipe.main()"],
        env={**ENV, "PYTHONPATH": ENV["PYTHONPATH"] + os.pathsep + str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert as_import.returncode == 0, as_import.stderr
    assert as_import.stdout.strip() == expected
    items = tmp_path / "items.txt"
    items.write_text("".join(f"{x}\n" for x in range(10)))
    papy = Path(sys.executable).parent / "papy"
    as_papy = subprocess.run(
        [
            str(papy),
            "run",
            str(user),
            "--input",
            str(items),
            "--input-format",
            "jsonl",
            "--no-progress",
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    got = [line for line in as_papy.stdout.split()]
    assert got == [str(x * x + 100) for x in range(10) if x != 7], as_papy.stderr
    assert "LookupFailed: 7: seven is not allowed" in as_papy.stderr


def test_a_timeout_in_a_resumed_journaled_run_fails_only_the_late_item(tmp_path):
    journal = str(tmp_path / "run.db")
    with ProcessPool(1) as pool:
        pipe = Pipeline("resumed", pool=pool)
        pipe.add(slow_on({7}, 60.0), name="slow", timeout=0.5, batch=10)
        assert list(pipe.map(range(5), journal=journal)) == list(range(5))
        # Items 0-4 come from the journal; 5-9 run, and item 7 is late.
        out = list(pipe.map(range(10), journal=journal, errors="yield"))
    good, bad = _split(out)
    assert good == [x for x in range(10) if x != 7]
    assert [(f.item, f.exc_type) for f in bad] == [(7, "TimeoutError")]


# -- cancel -----------------------------------------------------------------------------------


def _record_task(log: Path, gate: Path, key: int) -> Task:
    fn = functools.partial(append_then_wait, log=str(log), gate=str(gate))
    spec = StepSpec(id="cancel-record", stages=[Stage(name="record", call=fn)])
    return Task(spec, [key], [key])


def test_cancel_withdraws_tasks_not_started_even_in_a_workers_pipe(tmp_path):
    log, gate = tmp_path / "ran.txt", tmp_path / "gate"
    with ProcessPool(1) as pool:
        running = pool.submit(_record_task(log, gate, 0))  # runs, waits for the gate
        deadline = time.monotonic() + 30
        while logged(str(log)) != [0] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert logged(str(log)) == [0]
        in_pipe = pool.submit(_record_task(log, gate, 1))  # sent: the worker holds two
        queued = [pool.submit(_record_task(log, gate, k)) for k in (2, 3, 4)]
        assert not any(f.cancelled() for f in [running, in_pipe, *queued])
        # the pool's own cancel, and a future cancelled by its holder: both withdraw; the
        # task waiting in the worker's pipe is withdrawn too (the worker never claims it)
        assert pool.cancel([running, in_pipe, queued[0], queued[1]]) == 3
        assert in_pipe.cancelled() and not running.cancelled()
        assert queued[2].cancel()
        assert [f.cancelled() for f in queued] == [True, True, True]
        assert pool.cancel([in_pipe, *queued]) == 0  # already withdrawn
        gate.write_text("open")
        assert running.result(timeout=30).values == [0]
        # Tasks submitted after them run after anything withdrawn would have; the worker's
        # answer to the withdrawn task frees its place (two tasks in flight again).
        after = [pool.submit(_record_task(log, gate, k)) for k in (5, 6, 7)]
        assert [f.result(timeout=30).values for f in after] == [[5], [6], [7]]
        assert pool.restarts == 0
    assert logged(str(log)) == [0, 5, 6, 7]


def _wait_logged(log: Path, expected: list[int]) -> None:
    deadline = time.monotonic() + 30
    while logged(str(log)) != expected and time.monotonic() < deadline:
        time.sleep(0.01)
    assert logged(str(log)) == expected


def test_a_crash_reruns_the_running_task_not_the_withdrawn_one_nor_blames_the_waiting_one(
    tmp_path,
):
    log, gate = tmp_path / "ran.txt", tmp_path / "gate"
    with ProcessPool(1) as pool:
        running = pool.submit(_record_task(log, gate, 0))
        _wait_logged(log, [0])
        in_pipe = pool.submit(_record_task(log, gate, 1))  # the worker's second task
        assert pool.cancel([in_pipe]) == 1
        waiting = pool.submit(_record_task(log, gate, 2))  # takes the withdrawn one's place
        os.kill(pool.pids()[0], signal.SIGKILL)  # the worker dies running task 0
        _wait_logged(log, [0, 0])  # task 0 runs again on the new worker, items announced
        gate.write_text("open")
        first = running.result(timeout=30)
        assert first.values == [0] and first.crashes == 1
        assert waiting.result(timeout=30).values == [2]
        assert in_pipe.cancelled()
        # A task in the pipe of a worker that dies is sent again, blamed for nothing.
        gate.unlink()
        again = pool.submit(_record_task(log, gate, 0))
        _wait_logged(log, [0, 0, 2, 0])
        behind = pool.submit(_record_task(log, gate, 3))
        os.kill(pool.pids()[0], signal.SIGKILL)
        _wait_logged(log, [0, 0, 2, 0, 0])
        gate.write_text("open")
        assert again.result(timeout=30).crashes == 1
        third = behind.result(timeout=30)
        assert third.values == [3] and third.crashes == 0
        assert pool.restarts == 2
    assert logged(str(log)) == [0, 0, 2, 0, 0, 3]


def test_a_future_its_holder_cancels_is_withdrawn_from_the_workers_pipe(tmp_path):
    log, gate = tmp_path / "ran.txt", tmp_path / "gate"
    with ProcessPool(1) as pool:
        running = pool.submit(_record_task(log, gate, 0))
        _wait_logged(log, [0])
        in_pipe = pool.submit(_record_task(log, gate, 1))  # the worker's second task
        assert in_pipe.cancel()  # not through the pool: the worker must skip it all the same
        gate.write_text("open")
        assert running.result(timeout=30).values == [0]
        assert pool.submit(_record_task(log, gate, 2)).result(timeout=30).values == [2]
    assert logged(str(log)) == [0, 2]


class _Unpicklable:
    def __reduce__(self) -> object:
        raise TypeError("this object does not travel")


def _make_bad(x: int) -> object:
    return _Unpicklable() if x == 3 else x


def test_an_item_that_cannot_travel_counts_and_stops_an_on_error_raise_run() -> None:
    """A Failure a pool makes at its boundary counts like any other failure of the node."""
    from papy import RunAborted

    items = [0, 1, 2, _Unpicklable(), 4]
    with ProcessPool(1) as pool:
        pipe = Pipeline("boundary", pool=pool)
        pipe.add(abs_or_same, name="send")
        out = list(pipe.map(items, errors="yield"))
        assert [type(v).__name__ for v in out].count("Failure") == 1
        report = pipe.last_report
        assert report is not None and report.nodes["send"].failed == 1
        strict = Pipeline("boundary-raise", pool=pool)
        strict.add(abs_or_same, name="send", on_error="raise")
        with pytest.raises(RunAborted):
            list(strict.map(items))
        back = Pipeline("result-raise", pool=pool)
        back.add(_make_bad, name="make", on_error="raise")
        with pytest.raises(RunAborted):
            list(back.map(range(6)))
        counted = Pipeline("result-count", pool=pool)
        counted.add(_make_bad, name="make")
        list(counted.map(range(6), errors="skip"))
        assert counted.last_report is not None
        assert counted.last_report.nodes["make"].failed == 1


def abs_or_same(x: object) -> object:
    return x


_SCRIPT_EXCEPTION = """
import json
from papy import Pipeline, ProcessPool, ThreadPool


class Custom(Exception):
    pass


def bad(x):
    raise Custom(x)


if __name__ == "__main__":
    seen = {}
    with ProcessPool(1) as procs, ThreadPool(1) as threads:
        for name, pool in (("process", procs), ("thread", threads)):
            pipe = Pipeline("names", pool=pool)
            pipe.add(bad)
            [f] = pipe.map([1], errors="yield")
            seen[name] = [f.exc_type, pipe.run([1]).failure_counts]
    print(json.dumps(seen))
"""


def test_an_exception_class_of_the_script_has_one_name_on_every_pool(tmp_path: Path) -> None:
    """A process worker imports the driver's script as ``__mp_main__``: its classes must
    still be named ``__main__.Name``, as the driver and a thread pool name them."""
    import json

    script = tmp_path / "names.py"
    script.write_text(_SCRIPT_EXCEPTION)
    done = subprocess.run(
        [sys.executable, script.name], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    want = ["__main__.Custom", {"bad": {"__main__.Custom": 1}}]
    assert seen == {"process": want, "thread": want}


@pytest.mark.parametrize("method", ["fork", "spawn", "forkserver"])
def test_a_worker_is_seen_dead_while_a_process_it_forked_keeps_its_pipes(tmp_path, method):
    """The node forks a child (which inherits the worker's pipe and sentinel) and exits:
    the death is noticed at once, not when the child ends, and the child goes with it."""
    t0 = time.monotonic()
    with ProcessPool(1, start_method=method, initializer=faulthandler.disable) as pool:
        pipe = Pipeline("forked", pool=pool)
        pipe.add(fork_then_exit_on({3}, str(tmp_path), child_s=120), name="risky", batch=2)
        out = list(pipe.map(range(8), errors="yield"))
    elapsed = time.monotonic() - t0
    good, bad = _split(out)
    assert good == [2 * x for x in range(8) if x != 3]
    assert [f.item for f in bad] == [3] and isinstance(bad[0].exception, WorkerCrashed)
    assert elapsed < 60, f"the run waited {elapsed:.0f} s for the forked child"
    children = [int(p.read_text()) for p in tmp_path.glob("*.pid")]
    assert children and not [pid for pid in children if _running(pid)]


@pytest.mark.parametrize(
    "how, method",
    [("close", "fork"), ("close", "spawn"), ("close", "forkserver"), ("shutdown", "forkserver")],
)
def test_a_worker_that_closed_its_pipe_to_the_driver_is_replaced_not_waited_for(how, method):
    """A node closes every inherited descriptor (or shuts down its sockets for writing)
    and sleeps: its worker can never report. The pool kills and replaces it (the items
    fail), without spinning on the dead pipe, and without waiting for the node in a
    ``waitpid`` when the worker's sentinel (its own pipe under fork and spawn) closed
    first: the other worker's results keep coming, run after run."""
    fault = close_pipes_then_sleep_on if how == "close" else shut_sockets_then_sleep_on
    t0, cpu0 = time.monotonic(), time.process_time()
    with ProcessPool(2, start_method=method, initializer=faulthandler.disable) as pool:
        pipe = Pipeline("deaf", pool=pool)
        pipe.add(fault({2, 7}, seconds=120), name="deaf", batch=1)
        for _ in range(3):
            out = list(pipe.map(range(10), errors="yield"))
            good, bad = _split(out)
            assert good == [2 * x for x in range(10) if x not in (2, 7)]
            assert [f.item for f in bad] == [2, 7]
            assert all(isinstance(f.exception, WorkerCrashed) for f in bad)
            # the pool's own kill is not blamed on the node, nor on the OOM killer
            assert all("closed its pipe to the driver" in str(f.exception) for f in bad)
    elapsed, cpu = time.monotonic() - t0, time.process_time() - cpu0
    assert elapsed < 60, f"the run waited {elapsed:.0f} s for a worker that cannot report"
    assert cpu < elapsed / 2 + 1, f"the driver spun: {cpu:.1f} s of CPU in {elapsed:.1f} s"


def _running(pid: int) -> bool:
    """Tell whether process ``pid`` still runs (a zombie waiting for its reaper does not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_an_item_that_kills_the_other_workers_is_blamed_alone(tmp_path, method):
    # Each killer ran again to confirm it while other items ran beside it, and killed
    # their workers a second time: 3-5 innocent items of 100 failed with WorkerCrashed.
    # A job that killed a worker now runs again alone on the pool.
    killers = {10, 35, 60, 85}
    with ProcessPool(4, start_method=method) as pool:
        pipe = Pipeline("siblings", pool=pool)
        pipe.add(kill_siblings_on(killers, str(tmp_path)), name="killer")
        for _ in range(2):
            out = list(pipe.map(range(100), errors="yield"))
            good, bad = _split(out)
            assert sorted(f.item for f in bad) == sorted(killers)
            assert all(isinstance(f.exception, WorkerCrashed) for f in bad)
            assert good == [-x for x in range(100) if x not in killers]


_SERIAL_KILLER = """
import os, signal, sys, time
from papy import Pipeline, ProcessPool

def kill_for_two_seconds_on_10(x):
    # SIGKILL every other child of this worker's parent, starting ones too, for 2 s
    if x == 10:
        me, parent = os.getpid(), os.getppid()
        end = time.monotonic() + 2
        while time.monotonic() < end:
            for pid in map(int, filter(str.isdigit, os.listdir("/proc"))):
                try:
                    with open(f"/proc/{pid}/stat") as fh:
                        ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
                    with open(f"/proc/{pid}/cmdline", "rb") as fh:
                        helper = b"resource_tracker" in fh.read()
                    if pid != me and ppid == parent and not helper:
                        os.kill(pid, signal.SIGKILL)
                except (OSError, ValueError, IndexError):
                    pass
            time.sleep(0.05)
    time.sleep(0.05)
    return x * 3

if __name__ == "__main__":
    with ProcessPool(3, start_method=sys.argv[1]) as pool:
        pipe = Pipeline("serial-killer", pool=pool)
        pipe.add(kill_for_two_seconds_on_10, name="killer")
        out = list(pipe.map(range(60), errors="yield"))
    print("DELIVERED", sum(o == x * 3 for x, o in enumerate(out)), len(out))
"""


@pytest.mark.timeout(120)
def test_a_node_that_kills_workers_as_they_start_does_not_break_the_pool(tmp_path):
    # Replacements killed as they started counted as the pool's own start failures: three
    # in a row broke the pool (PoolError after 8 of 60 items, every time under spawn).
    script = tmp_path / "killer.py"
    script.write_text(_SERIAL_KILLER)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, str(script), "spawn"], env=env, capture_output=True, text=True, timeout=110
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "DELIVERED 60 60" in done.stdout  # item 10 returns once the killing is over


def _hang_in_initializer_once(marker: str):  # type: ignore[no-untyped-def]
    def init() -> None:
        if os.path.exists(marker):
            time.sleep(600)  # every worker started after item 20's crash

    return init


def _exit_on_20_once(marker: str):  # type: ignore[no-untyped-def]
    def fn(x: int) -> int:
        if x == 20 and not os.path.exists(marker):
            Path(marker).touch()
            os._exit(1)
        time.sleep(0.05)
        return x + 1

    return fn


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_a_replacement_whose_initializer_never_returns_leaves_its_work_to_the_others(
    tmp_path, method, monkeypatch, caplog
):
    # Jobs given to the replacement waited for it for good while the other worker idled.
    from papy.pools import _handles

    monkeypatch.setattr(_handles, "SLOW_START_S", 1.0)
    marker = str(tmp_path / "crashed")
    before = {c.pid for c in live_descendants()}
    pool = ProcessPool(2, start_method=method, initializer=_hang_in_initializer_once(marker))
    with pool:
        pipe = Pipeline("late-init", pool=pool)
        pipe.add(_exit_on_20_once(marker), name="work")
        assert list(pipe.map(range(60), errors="yield")) == [x + 1 for x in range(60)]
        assert "has not started after 1 s: its initializer" in caplog.text
    assert not [c for c in live_descendants() if c.pid not in before and _running(c.pid)]


def _hang_in_first_start(folder: str):  # type: ignore[no-untyped-def]
    def init() -> None:
        try:
            os.close(os.open(os.path.join(folder, "first"), os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            return
        time.sleep(600)

    return init


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["fork", "forkserver"])
@pytest.mark.parametrize("n", [1, 3])
def test_a_worker_that_never_had_a_job_takes_those_of_one_still_starting(tmp_path, method, n):
    # Found by the search over worker starts: the first worker's initializer never
    # returned and held the run's only tasks; the other worker, started and idle, never
    # looked for work (it took jobs only after delivering a result), so the run waited.
    pool = ProcessPool(2, start_method=method, initializer=_hang_in_first_start(str(tmp_path)))
    with pool:
        pipe = Pipeline("first-hangs", pool=pool)
        pipe.add(inc, name="inc", batch=1)
        for _ in range(2):
            assert list(pipe.map(range(n))) == [x + 1 for x in range(n)]


def _reads_eof(fd: int, seconds: float) -> bool:
    ready, _, _ = select.select([fd], [], [], seconds)
    return bool(ready) and os.read(fd, 1) == b""


@pytest.mark.timeout(60)
def test_a_fork_worker_lets_go_of_the_pipes_its_driver_had_open():
    # A fork worker kept every pipe end the driver had open: subprocess.run in a thread-pool
    # node waited for good for the end of its "exec worked" pipe, which a replacement
    # worker forked at that moment held (1 run in 2 to 6 hung).
    r, w = os.pipe()  # close-on-exec, as Python makes every pipe
    kept_r, kept_w = os.pipe()
    os.set_inheritable(kept_w, True)  # one made inheritable on purpose stays the workers'
    try:
        with ProcessPool(2, start_method="fork") as pool:
            pipe = Pipeline("pipes", pool=pool)
            pipe.add(inc, name="inc")
            assert list(pipe.map(range(4))) == [1, 2, 3, 4]  # the workers run
            os.close(w)
            w = -1
            assert _reads_eof(r, 10), "a worker holds the write end of the driver's pipe"
            os.close(kept_w)
            kept_w = -1
            assert not _reads_eof(kept_r, 0.5)  # the workers hold it: no end yet
        assert _reads_eof(kept_r, 10)  # their end: the pool closed
    finally:
        for fd in (r, w, kept_r, kept_w):
            if fd >= 0:
                os.close(fd)


# -- a worker that cannot be replaced ---------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize("method", ["fork", "forkserver"])
def test_a_pool_whose_first_workers_cannot_start_raises_pool_error_and_leaves_nothing(method):
    # A start that raised (no descriptors; a fork server that died on the previous pool's
    # request) escaped as that OSError or EOFError, tried once: it is now tried again and
    # then named in a PoolError.
    import resource

    from faults.test_recovery_search import limit_leaving

    before = {c.pid for c in live_descendants()}
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # two: the pool's own wake-up pipe, and nothing for a worker's pipes
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit_leaving(2), hard))
    try:
        with (
            pytest.raises(PoolError, match="could not be started") as raised,
            ProcessPool(2, start_method=method),
        ):
            pass
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert isinstance(raised.value.__cause__, OSError)
    assert {c.pid for c in live_descendants()} <= before
    with ProcessPool(2, start_method=method) as pool:  # descriptors again: it starts
        pipe = Pipeline("after", pool=pool)
        pipe.add(abs)
        assert list(pipe.map([-1, -2])) == [1, 2]


@pytest.mark.parametrize(
    "initializer, method, says",
    [
        (initializer_killed, "fork", "killed by SIGKILL, 3 times in a row); something outside"),
        (initializer_exits, "forkserver", "exited with code 5, 3 times in a row); see the"),
        (initializer_exits, "fork", "code 5, 3 times in a row); see the worker's stderr (and"),
    ],
)
def test_workers_that_die_as_they_start_break_the_pool_with_the_likely_cause(
    initializer, method, says
):
    with ProcessPool(2, start_method=method, initializer=initializer) as pool:
        pipe = Pipeline("unborn", pool=pool)
        pipe.add(abs)
        with pytest.raises(PoolError) as raised:
            list(pipe.map(range(4)))
    assert says in str(raised.value)
    # the main script is named only where a start imports it
    assert ("main script" in str(raised.value)) == (method != "fork" and "code" in says)


@pytest.mark.timeout(120)
def test_a_worker_that_cannot_be_started_again_breaks_the_pool_instead_of_hanging():
    # Starting a replacement worker raised in the pool's manager thread (a fork server
    # killed mid-start: EOFError), which died with it; the run then waited forever. Here
    # the driver runs out of file descriptors, so no worker can start after the crash.
    import resource

    with ProcessPool(2) as pool:
        pipe = Pipeline("no-restart", pool=pool)
        pipe.add(exit_on({0}), batch=1, name="exits")
        assert list(pipe.map([1, 2])) == [2, 4]  # the workers are up
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (3, hard))  # no new descriptor at all
        try:
            # the error says what the pool tried to replace: the crash, its node and item
            with pytest.raises(
                PoolError,
                match="could not be started .* to replace one that exited with code 3 "
                "running node 'exits' on 0$",
            ):
                list(pipe.map(range(6)))
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
