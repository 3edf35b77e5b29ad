"""Functions that fail for real: segfaults, hard exits, hangs, unpicklable results."""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
import uuid
from pathlib import Path


def segfault_on(bad: set[int]):
    def fn(x: int) -> int:
        if x in bad:
            ctypes.string_at(0)  # a real SIGSEGV in the worker
        return x * 2

    return fn


def exit_on(bad: set[int]):
    def fn(x: int) -> int:
        if x in bad:
            os._exit(3)
        return x * 2

    return fn


def cpu_ms(x: int, ms: float = 1.0) -> int:
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        pass
    return x


def sleep_on(bad: set[int], seconds: float = 30.0):
    def fn(x: int) -> int:
        if x in bad:
            time.sleep(seconds)
        return x

    return fn


def flaky_once(counter_dir: str):
    """Fail the first attempt at every item; succeed on the second (counted in files)."""

    def fn(x: int) -> int:
        path = Path(counter_dir) / f"{x}.{uuid.uuid4().hex}"
        path.write_text("x")
        attempts = len(list(Path(counter_dir).glob(f"{x}.*")))
        if attempts < 2:
            raise ConnectionError(f"transient failure on {x}")
        return x

    return fn


def unpicklable_result(x: int):
    if x == 5:
        return threading.Lock()
    return x


def slow_on(slow: set[int], seconds: float):
    """Return a function that sleeps ``seconds`` on the items in ``slow``."""

    def fn(x: int) -> int:
        if x in slow:
            time.sleep(seconds)
        return x

    return fn


def worker_pid(x: object) -> int:
    return os.getpid()


def big_item_pid(x: bytes) -> tuple[int, float]:
    """Take a large item; return (worker pid, time); item 0 stalls its worker 3 s."""
    if x[:1] == b"S":
        time.sleep(3.0)
    return os.getpid(), time.monotonic()


def start_sleeper_and_hang(path: str):
    """Start a grandchild ``sleep`` (its pid written to ``path``), then hang."""

    def fn(x: int) -> int:
        import subprocess

        child = subprocess.Popen(["sleep", "300"])
        Path(path).write_text(str(child.pid))
        time.sleep(300)
        return x

    return fn


def nested_mp_pool(x: int) -> int:
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(2) as p:
        return sum(p.map(abs, [-x, -1]))


