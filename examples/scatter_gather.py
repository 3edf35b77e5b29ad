"""Scatter one item into many sub-items, process them in parallel, gather them back.

Finds the divisors of each number: every candidate divisor is its own sub-item.

    python examples/scatter_gather.py
"""

from papy import Pipeline, ProcessPool


def candidates(n: int) -> list[tuple[int, int]]:
    return [(n, d) for d in range(1, n + 1)]  # one sub-item per candidate


def check(pair: tuple[int, int]) -> int | None:
    n, d = pair
    return d if n % d == 0 else None


def collect(found: list[int | None]) -> list[int]:
    return [d for d in found if d is not None]  # in scatter order


pipeline = Pipeline("divisors")
pairs = pipeline.add(candidates, scatter=True)
checked = pipeline.add(check, after=pairs)
pipeline.add(collect, after=checked, gather=True)

if __name__ == "__main__":
    with ProcessPool(2) as pool:
        pipeline.pool = pool
        numbers = [12, 7, 30]
        for n, divisors in zip(numbers, pipeline.map(numbers)):
            print(n, divisors)
