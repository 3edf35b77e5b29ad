"""Resume an interrupted run: a journal records finished items; a rerun skips them.

The first run is stopped after its first 30 outputs (as a crash would). Items already in
flight then (at most ``buffer=10`` more) finish and are journaled too, so it computed
between 30 and 40 items. The second run skips every item the first one finished,
computes only the others, and ``map`` still yields all 100 outputs in order. It prints::

    first run: stopped after 30 outputs, 37 items computed
    resumed run: the resumed run skipped 37 and computed 63 (100 in all, none twice)

(37: the batches the driver had started; always between 30 and 40).

    python examples/resume.py
"""

import os
import tempfile

from papy import InlinePool, Pipeline

computed = []


def slow_square(x: int) -> int:
    computed.append(x)
    return x * x


pool = InlinePool()  # runs in the driver: what was computed is exactly known
pipeline = Pipeline("resume", pool=pool, buffer=10)
pipeline.add(slow_square)

if __name__ == "__main__":
    journal = os.path.join(tempfile.mkdtemp(), "run.db")
    with pool:
        outputs = pipeline.map(range(100), journal=journal)
        for i, _ in enumerate(outputs):
            if i == 29:
                break
        outputs.close()  # interrupted: the run stops; what was in flight finishes
        first = len(computed)
        results = list(pipeline.map(range(100), journal=journal))
    assert results == [x * x for x in range(100)]
    report = pipeline.last_report
    rest = len(computed) - first
    assert report is not None and report.skipped == first and first + rest == 100
    print(f"first run: stopped after 30 outputs, {first} items computed")
    print(
        f"resumed run: the resumed run skipped {report.skipped} and computed {rest} "
        f"({first + rest} in all, none twice)"
    )
