"""Every example in examples/ runs, as a user would run it, and prints what it promises."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))

EXPECT = {
    "chain.py": "{'square': 16, 'even': True}",
    "join.py": "2 words, longest 'jumps'",
    "scatter_gather.py": "30 [1, 2, 3, 5, 6, 10, 15, 30]",
    "shared_pool.py": "limits throughput",
    "shell_node.py": "{'words': 8, 'gzip_bytes'",
    "files_between_nodes.py": "5 {'mean':",
    "async_node.py": "200 responses in",
    "dask_pool.py": "score 332833500",
    "resume.py": "the resumed run skipped",
}


def test_every_example_is_checked():
    assert {p.name for p in EXAMPLES} == set(EXPECT)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(path: Path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, env=env, timeout=180, cwd=ROOT
    )
    assert r.returncode == 0, r.stderr
    assert EXPECT[path.name] in r.stdout, r.stdout
