"""Shared fixtures: one pool of each kind, closed after the test."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from papy import InlinePool, Pool, ProcessPool, ThreadPool

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def make_pool(kind: str) -> Pool:
    if kind == "inline":
        return InlinePool()
    if kind == "thread":
        return ThreadPool(4)
    if kind == "process":
        return ProcessPool(2)
    raise ValueError(kind)


@pytest.fixture(params=["inline", "thread", "process"])
def pool(request: pytest.FixtureRequest) -> Iterator[Pool]:
    p = make_pool(request.param)
    with p:
        yield p


@pytest.fixture
def process_pool() -> Iterator[ProcessPool]:
    with ProcessPool(2) as p:
        yield p


@pytest.fixture(autouse=True)
def _no_leaked_children() -> Iterator[None]:
    """Fail a test that leaves worker processes of its own pools running."""
    yield
    if os.environ.get("PAPY_SKIP_LEAK_CHECK"):
        return
    import multiprocessing

    import psutil

    deadline_children = [c for c in multiprocessing.active_children() if c.name == "papy-worker"]
    if deadline_children:
        for c in deadline_children:
            c.join(timeout=3)
    alive = [c for c in multiprocessing.active_children() if c.name == "papy-worker"]
    assert not alive, f"worker processes left running: {alive}"
    me = psutil.Process()
    zombies = [c for c in me.children() if c.status() == psutil.STATUS_ZOMBIE]
    assert not zombies, f"zombie children: {zombies}"
