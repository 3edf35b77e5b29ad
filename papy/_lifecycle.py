"""A run's lifecycle: what it acquires before the first item and releases after the last.

:class:`RunScope` opens, in order: the pools (a ProcessPool made for the run when a node
has none, owned and closed by the run; the user's pools are only started), the run
directory (a private temporary one, removed at the end, or the user's ``workdir``), the
journal, and compiles the :class:`~papy._plan.Plan`. Everything acquired is registered on
one :class:`contextlib.ExitStack`, so :meth:`RunScope.close` releases it in reverse order
and every release runs even when another one fails (a pool that cannot be closed does not
leave the journal unflushed or the run directory behind).
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any

from papy._errors import PoolError
from papy._interrupt import deferred
from papy._journal.journal import Journal
from papy._plan import Graph, Plan, compile_plan
from papy._rundir import check_workdir, make_run_dir
from papy.pools.process import ProcessPool

if TYPE_CHECKING:
    from papy._node import Node
    from papy._task import TaskResult
    from papy.pools._base import Pool

log = logging.getLogger("papy")


class RunScope:
    """Set up and tear down the resources of one run (see the module docstring).

    ``journal`` is the journal file's path or None; ``force`` and ``retry_failed`` are
    :meth:`papy.Pipeline.run`'s options. After :meth:`open`, ``plan``, ``journal`` (or
    None) and ``run_dir`` are set.
    """

    def __init__(
        self,
        graph: Graph,
        output: Node | None,
        *,
        workdir: str | Path | None,
        journal: str | Path | None,
        force: bool,
        retry_failed: bool = False,
    ) -> None:
        self.graph = graph
        self.output = output
        self._workdir = workdir
        self._journal_path = journal
        self._force = force
        self._retry_failed = retry_failed
        self._stack = contextlib.ExitStack()
        self.journal: Journal | None = None
        self.run_dir: str | None = None
        self.plan: Plan | None = None
        self._own_pools: list[Pool] = []

    def open(self) -> Plan:
        """Acquire everything and compile the plan; raises PoolError, JournalError, GraphError.

        What was acquired before a failure is still released by :meth:`close`.
        """
        stack = self._stack
        private = True
        if self._workdir is not None:
            self.run_dir, private = check_workdir(self._workdir)
        else:
            self.run_dir = make_run_dir()  # mode 0700, not redirectable by a planted link
            stack.callback(shutil.rmtree, self.run_dir, ignore_errors=True)
        spec_for = None
        if self._journal_path is not None:
            self.journal = Journal(
                self._journal_path,
                self.graph.nodes,
                self.graph.name,
                force=self._force,
                retry_failed=self._retry_failed,
            )
            stack.callback(_closing(self.journal))
            spec_for = self.journal.spec_for
        pools = self._pools()  # closed before the journal and the run directory go
        self.plan = compile_plan(
            self.graph,
            pools,
            output=self.output,
            run_dir=self.run_dir,
            private=private,
            journal=spec_for,
        )
        for p in self.plan.pools:
            if p.closed:
                raise PoolError(f"{p!r} is closed; make a new pool for this run")
            p.start()
        return self.plan

    def _pools(self) -> dict[str, Pool]:
        """Return each node's pool; make (and own) a ProcessPool for nodes that have none."""
        default = self.graph.pool
        pools: dict[str, Pool] = {}
        for n in self.graph.nodes:
            pool = n.pool or default
            if pool is None:
                default = pool = ProcessPool()
                self._own_pools.append(pool)
                self._stack.callback(pool.close)
            pools[n.name] = pool
        return pools

    def withdraw(self, futures: Iterable[tuple[Pool, Future[TaskResult]]]) -> int:
        """Cancel the run's tasks that have not started (``Pool.cancel``); return how many."""
        by_pool: dict[int, tuple[Pool, list[Future[TaskResult]]]] = {}
        for pool, fut in futures:
            by_pool.setdefault(id(pool), (pool, []))[1].append(fut)
        withdrawn = 0
        for pool, futs in by_pool.values():
            try:
                withdrawn += pool.cancel(futs)
            except Exception as exc:  # a pool that cannot cancel still gets released
                log.error("cancelling the queued tasks of %r failed: %r", pool, exc)
        return withdrawn

    def close(self, before: Sequence[Callable[[], Any]] = ()) -> None:
        """Release everything (calls in ``before`` first); raise the first failure at the end.

        Pools the user owns are told to forget this run's steps (``Pool.release``); pools
        the run made are closed; the journal is closed; the private run directory removed.
        """
        with self._stack as stack:
            if self.plan is not None:
                spec_ids = self.plan.spec_ids
                for p in self.plan.pools:
                    if not any(p is own for own in self._own_pools):
                        stack.callback(p.release, spec_ids)
            for fn in reversed(before):  # the stack runs callbacks last-in first-out
                stack.callback(fn)


def _closing(journal: Journal) -> Callable[[], None]:
    """Return what closes ``journal`` whole: a Ctrl-C (or SIGTERM) that arrives meanwhile
    acts once it is closed. Cut short, the close kept the run's lock, and every later run
    in the process on that journal failed: "in use by another run" (its own pid)."""

    def close() -> None:
        with deferred():
            journal.close()

    return close
