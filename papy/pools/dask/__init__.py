"""Run a pipeline's tasks on a Dask distributed cluster, beside local pools.

- :mod:`papy.pools.dask.pool`: :class:`DaskPool`, the pool itself (submitting, timeouts,
  crashed workers, cancelling).
- :mod:`papy.pools.dask.inflight`: the driver's record of tasks in flight, and which of
  them :meth:`DaskPool.cancel` may withdraw.
- :mod:`papy.pools.dask.worker`: what runs inside the Dask workers (each pool's cache of
  steps there).
- :mod:`papy.pools.dask.shipping`: sending the user's own modules to the workers by value.
- :mod:`papy.pools.dask.cluster`: cluster objects: dask-jobqueue SLURM/PBS clusters
  (:func:`jobqueue_cluster`), their queue, and sizing their jobs.

Install with ``pip install "papy[dask]"``; the rest of PaPy works without Dask, which is
imported only when a DaskPool starts.
"""

from papy.pools.dask.cluster import jobqueue_cluster
from papy.pools.dask.pool import DaskPool

__all__ = ["DaskPool", "jobqueue_cluster"]
