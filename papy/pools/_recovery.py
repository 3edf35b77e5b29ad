"""What a ProcessPool does after a worker died: re-run, halve, or report the item at fault.

A worker that dies (a crash, or a kill for a timeout) loses the task it ran. The pool runs
it again with every item announced in the worker's slot, so a second crash names the item;
a batched call that dies is halved until it holds one item; that item alone is run once
more to confirm, then reported as a :class:`~papy.WorkerCrashed` failure. Its batch-mates
complete normally.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Any

from papy._errors import PoolError, WorkerCrashed
from papy._items import qualified_type, short_repr
from papy._task import TaskResult
from papy.pools import _handles, _slot
from papy.pools._base import Task, merge_parts
from papy.pools._handles import Job, Worker, starts, warm_up
from papy.pools._messages import loads
from papy.pools._slot import read_slot

log = logging.getLogger("papy")

START_FAILURES = 3  # workers in a row that die before any work: the pool gives up


def _back_off(failures: int) -> None:
    """Pause before another worker start after ``failures`` in a row (0.1 s, doubling)."""
    time.sleep(0.1 * 2 ** (failures - 1))


def _start_error(exc: Exception) -> str:
    """Name the error of a worker start; a fork server that hung up is named as such."""
    text = f"{qualified_type(exc)}: {exc}"
    if isinstance(exc, EOFError):
        text = f"the multiprocessing fork server ended or hung up: {text}"
    return text


#: seconds at most that a pool keeps its other workers idle around a suspect (a job that
#: killed a worker already): a suspect that hangs, or work that runs long, cannot stall it
QUARANTINE_S = 2.0


def held(state: Any) -> bool:
    """Tell whether the pool (``state``: its ``State``) must not start its next pending
    job yet; ``state.holding`` is when it began to hold back.

    A job that killed its worker (a suspect) runs again alone on the pool, and nothing
    else starts while it runs, so a death during that run is its own: an item that kills
    *other* workers (it signals its siblings; its memory makes the kernel's OOM killer
    take another process) would otherwise be confirmed by the deaths of innocent items'
    workers, and they by its. After :data:`QUARANTINE_S` the pool stops waiting, until no
    suspect runs or waits any more (a suspect that hangs cannot stall it).
    """
    busy, suspect_runs = _suspects(state)
    if not suspect_runs and not (state.pending[0].crashes and busy):
        state.holding = None
        return False
    if state.holding is None:
        state.holding = time.monotonic()
        state.wake()  # the manager ticks while the pool holds back (the wait is bounded)
    return time.monotonic() - state.holding <= QUARANTINE_S


def tick(state: Any, workers: list[Worker]) -> bool:
    """Do what the pool's manager does on each turn (``state``: the pool's ``State``,
    locked; ``workers``: its live ones); return whether it must turn again soon.

    Jobs held back around a suspect are looked at again (that wait is bounded), a worker
    still starting after :data:`~papy.pools._handles.SLOW_START_S` is reported, once (an
    initializer that never returns leaves the pool waiting for it), and an idle worker
    that started takes the jobs of one still starting.
    """
    again = False
    if state.holding is not None:
        state.assign_locked()
        again = True
    now = time.monotonic()
    for w in workers:
        if w.born_by is None:
            continue
        if w.slot[_slot.INDEX] != _slot.UNBORN:
            w.born_by = None
        elif now >= w.born_by:
            w.born_by = None
            log.warning(
                "worker %s has not started after %.0f s: its initializer (or, under "
                "forkserver and spawn, the import of the main script) has not returned; "
                "the pool waits for it and its other workers take its tasks",
                w.process.pid,
                _handles.SLOW_START_S,
            )
        else:
            again = True
    # A worker that started and has nothing to do takes the jobs of one still starting
    # (it would otherwise wait for a result to come before it looks for work).
    if any(_slot.unborn(w.slot) and any(not j.withdrawn for j in w.jobs) for w in workers):
        again = True
        for w in workers:
            if not w.jobs and not _slot.unborn(w.slot):
                state.steal_locked(w)
    return again


def _suspects(state: Any) -> tuple[bool, bool]:
    """Return (a job is with a worker, a suspect is with a worker) for the pool's ``state``."""
    running = (j for w in state.pool if not w.dead for j in w.jobs if not j.withdrawn)
    busy = False
    for j in running:  # at most two jobs a worker: a short scan, no list per dispatch
        busy = True
        if j.crashes:
            return True, True
    return busy, False


