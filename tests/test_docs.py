"""Every Python block of the README and the docs runs as is, and prints what it says.

A fenced ```python block is saved to a file and run with Python in a scratch directory
(holding copies of README.md and CHANGELOG.md, which the snippets read), as a reader who
copies it would. A block of ``>>>`` lines is a doctest: its output must match what Python
prints today. ``print(...)  # expected`` comments are checked against the block's output.
"""

from __future__ import annotations

import doctest
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "docs" / "tutorial.md", ROOT / "docs" / "notebooks.md"]

_FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
_EXPECT = re.compile(r"^\s*print\(.*\)\s+#\s*(?P<out>[\[\('\"{\d].*)$", re.MULTILINE)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """Return (line number, source) of each fenced Python block of a Markdown file."""
    text = path.read_text()
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in _FENCE.finditer(text)]


BLOCKS = [(path, line, src) for path in DOCS for line, src in python_blocks(path)]


def test_the_collector_finds_the_blocks():
    counts = {p.name: sum(1 for q, _, _ in BLOCKS if q == p) for p in DOCS}
    assert counts["README.md"] >= 3 and counts["tutorial.md"] >= 9 and counts["notebooks.md"]
    assert any(">>>" in src for _, _, src in BLOCKS)


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("path", "line", "src"),
    BLOCKS,
    ids=[f"{p.name}:{line}" for p, line, _ in BLOCKS],
)
def test_block_runs_as_is(path: Path, line: int, src: str, tmp_path: Path):
    if src.lstrip().startswith(">>>"):
        _run_doctest(path, line, src)
        return
    for name in ("README.md", "CHANGELOG.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    script = tmp_path / "snippet.py"
    script.write_text(src)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=240,
    )
    assert r.returncode == 0, f"{path.name}:{line} failed:\n{r.stderr[-3000:]}"
    for m in _EXPECT.finditer(src):
        expected = m.group("out").strip()
        assert expected in r.stdout, f"{path.name}:{line}: {expected!r} not in {r.stdout!r}"


def _run_doctest(path: Path, line: int, src: str) -> None:
    parser = doctest.DocTestParser()
    test = parser.get_doctest(src, {}, f"{path.name}:{line}", str(path), line)
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False
    )
    out: list[str] = []
    runner.run(test, out=out.append)
    assert runner.failures == 0, "".join(out)
    assert runner.tries >= 3


def test_resume_example_prints_what_its_docstring_says():
    path = ROOT / "examples" / "resume.py"
    doc = path.read_text().split('"""')[1]
    promised = doc.split("It prints::", 1)[1].strip().split("\n\n")[0].splitlines()
    promised = [x.strip() for x in promised]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 0, r.stderr
    printed = r.stdout.strip().splitlines()
    number = re.compile(r"\d+")
    assert [number.sub("N", x) for x in printed] == [number.sub("N", x) for x in promised]
    first = int(number.findall(printed[0])[1])
    assert 30 <= first <= 40  # as the docstring says
    skipped, computed, total = map(int, number.findall(printed[1]))
    assert skipped == first and computed == 100 - first and total == 100
