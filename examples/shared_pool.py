"""One pool shared by several nodes: the scheduler balances them by where work waits.

Two stages of unequal cost share two worker processes; the slow stage gets the workers
it needs without any worker counts to tune (and here both are fused into one task).

    python examples/shared_pool.py
"""

import time

from papy import Pipeline, ProcessPool


def light(x: int) -> int:
    end = time.perf_counter() + 0.0005
    while time.perf_counter() < end:
        pass
    return x + 1


def heavy(x: int) -> int:
    end = time.perf_counter() + 0.002
    while time.perf_counter() < end:
        pass
    return x * 2


pool = ProcessPool(2)
pipeline = Pipeline("shared", pool=pool)
a = pipeline.add(light)
b = pipeline.add(heavy, after=a)
c = pipeline.add(light, after=a, name="light_branch")
pipeline.add(lambda x, y: x + y, after=[b, c], name="combine")

if __name__ == "__main__":
    with pool:
        report = pipeline.run(range(400), progress=False)
    print(report.table())
