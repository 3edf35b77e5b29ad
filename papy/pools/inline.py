"""InlinePool: run each task right away in the calling thread.

For debugging (a breakpoint in a node just works) and for functions so cheap that shipping
them anywhere costs more than running them. A node with ``timeout=`` is refused here
(``GraphError`` before any work): nothing can interrupt the caller's own thread.
"""

from __future__ import annotations

from concurrent.futures import Future

from papy._task import TaskResult, run_task
from papy.pools._base import Pool, Task


class InlinePool(Pool):
    """Run tasks synchronously in the scheduler's own thread."""

    kind = "inline"
    enforces_timeout = False  # the caller's thread cannot be interrupted

    def __init__(self) -> None:
        super().__init__()
        self.workers = 1

    def _start(self) -> None:
        pass

    def _submit(self, task: Task) -> Future[TaskResult]:
        fut: Future[TaskResult] = Future()
        fut.set_running_or_notify_cancel()
        try:
            fut.set_result(run_task(task.spec, task.keys, task.values, task.jkeys, task.dirty))
        except Exception as exc:  # a bug in the engine, not in a node: fail the task
            fut.set_exception(exc)
        return fut

    def _close(self) -> None:
        pass
