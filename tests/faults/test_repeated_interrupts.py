"""Ctrl-C after Ctrl-C on one journal, in one process: nothing repeated, nothing stuck.

A program (a notebook, a server) runs a journaled pipeline on a thread pool again and
again, each run hit by a real SIGINT at a random moment: while it submits tasks, while
the watchdog gives up on a late item, while the run closes its journal, or after it
ended. Every run after an interrupt must start (the journal is not left locked by the
process itself), none may hang, and in the end every sink item's side effect happened
once, with every output its own item's (or a ``TimeoutError`` of an item that overran).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_PROGRAM = textwrap.dedent(
    """
    import collections, os, random, signal, sys, threading, time
    sys.path.insert(0, {root!r})
    import logging
    logging.getLogger("papy").setLevel(logging.CRITICAL)
    from papy import Failure, Pipeline, ThreadPool

    random.seed({seed})
    journal, effects = sys.argv[1], sys.argv[2]
    fd = os.open(effects, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def sink(x):
        if x % 13 == 0:
            time.sleep(0.3)  # past the timeout: the late call still ends, side effect too
        os.write(fd, f"{{x}}\\n".encode())
        return x * 10

    def interrupt(at):
        time.sleep(at)
        os.kill(os.getpid(), signal.SIGINT)

    items = list(range(200))
    with ThreadPool(4) as pool:
        pipe = Pipeline("again", pool=pool)
        pipe.add(sink, name="sink", timeout=0.2, batch=random.choice([1, 4]))
        for _ in range(8):
            killer = threading.Thread(target=interrupt, args=(random.uniform(0, 0.4),))
            killer.start()
            try:
                list(pipe.map(items, journal=journal, errors="yield", progress=False))
            except KeyboardInterrupt:
                pass
            try:
                killer.join()
            except KeyboardInterrupt:
                pass  # it landed after the run
        out = list(pipe.map(items, journal=journal, errors="yield", progress=False))
    time.sleep(0.5)  # every late call has ended
    done = collections.Counter(open(effects).read().split())
    twice = sorted(int(x) for x, k in done.items() if k > 1)
    never = sorted(x for x in items if str(x) not in done)
    wrong = [
        x for x, o in zip(items, out)
        if not (o == x * 10 or (isinstance(o, Failure) and o.exc_type == "TimeoutError"))
    ]
    print("twice", twice, "never", never, "wrong", wrong)
    """
)


# Found by this test: a batch cut short (a late item's batch-mates done, the run then
# interrupted) left its records in a pending file named by its thread's ident; a later
# batch on a new thread that got the same ident truncated that file before anyone folded
# it, and the next run did those batch-mates again (seed 9: items 36-38, 4 of 5 runs).
@pytest.mark.parametrize("seed", [1, 5, 9])
def test_runs_interrupted_again_and_again_repeat_nothing_and_never_stick(tmp_path, seed):
    script = tmp_path / "again.py"
    script.write_text(_PROGRAM.format(root=str(ROOT), seed=seed))
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "run.db"), str(tmp_path / "effects")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "twice [] never [] wrong []", done.stderr[-3000:]
