"""ThreadPool: run tasks on threads of the driver process.

Right for I/O-bound nodes (network, disk, external programs) and for code that releases the
GIL (numpy, compression). Items are not pickled.

Timeouts: a thread cannot be stopped from outside, so a task that overruns its deadline is
*abandoned*: its items are reported as ``TimeoutError`` failures right away, a new thread
takes the abandoned one's place so the pool keeps its size, and whatever the abandoned
thread returns later is discarded. The abandoned call still runs to its end in the
background; use a ProcessPool when a stuck call must really be stopped.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any

from papy._task import TaskResult, run_task
from papy.pools._base import Pool, Task

log = logging.getLogger("papy")


class _Running:
    """A task a thread is running, and whether the watchdog gave up on it."""

    __slots__ = ("task", "future", "abandoned", "lock")

    def __init__(self, task: Task, future: Future[TaskResult]) -> None:
        self.task = task
        self.future = future
        self.abandoned = False
        self.lock = threading.Lock()


class ThreadPool(Pool):
    """Run tasks on ``workers`` threads (default: ``min(32, cores + 4)``)."""

    kind = "thread"

    def __init__(self, workers: int | None = None, *, name: str = "papy-thread") -> None:
        super().__init__()
        if workers is not None and workers < 1:
            raise ValueError(f"ThreadPool needs at least one worker, got {workers}")
        self.workers = workers or min(32, (os.cpu_count() or 1) + 4)
        self._name = name
        self._queue: queue.SimpleQueue[_Running | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._deadlines: list[tuple[float, int, _Running]] = []
        self._deadline_lock = threading.Condition()
        self._counter = itertools.count()
        self._watchdog: threading.Thread | None = None

    def _start(self) -> None:
        for _ in range(self.workers):
            self._spawn()

    def _spawn(self) -> None:
        t = threading.Thread(
            target=self._work, name=f"{self._name}-{next(self._counter)}", daemon=True
        )
        self._threads.append(t)
        t.start()

    def _work(self) -> None:
        while True:
            running = self._queue.get()
            if running is None:
                return
            if not running.future.set_running_or_notify_cancel():
                continue
            task = running.task
            if task.timeout is not None:
                self._watch(running, time.monotonic() + task.timeout * max(1, len(task)))
            try:
                result: TaskResult | None = run_task(
                    task.spec, task.keys, task.values, task.jkeys, task.dirty
                )
                error: BaseException | None = None
            except BaseException as exc:  # keep the thread alive; the task reports it
                result, error = None, exc
            with running.lock:
                if running.abandoned:
                    return  # a replacement thread already took this one's place
                running.abandoned = True  # i.e. finished: the watchdog must not fire now
            if error is not None:
                running.future.set_exception(error)
            else:
                running.future.set_result(result)  # type: ignore[arg-type]

    def _watch(self, running: _Running, deadline: float) -> None:
        with self._deadline_lock:
            heapq.heappush(self._deadlines, (deadline, next(self._counter), running))
            if self._watchdog is None:
                self._watchdog = threading.Thread(
                    target=self._watch_loop, name=f"{self._name}-watchdog", daemon=True
                )
                self._watchdog.start()
            self._deadline_lock.notify()

    def _watch_loop(self) -> None:
        with self._deadline_lock:
            while not self._closed:
                if not self._deadlines:
                    self._deadline_lock.wait()
                    continue
                deadline, _, running = self._deadlines[0]
                delay = deadline - time.monotonic()
                if delay > 0:
                    self._deadline_lock.wait(delay)
                    continue
                heapq.heappop(self._deadlines)
                with running.lock:
                    if running.abandoned:
                        continue  # finished in time
                    running.abandoned = True
                log.warning(
                    "a task of %r exceeded its timeout; its thread is abandoned and replaced",
                    running.task.first_stage(),
                )
                if not self._closed:
                    self._spawn()  # before reporting, so the pool is whole when seen
                task = running.task
                limit = task.timeout or 0.0
                running.future.set_result(
                    task.fail_all(
                        TimeoutError(
                            f"item exceeded the node's timeout of {limit:g} s "
                            "(thread abandoned; it may still be running)"
                        )
                    )
                )

    def _submit(self, task: Task) -> Future[TaskResult]:
        fut: Future[TaskResult] = Future()
        self._queue.put(_Running(task, fut))
        return fut

    def _close(self) -> None:
        from papy._errors import PoolError

        while True:  # fail what never started
            try:
                running = self._queue.get_nowait()
            except queue.Empty:
                break
            if running is not None and running.future.set_running_or_notify_cancel():
                running.future.set_exception(PoolError("pool closed before the task ran"))
        for _ in self._threads:
            self._queue.put(None)
        with self._deadline_lock:
            self._deadline_lock.notify_all()
        me = threading.current_thread()
        for t in self._threads:
            if t is not me:
                t.join(timeout=0.05)

    @property
    def alive_threads(self) -> int:
        """Count the threads still running (abandoned ones included)."""
        return sum(t.is_alive() for t in self._threads)

    def __getstate__(self) -> Any:
        raise TypeError("a ThreadPool cannot be pickled; make pools in the driver")
