"""``papy graph``: draw a pipeline as Mermaid, DOT, SVG or PNG."""

from __future__ import annotations

from pathlib import Path

import click

from papy._draw import render_dot, to_dot
from papy._errors import PapyError
from papy.cli.exits import InputError
from papy.cli.loading import load_pipeline

_GRAPH_EXAMPLES = """
\b
Examples:
  papy graph examples/join.py                   # Mermaid text on stdout
  papy graph examples/join.py --format dot
  papy graph examples/join.py --format svg > graph.svg
  papy graph examples/join.py --format png -o graph.png
"""


@click.command(epilog=_GRAPH_EXAMPLES)
@click.argument("target", metavar="FILE.py[:NAME]")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["mermaid", "dot", "svg", "png"]),
    default="mermaid",
    show_default=True,
)
@click.option(
    "-o",
    "--output",
    "output_path",
    default=None,
    metavar="PATH",
    help="Write here instead of stdout (required for png).",
)
def graph(target: str, fmt: str, output_path: str | None) -> None:
    """Draw the pipeline defined in FILE.py as Mermaid, DOT, SVG (stdout) or PNG (-o)."""
    pipe = load_pipeline(target)
    try:
        if fmt == "mermaid":
            text: str | None = pipe.to_mermaid()
        elif fmt == "dot":
            text = pipe.to_dot()
        elif fmt == "svg" and output_path is None:
            text = render_dot(to_dot(pipe), "svg").decode()
        else:
            text = None
            if output_path is None:
                raise InputError(f"--format {fmt} writes a binary file: give -o PATH")
            pipe.draw(output_path, fmt)
    except PapyError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise InputError(f"cannot write -o {output_path}: {exc.strerror or exc}") from None
    if text is not None:
        if output_path:
            try:
                Path(output_path).write_text(text)
            except OSError as exc:
                raise InputError(f"cannot write -o {output_path}: {exc.strerror or exc}") from None
        else:
            click.echo(text, nl=False)
    if output_path:
        click.echo(f"wrote {output_path}", err=True)