def note_start_death(state: Any, code: int | None) -> None:
    """Count a worker that died before any work (exit ``code``) in the pool's ``state``.

    A start failure (``state.start_failures``; enough in a row break the pool), unless a
    signal killed it while another worker that started holds a job: that job may be
    what kills workers (an item that signals its siblings runs until it fails for good;
    its retries are bounded), and it is not the workers' start that fails. Such a death
    (``state.start_kills``) only makes the next start wait a little.
    """
    if (
        code is not None
        and code < 0
        and any(w.jobs and w.slot[_slot.INDEX] != _slot.UNBORN for w in state.pool if not w.dead)
    ):
        state.start_kills += 1
    else:
        state.start_failures += 1


def start_all(state: Any) -> None:
    """Start the pool's first workers (``state``: its ``State``), trying again after a
    start that raised.

    A fork server that died since the last pool (it exits on a malformed request, and one
    started while the driver was short of descriptors inherits that limit) fails the
    next start with ``EOFError``; ``multiprocessing`` starts a new one on the next try.
    After :data:`START_FAILURES` tries, raise PoolError naming the last error (its cause).
    """
    for attempt in range(START_FAILURES):
        try:
            warm_up(state.ctx)
            with state.lock:
                while len(state.pool) < state.size:
                    state.spawn()
            return
        except Exception as exc:
            if attempt + 1 == START_FAILURES:
                text = _start_error(exc)
                raise PoolError(f"a worker process could not be started ({text})") from exc
            _back_off(attempt + 1)


def respawn(state: Any, replacing: str = "one that died") -> bool:
    """Start a worker in place of a dead one (``state``: the pool's ``State``; the dead
    one described by ``replacing``, see :func:`death`); return False if the pool closed or
    broke meanwhile, or gave up.

    After workers that died before any work (``state.start_failures`` in a row) it first
    pauses, longer each time, and gives up at :data:`START_FAILURES` (the caller breaks
    the pool, naming how they died). A start that raises (the fork server was killed,
    say) counts the same; when the last one raised, the pool breaks here with a
    PoolError naming the error, so its tasks fail instead of waiting for workers that
    will never come.
    """
    error: Exception | None = None
    while True:
        failures = state.start_failures
        if failures >= START_FAILURES:
            if error is not None:
                text = _start_error(error)
                state.break_pool(
                    PoolError(
                        f"a worker process could not be started ({text}) to replace {replacing}"
                    )
                )
            return False
        if failures or state.start_kills:
            _back_off(max(failures, 1))
        with state.lock:
            if state.closed or state.broken is not None:
                return False
            try:
                state.spawn()
            except Exception as exc:
                state.start_failures += 1
                error = exc
            else:
                state.restarts += 1
                return True


def split(job: Job, parts: list[tuple[Task, int, bool] | TaskResult]) -> list[Job]:
    """Replace ``job`` by jobs for ``parts`` (tasks, or results already known), in order.

    The original job completes when every part has; finished parts complete at once.
    """
    callbacks = merge_parts(len(parts), job.done)
    jobs = []
    finished = []
    for part, on_done in zip(parts, callbacks):
        if isinstance(part, TaskResult):
            finished.append((on_done, part))
        else:
            task, crashes, track = part
            jobs.append(Job(task, on_done, job.fut, crashes, track))
    for on_done, result in finished:
        on_done(result)
    return jobs


