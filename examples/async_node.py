"""An ``async def`` node: many waits overlap on one event loop, with a concurrency cap.

Stands in for HTTP or database calls: 200 "requests" of 50 ms on one thread.

    python examples/async_node.py
"""

import asyncio
import time

from papy import Pipeline, ThreadPool


async def fetch(i: int) -> dict:
    await asyncio.sleep(0.05)  # an HTTP request, a database query...
    return {"id": i, "status": 200}


pool = ThreadPool(1)
pipeline = Pipeline("async", pool=pool)
pipeline.add(fetch, concurrency=50)

if __name__ == "__main__":
    with pool:
        t0 = time.perf_counter()
        responses = list(pipeline.map(range(200)))
        elapsed = time.perf_counter() - t0
    print(f"{len(responses)} responses in {elapsed:.2f} s (one at a time: 10 s)")
