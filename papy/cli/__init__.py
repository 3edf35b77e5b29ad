"""The ``papy`` command line: ``papy run``, ``papy graph``, ``papy journal``, ``papy demo``.

- :mod:`papy.cli.app`: the command group :func:`main` (the console entry point) and ``demo``.
- :mod:`papy.cli.run`: ``papy run`` and its options; :mod:`papy.cli.cluster`: its options
  for a Dask cluster and SLURM/PBS jobs.
- :mod:`papy.cli.graph`: ``papy graph``; :mod:`papy.cli.journal`: ``papy journal``.
- :mod:`papy.cli.loading`: loading ``FILE.py[:NAME]``; :mod:`papy.cli.exits`: exit codes.
"""

from papy.cli.app import main

__all__ = ["main"]
