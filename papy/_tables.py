"""The tables that hold items between steps, keyed by item key.

- :class:`JoinTable`: a join's parents deliver in any order; it pairs their outputs by key;
- :class:`GatherTable`: a gather waits for every sub-item of a parent key (the count comes
  from the scatter, the sub-items from the step before the gather, in any order);
- :class:`TerminalTable`: a terminal below a scatter finishes an input position when every
  sub-item of it arrived;
- :class:`ReorderBuffer`: the output ``map`` yields, put back in input order.

A Failure travels like a value: a join or gather that meets one produces it (``dirty``
says a result may hold Failures, so clean batches skip a scan). Only the scheduler calls
these, from its own thread.
"""

from __future__ import annotations

import itertools
import operator
from collections import deque
from collections.abc import Sequence
from typing import Any

from papy._items import Failure, Key, parent_key


class JoinTable:
    """Pair the outputs of ``n_parents`` parents by item key."""

    def __init__(self, n_parents: int) -> None:
        self.n_parents = n_parents
        self._slots: dict[Key, list[Any]] = {}
        self._missing: dict[Key, int] = {}

    def __len__(self) -> int:
        return len(self._slots)

    def add(
        self, slot: int, keys: Sequence[Key], values: list[Any]
    ) -> tuple[list[Key], list[Any], bool]:
        """File parent ``slot``'s outputs; return the items now complete (keys, tuples, dirty).

        A complete item's value is the tuple of its parents' values in ``after=`` order,
        or the first Failure among them.
        """
        table, missing = self._slots, self._missing
        out_keys: list[Key] = []
        out_values: list[Any] = []
        dirty = False
        for key, value in zip(keys, values):
            slots = table.get(key)
            if slots is None:
                table[key] = slots = [None] * self.n_parents
                missing[key] = self.n_parents
            slots[slot] = value
            missing[key] -= 1
            if missing[key] == 0:
                del table[key], missing[key]
                out_keys.append(key)
                bad = next((v for v in slots if type(v) is Failure), None)
                out_values.append(bad or tuple(slots))
                dirty = dirty or bad is not None
        return out_keys, out_values, dirty


class GatherTable:
    """Regroup the sub-items of each parent key, in sub-item order."""

    def __init__(self) -> None:
        #: parent key -> [expected count or -1 while unknown, received, values by index]
        self._groups: dict[Key, list[Any]] = {}

    def __len__(self) -> int:
        return len(self._groups)

    def expect(self, key: Key, n: int) -> tuple[Key, Any, bool] | None:
        """Learn that ``key`` scattered into ``n`` sub-items; return the group if complete."""
        group = self._groups.get(key)
        if group is None:
            self._groups[key] = group = [n, 0, [None] * n]
        else:
            group[0] = n
            group[2].extend([None] * (n - len(group[2])))
        return self._close(key, group) if group[1] == n else None

    def add(self, keys: Sequence[Key], values: list[Any]) -> list[tuple[Key, Any, bool]]:
        """File sub-items; return the groups now complete as (parent key, value, dirty)."""
        groups = self._groups
        done = []
        for key, value in zip(keys, values):
            pk = parent_key(key)  # type: ignore[arg-type]
            idx = key[-1]  # type: ignore[index]
            group = groups.get(pk)
            if group is None:  # the count is not known yet
                groups[pk] = group = [-1, 0, []]
            subs = group[2]
            if idx >= len(subs):
                subs.extend([None] * (idx + 1 - len(subs)))
            subs[idx] = value
            group[1] += 1
            if group[1] == group[0]:
                done.append(self._close(pk, group))
        return done

    def _close(self, key: Key, group: list[Any]) -> tuple[Key, Any, bool]:
        del self._groups[key]
        subs = group[2]
        value = next((v for v in subs if type(v) is Failure), subs)
        return key, value, value is not subs


class TerminalTable:
    """Count, per input position, the sub-items a terminal below a scatter still expects."""

    def __init__(self, keep_values: bool) -> None:
        self._keep = keep_values  # the output node keeps values to yield them in order
        self._need: dict[int, int] = {}
        self._groups: dict[int, list[tuple[Key, Any]]] = {}

    def expect(self, p: int, n: int) -> bool:
        """Learn that one pending item of position ``p`` became ``n``; tell if ``p`` is done."""
        need = self._need.get(p, 1) + n - 1
        self._need[p] = need
        return need == 0

    def arrive(self, keys: Sequence[Key], values: list[Any]) -> list[int]:
        """Count arrived sub-items; return the positions now finished."""
        done = []
        need_of = self._need
        for key, value in zip(keys, values):
            p = key if isinstance(key, int) else key[0]
            if self._keep:
                self._groups.setdefault(p, []).append((key, value))
            need = need_of.get(p, 1) - 1
            need_of[p] = need
            if need == 0:
                done.append(p)
        return done

    def finish(self, p: int) -> tuple[list[Key], list[Any]]:
        """Forget position ``p``; return its outputs (keys, values) in key order."""
        del self._need[p]
        group = sorted(self._groups.pop(p, []), key=lambda kv: kv[0])
        return [k for k, _ in group], [v for _, v in group]


class ReorderBuffer:
    """Put the output node's results back in input order (or not, for ``ordered=False``).

    Results are filed by runs of positions; :meth:`pop` gives the next run whose turn came
    as (keys, values, positions).
    """

    def __init__(self, ordered: bool) -> None:
        self.ordered = ordered
        self._ready: deque[tuple[Sequence[Key], list[Any], Sequence[int]]] = deque()
        self._pending: dict[int, tuple[Sequence[Key], list[Any], Sequence[int]]] = {}
        self._next = 0

    def __bool__(self) -> bool:
        return bool(self._ready)

    def pop(self) -> tuple[Sequence[Key], list[Any], Sequence[int]]:
        return self._ready.popleft()

    def put(self, keys: Sequence[Key], values: list[Any], positions: Sequence[int]) -> None:
        """File the outputs of ``positions`` (keys and values in key order)."""
        if not self.ordered:
            self._ready.append((keys, values, positions))
            return
        pending = self._pending
        if isinstance(positions, range) or len(positions) == 1:
            # A contiguous run (straight from the source) or one position's group.
            pending[positions[0]] = (keys, values, positions)
        elif positions[-1] - positions[0] == len(positions) - 1 and all(
            map(operator.lt, positions, itertools.islice(positions, 1, None))
        ):
            # Ascending and contiguous (the usual case): file it as one run.
            pending[positions[0]] = (keys, values, range(positions[0], positions[-1] + 1))
        else:
            # Keys after a join or a gather come in any order: file each position alone.
            for k, v in zip(keys, values):
                pending[k] = ([k], [v], [k])  # type: ignore[index,list-item]
        while self._next in pending:
            run = pending.pop(self._next)
            self._ready.append(run)
            self._next = run[2][-1] + 1
