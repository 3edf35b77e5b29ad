"""PaPy in a real Jupyter kernel, driven by nbclient as a notebook front-end would.

Functions and lambdas defined in cells run on a ProcessPool, map() streams, the progress
table is displayed in the cell's output, an interrupt stops the run without leaving a
worker, and a second run in the same kernel works.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
KERNEL = "python3"


def _ensure_kernel() -> None:
    """Register this interpreter's kernel in its prefix if it is not there yet."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL)
        if Path(spec.argv[0]).resolve() == Path(sys.executable).resolve():
            return
    except NoSuchKernel:
        pass
    subprocess.run(
        [sys.executable, "-m", "ipykernel", "install", "--sys-prefix", "--name", KERNEL],
        check=True,
        capture_output=True,
    )


SETUP = f"""
import sys, os, time
sys.path.insert(0, {str(ROOT)!r})
import psutil
from papy import Pipeline, ProcessPool

def square(x):
    return x * x

pool = ProcessPool(2)
pipe = Pipeline("cells", pool=pool)
sq = pipe.add(square)
pipe.add(lambda y: y + 1, after=sq, name="plus_one")
print(os.getpid())
"""

STREAM = """
consumed = []
def numbers(n):
    for i in range(n):
        consumed.append(i)
        yield i

pipe.buffer = 1_000  # admission stops there: a bound, not a race with the workers
it = pipe.map(numbers(20_000), progress=False)
first = next(it)
at_first = len(consumed)
rest = list(it)
pipe.buffer = None
where = Pipeline("where", pool=pool)
where.add(lambda x: os.getpid())
pids = set(where.map(range(200), progress=False))
print(json.dumps({"first": first, "at_first": at_first, "n": 1 + len(rest),
                  "in_workers": bool(pids) and os.getpid() not in pids,
                  "ok": [first, *rest] == [i * i + 1 for i in range(20_000)]}))
"""

PROGRESS = """
report = pipe.run(range(300))  # progress: on by default in a notebook
print(report.items, report.failed)
"""

SLOW = """
def slow(x):
    time.sleep(0.05)
    return x

before = {p.pid for p in psutil.Process().children(recursive=True)}  # the user's pool
slow_pipe = Pipeline("slow")  # its ProcessPool is made for the run and closed after it
slow_pipe.add(slow)
print("starting", flush=True)
slow_pipe.run(range(100_000), progress=False)
"""

AFTER = """
import multiprocessing
deadline = time.time() + 20
while time.time() < deadline:
    kids = [p for p in psutil.Process().children(recursive=True)
            if p.status() != psutil.STATUS_ZOMBIE and p.pid not in before]
    if not kids:
        break
    time.sleep(0.2)
print(json.dumps({"left": len(kids)}))
"""

AGAIN = """
again = list(pipe.map(range(1000), progress=False))
print(json.dumps({"again_ok": again == [i * i + 1 for i in range(1000)]}))
pool.close()
"""


def _stdout(cell: Any) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.get("name") == "stdout")


def _last_json(cell: Any) -> dict[str, Any]:
    line = [x for x in _stdout(cell).splitlines() if x.startswith("{")][-1]
    return json.loads(line)


@pytest.fixture
def client() -> Iterator[Any]:
    _ensure_kernel()
    nb = nbformat.v4.new_notebook()
    sources = ["import json\n" + SETUP, STREAM, PROGRESS, SLOW, AFTER, AGAIN]
    nb.cells = [nbformat.v4.new_code_cell(src) for src in sources]
    c = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=120, resources={})
    with c.setup_kernel():
        yield c


@pytest.mark.timeout(300)
def test_notebook_cells_run_on_a_process_pool_stream_show_progress_and_interrupt(client):
    nb = client.nb
    client.execute_cell(nb.cells[0], 0)
    kernel_pid = int(_stdout(nb.cells[0]).split()[-1])

    # Functions and lambdas of cells run in worker processes; results stream.
    client.execute_cell(nb.cells[1], 1)
    got = _last_json(nb.cells[1])
    assert got["ok"] and got["n"] == 20_000 and got["first"] == 1 and got["in_workers"]
    # the first output came before the input was all read: admission stops at the buffer
    assert got["at_first"] < 20_000

    # The progress table is a display in the cell's output (HTML from rich).
    client.execute_cell(nb.cells[2], 2)
    assert _stdout(nb.cells[2]).split() == ["300", "0"]
    shown = [o for o in nb.cells[2].outputs if o.get("output_type") == "display_data"]
    assert shown, nb.cells[2].outputs
    html = shown[-1]["data"].get("text/html", "")
    text = shown[-1]["data"].get("text/plain", "")
    for word in ("square", "plus_one", "300"):
        assert word in html and word in text

    # Interrupt the kernel (what the notebook's stop button does) during a long run.
    def interrupt() -> None:
        deadline = time.time() + 60
        while "starting" not in _stdout(nb.cells[3]) and time.time() < deadline:
            time.sleep(0.1)
        time.sleep(2.0)
        asyncio.run(client.km.interrupt_kernel())

    t = threading.Thread(target=interrupt)
    t.start()
    started = time.time()
    with pytest.raises(nbclient.exceptions.CellExecutionError) as info:
        client.execute_cell(nb.cells[3], 3)
    t.join()
    assert "KeyboardInterrupt" in str(info.value)
    assert time.time() - started < 60  # 100,000 x 50 ms would take over 40 minutes

    # No worker of the interrupted run is left (the user's own pool stays, as it should).
    client.execute_cell(nb.cells[4], 4)
    assert _last_json(nb.cells[4])["left"] == 0
    import psutil

    assert psutil.pid_exists(kernel_pid)

    # The same kernel runs again.
    client.execute_cell(nb.cells[5], 5)
    assert _last_json(nb.cells[5])["again_ok"]