def nested_fork_pool(x: int) -> int:
    """Map over a fork ``multiprocessing.Pool`` and leave it at once: its ``terminate()``
    signals workers that may have been forked a moment before."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(2) as p:
        return sum(p.map(abs, range(-x, 1)))


def _own_sigterm(signum: int, frame: object) -> None:
    os._exit(0)


def child_signal_handlers(x: int) -> tuple[str, str, str]:
    """Return how a child forked by the node handles SIGTERM and SIGINT, and whether a
    Python program the node runs has its default SIGINT handler. With ``x == 1`` the node
    sets its own handlers (SIGINT ignored, SIGTERM its own) around the fork, as code
    starting a ``multiprocessing.Pool`` often does."""
    import signal
    import subprocess
    import sys

    if x == 1:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN), signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _own_sigterm)
        try:
            return (*child_signal_handlers(0)[:2], "")
        finally:
            signal.signal(signal.SIGINT, old[0])
            signal.signal(signal.SIGTERM, old[1])
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report and leave, running nothing else
        term = signal.getsignal(signal.SIGTERM)
        intr = signal.getsignal(signal.SIGINT)
        names = [
            "default"
            if h is signal.SIG_DFL
            else "python-default"
            if h is signal.default_int_handler
            else "ignored"
            if h is signal.SIG_IGN
            else getattr(h, "__name__", repr(h))
            for h in (term, intr)
        ]
        os.write(w, "|".join(names).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        term_name, intr_name = f.read().split("|")
    os.waitpid(pid, 0)
    code = "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)"
    program = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    return term_name, intr_name, program


def nested_executor(x: int) -> int:
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2) as ex:
        return sum(ex.map(abs, [-x, -1]))


def nested_papy(x: int) -> int:
    from papy import Pipeline, ProcessPool

    with ProcessPool(2) as pool:
        pipe = Pipeline("inner", pool=pool)
        pipe.add(abs)
        return sum(pipe.map([-x, -1]))


def failing_initializer() -> None:
    raise RuntimeError("cannot reach the license server")


def log_something(x: int) -> int:
    import logging

    logging.getLogger(f"papy-test-{x}").info("item %s", x)
    return x


GUARD = threading.Lock()  # a module-level lock, as in a logging handler or a client library


def under_guard(x: int) -> int:
    with GUARD:
        return x


def _rebuild_in(v: int, pid: int) -> DriverOnly:
    if os.getpid() != pid:
        raise ValueError(f"cannot rebuild {v} outside process {pid}")
    return DriverOnly(v, pid)


class DriverOnly:
    """An item that pickles, but can be rebuilt only in the process that made it."""

    def __init__(self, v: int, pid: int) -> None:
        self.v, self.pid = v, pid

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_rebuild_in, (self.v, self.pid))

    def __repr__(self) -> str:
        return f"DriverOnly({self.v})"


def _exit_when_rebuilt(v: int, code: int, pid: int) -> ExitsWhenRebuilt:
    if os.getpid() != pid:
        os._exit(code)
    return ExitsWhenRebuilt(v, code, pid)


class ExitsWhenRebuilt:
    """An item that pickles, but whose rebuilding ends any process but the one that made
    it (a C extension type that crashes when unpickled in a worker, say)."""

    def __init__(self, v: int, code: int, pid: int) -> None:
        self.v, self.code, self.pid = v, code, pid

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_exit_when_rebuilt, (self.v, self.code, self.pid))

    def __repr__(self) -> str:
        return f"ExitsWhenRebuilt({self.v})"


class ExitsWhenPickled:
    """A result whose pickling ends the process that pickles it (the worker sending it)."""

    def __init__(self, code: int) -> None:
        self.code = code

    def __reduce__(self):  # type: ignore[no-untyped-def]
        os._exit(self.code)


def exits_when_pickled_on(bad: set[int], code: int = 5):
    def fn(x: int) -> object:
        if x in bad:
            return ExitsWhenPickled(code)
        return x * 2

    return fn


def sigterm_self_on(bad: set[int]):
    def fn(x: int) -> int:
        if x in bad:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        return x * 2

    return fn


def fork_then_exit_on(bad: set[int], pid_dir: str, child_s: float = 60.0):
    """Fork a child that keeps every descriptor of the worker (its pipes, its sentinel)
    and outlives it, then exit: the worker is gone, its pipes are not. The child's pid
    goes to ``pid_dir``."""

    def fn(x: int) -> int:
        if x in bad:
            child = os.fork()
            if child == 0:
                time.sleep(child_s)
                os._exit(0)
            Path(pid_dir, f"{child}.pid").write_text(str(child))
            os._exit(3)
        return x * 2

    return fn


def close_pipes_then_sleep_on(bad: set[int], seconds: float = 60.0):
    """Close every inherited descriptor (the worker's pipe to the driver included) and
    stay alive: the worker can no longer report anything."""

    def fn(x: int) -> int:
        if x in bad:
            os.closerange(3, 4096)
            time.sleep(seconds)
        return x * 2

    return fn


def shut_sockets_then_sleep_on(bad: set[int], seconds: float = 60.0):
    """Shut down the writing side of every socket the worker holds (its pipe to the
    driver is one) and stay alive: the driver reads the end of the pipe, not a hang-up."""

    def fn(x: int) -> int:
        if x in bad:
            import socket
            import stat

            for fd in range(3, 4096):
                try:
                    if stat.S_ISSOCK(os.fstat(fd).st_mode):
                        socket.socket(fileno=os.dup(fd)).shutdown(socket.SHUT_WR)
                except OSError:
                    pass
            time.sleep(seconds)
        return x * 2

    return fn


# -- the signal handling of processes a node starts (tests/faults/test_recovery_search.py) --

#: what a node does to a signal's handler before it starts a child, then undoes
HANDLER_SETUPS = ("untouched", "ignore", "default", "own")
#: how the node starts the child
CHILD_KINDS = ("fork", "mp_fork", "mp_spawn", "mp_forkserver", "program")


def _own_sigint(signum: int, frame: object) -> None:
    os._exit(0)


def handler_name(handler: object) -> str:
    """Name a signal handler as ``signal.getsignal`` returns it."""
    import signal

    if handler is signal.SIG_DFL:
        return "default"
    if handler is signal.SIG_IGN:
        return "ignored"
    if handler is signal.default_int_handler:
        return "python-default"
    return getattr(handler, "__name__", repr(handler))


def _report_handlers(conn: object) -> None:
    import signal

    names = tuple(handler_name(signal.getsignal(s)) for s in (signal.SIGTERM, signal.SIGINT))
    conn.send(names)  # type: ignore[attr-defined]
    conn.close()  # type: ignore[attr-defined]


def child_handlers(spec: tuple[str, str, str]) -> tuple[str, str]:
    """Return how a child the node starts handles (SIGTERM, SIGINT).

    ``spec`` is (SIGTERM setup, SIGINT setup, child kind) from :data:`HANDLER_SETUPS` and
    :data:`CHILD_KINDS`. The node sets the handlers (only where it may: in a main thread),
    starts the child, and restores what it found, as code around ``multiprocessing`` does.
    """
    import multiprocessing
    import signal
    import subprocess
    import sys

    term_setup, int_setup, kind = spec
    own = {signal.SIGTERM: _own_sigterm, signal.SIGINT: _own_sigint}
    installed = {"ignore": signal.SIG_IGN, "default": signal.SIG_DFL}
    old = {}
    for sig, setup in ((signal.SIGTERM, term_setup), (signal.SIGINT, int_setup)):
        if setup != "untouched":
            old[sig] = signal.signal(sig, installed.get(setup, own[sig]))
    try:
        if kind == "program":
            code = (
                "import signal, sys; sys.path.insert(0, sys.argv[1]);"
                "from faults.crashers import handler_name;"
                "print(handler_name(signal.getsignal(signal.SIGTERM)),"
                " handler_name(signal.getsignal(signal.SIGINT)))"
            )
            tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            out = subprocess.run(
                [sys.executable, "-c", code, tests], capture_output=True, text=True, check=True
            ).stdout.split()
            return out[0], out[1]
        if kind == "fork":
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                names = [handler_name(signal.getsignal(s)) for s in (signal.SIGTERM, signal.SIGINT)]
                os.write(w, " ".join(names).encode())
                os._exit(0)
            os.close(w)
            with os.fdopen(r) as f:
                term, intr = f.read().split()
            os.waitpid(pid, 0)
            return term, intr
        ctx = multiprocessing.get_context(kind.removeprefix("mp_"))
        receiver, sender = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_report_handlers, args=(sender,))
        child.start()
        sender.close()
        names = receiver.recv()
        child.join()
        return names
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def initializer_killed() -> None:
    """An initializer whose process is killed by a signal (as the OOM killer would)."""
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def initializer_exits() -> None:
    os._exit(5)


def kill_siblings_on(bad: set[int], pid_dir: str):
    """A node that, on the items in ``bad``, SIGKILLs every other worker of its pool and
    then its own (as an item whose memory makes the kernel's OOM killer take other
    processes would). Workers are known by the pid files the node writes on every item,
    and killed only if they still share this worker's parent (a pid is never reused
    under a test's feet)."""
    import signal

    from reference import kill_siblings

    def fn(x: int) -> int:
        Path(pid_dir, str(os.getpid())).touch()
        if x in bad:
            kill_siblings(pid_dir)
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.01)
        return -x

    return fn
