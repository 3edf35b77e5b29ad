"""Resume an interrupted run: a journal records finished items; a rerun skips them.

The first run stops after 30 items (as a crash would); the second finishes the rest
without recomputing the first 30, and ``map`` still yields every output in order.

    python examples/resume.py
"""

import os
import tempfile

from papy import Pipeline, ThreadPool

computed = []


def slow_square(x: int) -> int:
    computed.append(x)
    return x * x


pool = ThreadPool(4)
pipeline = Pipeline("resume", pool=pool)
pipeline.add(slow_square)

if __name__ == "__main__":
    journal = os.path.join(tempfile.mkdtemp(), "run.db")
    with pool:
        for i, _ in enumerate(pipeline.map(range(100), journal=journal)):
            if i == 29:
                break  # interrupted
        first = len(computed)
        outputs = list(pipeline.map(range(100), journal=journal))
    assert outputs == [x * x for x in range(100)]
    report = pipeline.last_report
    print(
        f"first run computed {first} items; the resumed run skipped {report.skipped} "
        f"and computed {len(computed) - first}"
    )
