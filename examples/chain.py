"""A chain of three functions over numbers: the smallest useful pipeline.

python examples/chain.py
seq 10 | papy run examples/chain.py --input -
"""

from papy import Pipeline


def parse(line: str) -> int:
    return int(line)


def square(x: int) -> int:
    return x * x


def describe(x: int) -> dict:
    return {"square": x, "even": x % 2 == 0}


pipeline = Pipeline("chain")
p = pipeline.add(parse)
s = pipeline.add(square, after=p)
pipeline.add(describe, after=s)

if __name__ == "__main__":
    for row in pipeline.map(["1", "2", "3", "4"]):
        print(row)
