"""Large payloads travel as files: a path is a few bytes to send between processes.

Stage one makes a large array and writes it to the run directory; stage two, in another
pool, memory-maps it back. The run directory is removed when the run ends.

    python examples/files_between_nodes.py
"""

import numpy as np

from papy import Pipeline, ProcessPool, ThreadPool
from papy.io import dump_item, load_item


def simulate(seed: int):  # returns a path, not 8 MB of data
    rng = np.random.default_rng(seed)
    return dump_item(rng.standard_normal((1024, 1024)))


def summarize(path) -> dict:
    data = load_item(path, mmap=True)
    return {"mean": round(float(data.mean()), 4), "max": round(float(data.max()), 2)}


cpu, io = ProcessPool(2), ThreadPool(4)
pipeline = Pipeline("files")
made = pipeline.add(simulate, pool=cpu)
pipeline.add(summarize, after=made, pool=io)

if __name__ == "__main__":
    with cpu, io:
        for seed, stats in enumerate(pipeline.map(range(6))):
            print(seed, stats)
