"""The ``papy`` command group: ``run``, ``graph``, ``journal`` and ``demo``."""

from __future__ import annotations

import click

from papy._errors import PapyError
from papy.cli.graph import graph
from papy.cli.journal import journal
from papy.cli.run import run
from papy.demo import main as demo_main


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="papy", prog_name="papy")
def main() -> None:
    """PaPy: parallel pipelines of Python functions, on threads, processes or a cluster."""


@main.command()
@click.option(
    "--files",
    default=None,
    type=click.IntRange(min=1),
    help="Index at most this many source files (default: all but tests).",
)
@click.option(
    "--report", "report_path", default=None, metavar="PATH", help="Write the HTML run report here."
)
@click.option("--no-progress", is_flag=True, help="Do not show live progress.")
def demo(files: int | None, report_path: str | None, no_progress: bool) -> None:
    """Index the Python standard library's sources: the flagship example.

    Reads every module (threads), parses it (processes), scatters it into its functions,
    scores each one, gathers the scores, joins them with line counts and gzip sizes (an
    external program), and prints a summary and the run report.
    """
    try:
        demo_main(limit=files, progress=False if no_progress else None, report=report_path)
    except PapyError as exc:
        raise click.ClickException(str(exc)) from None


main.add_command(run)
main.add_command(graph)
main.add_command(journal)
