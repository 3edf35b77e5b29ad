"""Compute resources that run a pipeline's tasks, all behind :class:`Pool`."""

from papy.pools._base import Pool, Task
from papy.pools.dask import DaskPool
from papy.pools.inline import InlinePool
from papy.pools.process import ProcessPool
from papy.pools.thread import ThreadPool

__all__ = ["DaskPool", "InlinePool", "Pool", "ProcessPool", "Task", "ThreadPool"]
