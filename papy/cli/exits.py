"""Exit codes of ``papy`` and the error that stands for "your input is wrong" (exit 2).

The codes follow the shell's conventions: 128 + the signal's number after a signal.
"""

from __future__ import annotations

import click

#: exit codes (the shell conventions): 128 + signal number after a signal
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 2, 130, 143


class InputError(click.ClickException):
    """A usage or input error: one line on stderr, exit code 2, no traceback."""

    exit_code = EXIT_USAGE
