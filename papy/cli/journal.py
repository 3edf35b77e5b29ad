"""``papy journal``: look into a run's journal, or make it forget a node."""

from __future__ import annotations

import json

import click

from papy._errors import PapyError
from papy._journal.admin import describe, failures, forget

_JOURNAL_EXAMPLES = """
\b
Examples:
  papy journal show run.db
  papy journal failures run.db
  papy journal forget run.db --node score
"""


@click.group(epilog=_JOURNAL_EXAMPLES)
def journal() -> None:
    """Look into a run's journal, or make it forget a node (reads metadata only)."""


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"  # pragma: no cover


@journal.command("show", epilog=_JOURNAL_EXAMPLES)
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the metadata as JSON.")
def journal_show(path: str, as_json: bool) -> None:
    """Show the pipeline, each node's fingerprint and records, the size and the last run.

    Never loads a recorded value, so it is safe on a journal from anyone.
    """
    try:
        info = describe(path)
    except PapyError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"journal   {info['path']} ({_size(info['size'])})")
    click.echo(f"pipeline  {info['pipeline']}")
    click.echo(f"last run  {info['last_run']} on {info['last_host']}")
    rows = [("node", "fingerprint", "role", "done", "failed", "stored")]
    for n in info["nodes"]:
        role = "terminal" if n["terminal"] else ("cached" if n["cached"] else "-")
        done = n["done"] if not n["complete"] else f"{n['done']} ({n['complete']} items)"
        rows.append(
            (n["name"], n["fingerprint"][:12], role, str(done), str(n["failed"]), _size(n["bytes"]))
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


@journal.command("failures", epilog=_JOURNAL_EXAMPLES)
@click.argument("path", type=click.Path(dir_okay=False))
def journal_failures(path: str) -> None:
    """List the failed items: node, item identity and message (never loads a value)."""
    try:
        rows = failures(path)
    except PapyError as exc:
        raise click.ClickException(str(exc)) from None
    for r in rows:
        sub = f" sub-item {r['sub']}" if r["sub"] else ""
        click.echo(f"{r['node']}\t{r['item']}{sub}\t{r['message']}")
    click.echo(f"{len(rows)} failed", err=True)


@journal.command("forget", epilog=_JOURNAL_EXAMPLES)
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--node", "node", required=True, metavar="NAME", help="The node to invalidate.")
def journal_forget(path: str, node: str) -> None:
    """Drop the records of node NAME and of every node downstream of it.

    The next run with this journal recomputes them (and reuses the rest).
    """
    try:
        dropped = forget(path, node)
    except PapyError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"forgot {', '.join(repr(n) for n in dropped)}")