def after_death(
    job: Job, code: int | None, where: tuple[int, int, int] | None, killed: bool = False
) -> list[Job]:
    """Return the jobs to run again after ``job``'s worker died; report what is known.

    ``where`` is (stage, item index, item count) from the worker's slot when it was
    running a tracked item; ``killed``: the worker hung up on the driver and the pool
    killed it. A late item fails with ``TimeoutError`` and its batch-mates
    run again; a crash re-runs the batch with every item tracked, then the named item
    alone to confirm, then reports it.
    """
    task = job.task
    n = len(task)
    stages = task.spec.stages
    if job.late is not None:
        s, i, c = job.late
        c = min(c, n - i)
        limit = stages[s].timeout or task.timeout or 0.0
        error = TimeoutError(
            f"item exceeded the node's timeout of {limit:g} s; its worker was killed and replaced"
        )
        failed = fail_in(task.slice(i, i + c), error, s)
        parts: list[tuple[Task, int, bool] | TaskResult] = []
        if i > 0:
            parts.append((task.slice(0, i), 0, False))
        parts.append(failed)
        if i + c < n:
            parts.append((task.slice(i + c, n), 0, False))
        return split(job, parts)
    crashes = job.crashes + 1
    if where is not None and where[1] < n:
        s, i, c = where
        c = min(c, n - i)
        phase = _PHASES.get(s)
        if phase is not None:  # rebuilding an item, pickling its result: that item alone
            s, c = (0 if s == _slot.REBUILD else len(stages) - 1), 1
        if c > 1:
            # A batched call of c items died: one of them is the culprit, but which is
            # unknown. Halve the call (its batch-mates outside it re-run as they are)
            # until the call holds one item, which is then confirmed as usual.
            half = c // 2
            parts = []
            if i > 0:
                parts.append((task.slice(0, i), 0, False))
            parts.append((task.slice(i, i + half), 0, True))
            parts.append((task.slice(i + half, i + c), 0, True))
            if i + c < n:
                parts.append((task.slice(i + c, n), 0, False))
            return split(job, parts)
        if c >= n:
            if crashes >= 2:
                crash = WorkerCrashed(describe_exit(code, phase, killed), code)
                job.done(fail_in(task, crash, s, crashes))
                return []
            job.crashes, job.track = crashes, True
            return [job]
        parts = []
        if i > 0:
            parts.append((task.slice(0, i), 0, False))
        parts.append((task.slice(i, i + c), crashes, True))
        if i + c < n:
            parts.append((task.slice(i + c, n), 0, False))
        return split(job, parts)
    if n == 1:
        if crashes >= 2:
            crash = WorkerCrashed(describe_exit(code, None, killed), code)
            job.done(fail_in(task, crash, 0, crashes))
            return []
        job.crashes, job.track = crashes, True
        return [job]
    if not job.track:
        job.track = True  # run it again, every item announced: the next crash names it
        return [job]
    half = n // 2  # died outside any tracked item: fall back to halving
    return split(job, [(task.slice(0, half), 0, True), (task.slice(half, n), 0, True)])


def fail_in(task: Task, exc: BaseException, stage: int, attempts: int = 1) -> TaskResult:
    """Return ``task`` failed with ``exc`` in stage ``stage``, counted as a run counts it.

    Every stage of the step counts the items in (a Failure passes through the stages
    after the one it failed in, as it would in the worker), and stage ``stage`` counts
    them failed, so the report and ``on_error="raise"`` see the crash or the timeout.
    """
    result = task.fail_all(exc, task.spec.stages[stage].name, attempts)
    for st in result.stats:
        st.n_in = len(task)
    return result


def has_timeout(task: Task) -> bool:
    return any(s.timeout is not None for s in task.spec.stages)


#: what a worker did to an item while its slot's stage was one of these
_PHASES = {
    _slot.REBUILD: "rebuilding this item from its pickle",
    _slot.SEND: "pickling this item's result",
}


def describe_exit(code: int | None, phase: str | None = None, killed: bool = False) -> str:
    """Say how a worker ended, and what it was doing: running this item unless ``phase``.

    ``killed``: it was alive when its pipe to the driver closed (a node that closed the
    worker's descriptors, say), and the pool killed it.
    """
    doing = phase or "running this item"
    if killed:
        return (
            f"the worker process closed its pipe to the driver while {doing} "
            f"and was killed by the pool"
        )
    if code is None:
        return f"the worker process died while {doing}"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the worker process was killed by {name} while {doing}"
    return f"the worker process exited with code {code} while {doing}"


