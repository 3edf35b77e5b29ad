"""PaPy: parallel pipelines in Python.

Write plain functions, connect them into a graph with :class:`Pipeline`, and evaluate it as
lazy, parallel, nested maps on threads, processes or a Dask cluster::

    from papy import Pipeline

    pipe = Pipeline("demo")
    double = pipe.add(lambda x: 2 * x)
    pipe.add(str, after=double)
    print(list(pipe.map(range(5))))   # ['0', '2', '4', '6', '8']
"""

import logging

from papy._errors import (
    CycleError,
    GraphError,
    ItemFailed,
    JournalError,
    PapyError,
    PoolError,
    RunAborted,
    ShellError,
    WorkerCrashed,
)
from papy._imap import imap
from papy._items import Failure
from papy._node import Node
from papy._pipeline import Pipeline
from papy._report import NodeReport, Report
from papy._shell import shell
from papy.io import dump_item, load_item
from papy.pools import DaskPool, InlinePool, Pool, ProcessPool, ThreadPool

__version__ = "2.0.0a1"

# A library logs, the application decides what is shown: without this, Python's
# last-resort handler would print PaPy's warnings to stderr.
logging.getLogger("papy").addHandler(logging.NullHandler())

__all__ = [
    "CycleError",
    "DaskPool",
    "Failure",
    "GraphError",
    "InlinePool",
    "ItemFailed",
    "JournalError",
    "Node",
    "NodeReport",
    "PapyError",
    "Pipeline",
    "Pool",
    "PoolError",
    "ProcessPool",
    "Report",
    "RunAborted",
    "ShellError",
    "ThreadPool",
    "WorkerCrashed",
    "__version__",
    "dump_item",
    "imap",
    "load_item",
    "shell",
]
