"""Fork and join: two branches computed in parallel are paired again by item.

python examples/join.py
"""

from papy import Pipeline, ThreadPool

pool = ThreadPool(4)
pipeline = Pipeline("join", pool=pool)
words = pipeline.add(str.split, name="words")
count = pipeline.add(len, after=words, name="count")
longest = pipeline.add(lambda ws: max(ws, key=len, default=""), after=words, name="longest")
pipeline.add(lambda n, w: f"{n} words, longest {w!r}", after=[count, longest], name="summary")

if __name__ == "__main__":
    with pool:
        for line in pipeline.map(["the quick brown fox", "jumps over", "the lazy dog"]):
            print(line)