def death(
    code: int | None, running: tuple[int, int, int, int, float] | None, jobs: list[Job]
) -> str:
    """Describe a dead worker for an error that follows from its death: how it ended
    and, from its slot (``running``: job, stage, index, count, start), the node it was
    running and the item (the task's own input: the step's first node only)."""
    text = describe_exit(code).replace(" while running this item", "")
    text = text.replace("the worker process ", "one that ")
    if running is None:
        return text
    job_id, stage, index = running[0], running[1], running[2]
    job = next((j for j in jobs if j.id == job_id), None)
    if job is None or not 0 <= stage < len(job.task.spec.stages):
        return text
    text += f" running node {job.task.spec.stages[stage].name!r}"
    if index < 0 and len(job.task) == 1:
        index = 0  # an untracked task of one item
    if stage == 0 and 0 <= index < len(job.task):
        text += f" on {short_repr(job.task.values[index])}"
    return text


def rerun(
    lost: list[Job],
    code: int | None,
    unborn: bool,
    running: tuple[int, int, int, int, float] | None,
    seen: int,
    killed: bool = False,
) -> list[Job]:
    """Return the jobs to run again of a dead worker that held ``lost`` (in order).

    ``running`` is what its slot said (job, stage, index, count, start), ``seen`` the last
    job it took up; ``unborn`` means it died before it could run anything, so no job is to
    blame. A job it never took up is sent again unchanged, its future still pending (so
    ``cancel`` can withdraw it); the one it ran is marked running and re-run or reported.
    """
    retry: list[Job] = []
    blamed = False
    for job in lost:
        if unborn or blamed or job.id > seen:
            retry.append(job)  # never started: not its fault
            continue
        blamed = True
        starts(job.fut)
        where = None
        if running is not None and running[0] == job.id and running[2] >= 0:
            where = (running[1], running[2], max(1, running[3]))
        retry.extend(after_death(job, code, where, killed))
    return retry


def late_workers(workers: list[Worker], slack: float) -> list[Worker]:
    """Return the workers whose current item ran past its node's timeout (+ ``slack`` s).

    Marks the job of each (``job.late``) with the stage and items at fault.
    """
    now = time.monotonic()
    victims = []
    for w in workers:
        if w.dead or not w.jobs:
            continue
        running = read_slot(w.slot)
        if running is None:
            continue
        job_id, s, i, c, start = running
        if i < 0 or s < 0:
            continue
        job = next((j for j in w.jobs if j.id == job_id), None)
        if job is None or job.late is not None:
            continue
        stages = job.task.spec.stages
        limit = stages[s].timeout if s < len(stages) else None
        if limit is None or stages[s].is_async:
            continue  # no limit, or asyncio enforces it inside the task
        if now > start + max(1, c) * limit + slack:
            job.late = (s, i, max(1, c))
            victims.append(w)
    return victims


def start_failure(code: int | None, times: int, method: str) -> PoolError:
    """Return the error that breaks a pool whose workers die ``times`` in a row at start.

    The hint follows the death: a signal comes from outside the worker (the kernel's
    out-of-memory killer, another program, a node signalling other processes); an exit
    code from its own start, where ``spawn`` and ``forkserver`` import the main script.
    """
    how = describe_exit(code).replace(" while running this item", "")
    if code is not None and code < 0:
        hint = (
            "something outside the workers kills them as they start (the kernel's "
            "out-of-memory killer, another program, or a node that signals other processes)"
        )
    elif method == "fork":
        hint = "see the worker's stderr (and the pool's initializer, if it has one)"
    else:
        hint = (
            f"see the worker's stderr. With the {method!r} start method a worker first "
            "imports the main script (one with an 'if __name__ == \"__main__\":' "
            "block): its top-level code must run without error there"
        )
    return PoolError(
        f"ProcessPool workers exit before they can start ({how}, {times} times in a row); " + hint
    )


def init_failure(text: str, body: memoryview) -> PoolError:
    """Return the error that breaks a pool whose ``initializer`` failed in a worker.

    ``text`` is the traceback; ``body`` the pickled exception, its cause when it loads.
    """
    try:
        cause: BaseException | None = loads(body)
    except Exception:
        cause = None
    error = PoolError(f"the ProcessPool's initializer failed in a worker:\n{text}".rstrip())
    error.__cause__ = cause
    return error
