"""How much of the machine other programs took while a benchmark cell ran.

The load average cannot tell: it counts the suite's own processes too (a driver and two
workers are three runnable processes on two cores, a load of 3 on a machine nobody else
uses). This measures the others directly, per cell: the CPU time the whole machine spent
(``/proc/stat``) minus the CPU time of the suite's own processes, which are all reaped by
the suite (its cells, and through ``PR_SET_CHILD_SUBREAPER`` whatever they left behind: a
fork server, a cluster's processes), so their time is in ``RUSAGE_CHILDREN``. The share
is that time over the cell's wall time times the cores: 0.0 on a machine nobody else
uses, 0.5 when other programs kept one core of two busy.
"""

from __future__ import annotations

import ctypes
import os
import resource
import time

import psutil

_PR_SET_CHILD_SUBREAPER = 36
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def adopt_orphans() -> bool:
    """Make this process the reaper of its orphaned descendants (Linux); False if not."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _reap_orphans(wait_s: float) -> None:
    """Reap the descendants a cell left (their CPU time, and that of the processes they
    reaped, joins ``RUSAGE_CHILDREN``), waiting up to ``wait_s`` for them to end: a fork
    server holds its workers' time until it exits, a moment after its cell."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return  # none left
        if pid == 0:
            if time.monotonic() >= deadline:
                return
            time.sleep(0.005)


def _machine_busy_s() -> float:
    """CPU seconds the machine spent busy since boot, all cores (idle and iowait apart)."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is inside user)
    return (sum(fields[:8]) - fields[3] - fields[4]) / _TICK


def _own_s() -> float:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _living() -> dict[tuple[int, float], float]:
    """CPU seconds so far of each live descendant (a cell's process that outlives it: a
    cluster's, Ray's), by (pid, start time)."""
    got = {}
    for p in psutil.Process().children(recursive=True):
        try:
            with p.oneshot():
                t = p.cpu_times()
                got[(p.pid, p.create_time())] = t.user + t.system
        except psutil.Error:
            pass
    return got


Sample = tuple[float, float, float, dict[tuple[int, float], float]]


def sample(wait_s: float = 0.0) -> Sample | None:
    """Return (time, machine busy s, reaped own s, live descendants' s) now, or None where
    ``/proc/stat`` is missing, after waiting up to ``wait_s`` for the cell's leftover
    processes to end."""
    _reap_orphans(wait_s)
    try:
        busy = _machine_busy_s()
    except (OSError, ValueError, IndexError):
        return None
    return time.monotonic(), busy, _own_s(), _living()


def used(before: Sample, after: Sample) -> tuple[float, float, float]:
    """Return (wall s, the suite's CPU s, other programs' CPU s) between two samples.

    The suite's: what its reaped processes used (a process reaped meanwhile counts its
    whole life there, so what it had used before is taken off), plus what its live
    descendants used meanwhile.
    """
    old, new = before[3], after[3]
    own = after[2] - before[2]
    own -= sum(cpu for key, cpu in old.items() if key not in new)
    own += sum(cpu - old.get(key, 0.0) for key, cpu in new.items())
    return after[0] - before[0], own, max(0.0, after[1] - before[1] - own)


def share(before: Sample | None, cores: int) -> float | None:
    """Return the share of the machine (0-1) other programs used since ``before``."""
    after = sample(wait_s=2.0)
    if before is None or after is None:
        return None
    wall, _, theirs = used(before, after)
    return theirs / (wall * cores) if wall > 0 else None
