"""A journaled run's view of its input: identities, items to skip, outputs to replay.

Each input item gets a journal identity (a digest of its value, or ``key(item)``). Items an
earlier run finished at every terminal are not run again: :meth:`Resume.split` takes them
out of the chunk and returns their recorded outputs for the caller to replay. Terminals
report finished positions here so the journal can mark them complete.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from papy._errors import JournalError
from papy._items import Failure, Key, at_position, parent_key, position, qualified_type
from papy._journal.journal import Journal
from papy._plan import Plan

log = logging.getLogger("papy")

#: a skipped item: (position, output keys, output values, other terminals' Failures)
Replay = tuple[int, list[Key], list[Any], list[Failure]]


class Resume:
    """Keep the journal identity of every position in flight (see the module docstring)."""

    def __init__(self, journal: Journal, plan: Plan, key: Callable[[Any], Any] | None) -> None:
        self.journal = journal
        self._key = key
        self._plan = plan
        self._jkey_of: dict[int, str] = {}
        # A terminal's records settle an item only if it is top-level and not a scatter.
        self._terms = {t.node.name: not t.stack and not t.node.scatter for t in plan.terminals}
        self._scatters = {t.node.name for t in plan.terminals if t.node.scatter}
        #: items an earlier run finished, skipped in this one
        self.skipped = 0

    def split(
        self, keys: Sequence[int], chunk: list[Any]
    ) -> tuple[Sequence[int], list[Any], list[Replay]]:
        """Return the items to run (keys, values) and the replays.

        A replay ``(position, keys, values, failures)`` holds the output node's recorded
        outputs of a skipped item (none when the run has no output node, as in
        ``Pipeline.run``) and, if it failed somewhere, the Failures the other terminals
        recorded for it (so the run's report counts them). Raises JournalError when
        ``key`` gives two items one identity.
        """
        jkeys = self.journal.identify(chunk, self._key)
        done = self.journal.finished(jkeys, self._terms)
        if not done:  # nothing to skip: keep the chunk as it is (a range stays a range)
            self._jkey_of.update(zip(keys, jkeys))
            return keys, chunk, []
        run_keys: list[int] = []
        run_values: list[Any] = []
        replays: list[Replay] = []
        out = self._plan.output
        others = [t for t in self._terms if out is None or t != out.name]
        for p, jk, value in zip(keys, jkeys, chunk):
            if jk not in done:
                self._jkey_of[p] = jk
                run_keys.append(p)
                run_values.append(value)
                continue
            try:
                failures = self.journal.failures(jk, others) if done[jk] else []
                values = self.journal.outputs(out.name, jk) if out is not None else []
            except JournalError:
                raise  # not authentic: never unpickled
            except Exception as exc:  # a record's class changed or moved since: run it again
                log.warning(
                    "journal: a record of item %r cannot be loaded (%s: %s); running it again",
                    jk,
                    qualified_type(exc),
                    exc,
                )
                self._jkey_of[p] = jk
                run_keys.append(p)
                run_values.append(value)
                continue
            self.skipped += 1
            failures = [at_position(f, p) for f in failures]  # recorded at another position?
            if out is None:
                replays.append((p, [], [], failures))
                continue
            if out.scatter:
                values = [x for v in values for x in ([v] if type(v) is Failure else v)]
            values = [at_position(v, p) for v in values]
            if self._plan.stacks[out.name]:
                replays.append((p, [(p, i) for i in range(len(values))], values, failures))
            else:
                replays.append((p, [p], values, failures))
        return run_keys, run_values, replays

    def jkeys(self, keys: Sequence[Key]) -> list[tuple[str, str]]:
        """Return the journal keys (item identity, sub-item path) of a task's items.

        Raises JournalError when the journal file was removed or replaced during the run.
        """
        self.journal.check()
        return self._jkeys(keys)

    def _jkeys(self, keys: Sequence[Key]) -> list[tuple[str, str]]:
        jkey_of = self._jkey_of
        return [
            (jkey_of[k], "") if isinstance(k, int) else (jkey_of[k[0]], ".".join(map(str, k[1:])))
            for k in keys
        ]

    def failed(self, terminal: str, keys: Sequence[Key], values: list[Any]) -> None:
        """Record the Failures among ``values`` that reached ``terminal`` at ``keys`` (its
        keys for the items, which for a Failure from above a scatter is not the Failure's
        own ``item``); see :meth:`Journal.record_failures`."""
        scatter = terminal in self._scatters  # recorded per input item: a list, or a Failure
        keep = [
            (parent_key(k) if scatter else k, v)
            for k, v in zip(keys, values)
            if type(v) is Failure and position(k) in self._jkey_of
        ]
        if keep:
            jkeys = self._jkeys([k for k, _ in keep])
            self.journal.record_failures(terminal, jkeys, [f for _, f in keep])

    def finished(self, terminal: str, p: int) -> None:
        """Mark position ``p`` complete at ``terminal`` in the journal."""
        jk = self._jkey_of.get(p)
        if jk is not None:
            self.journal.mark_complete(terminal, jk)

    def retired(self, p: int) -> None:
        """Forget position ``p``: it left the run."""
        self._jkey_of.pop(p, None)
