"""The ``papy`` command: run a pipeline from a file, draw it, or run the demo.

Errors a user can cause (a missing file, no pipeline object, a bad option) are reported as
one line, never as a traceback. ``papy run`` exits with 1 when items failed (and says how
many), 2 for usage errors, 130 when interrupted.
"""

from __future__ import annotations

import json
import runpy
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import click

from papy._errors import PapyError
from papy._items import Failure
from papy._pipeline import Pipeline
from papy.pools._base import Pool

_RUN_EXAMPLES = """
\b
Examples:
  papy run examples/chain.py --input numbers.txt
  seq 100 | papy run examples/chain.py --input - --output out.jsonl
  papy run pipelines.py:wordcount --input-format jsonl --input docs.jsonl --workers 4
  papy run examples/chain.py --input numbers.txt --report run.html --journal run.db
"""

_GRAPH_EXAMPLES = """
\b
Examples:
  papy graph examples/join.py                   # Mermaid text on stdout
  papy graph examples/join.py --format dot
  papy graph examples/join.py --format svg -o graph.svg
"""


def load_pipeline(target: str) -> Pipeline:
    """Load ``FILE.py[:NAME]`` and return the Pipeline object it defines (default ``pipeline``).

    The file runs with ``__name__ == "__papy__"``, so its ``if __name__ == "__main__":``
    block does not run.
    """
    path_text, _, name = target.partition(":")
    name = name or "pipeline"
    path = Path(path_text)
    if not path.is_file():
        raise click.UsageError(f"file not found: {path_text}")
    sys.path.insert(0, str(path.resolve().parent))
    try:
        namespace = runpy.run_path(str(path), run_name="__papy__")
    except Exception as exc:
        raise click.ClickException(
            f"{path_text} raised {type(exc).__name__} while loading: {exc}"
        ) from exc
    obj = namespace.get(name)
    if obj is None:
        found = [k for k, v in namespace.items() if isinstance(v, Pipeline)]
        hint = f"; pipelines in it: {', '.join(found)}" if found else "; it defines none"
        raise click.UsageError(f"{path_text} has no object named {name!r}{hint}")
    if callable(obj) and not isinstance(obj, Pipeline):
        obj = obj()  # a factory function
    if not isinstance(obj, Pipeline):
        raise click.UsageError(f"{path_text}:{name} is a {type(obj).__name__}, not a Pipeline")
    return obj


def _read_items(stream: IO[str], fmt: str) -> Iterator[Any]:
    for number, line in enumerate(stream, 1):
        line = line.rstrip("\n")
        if fmt == "lines":
            yield line
        elif line.strip():
            try:
                yield json.loads(line)
            except json.JSONDecodeError as exc:
                raise click.ClickException(f"input line {number} is not JSON: {exc}") from None


def _cluster_options(func: Any) -> Any:
    """Add the options of ``papy run`` for a TLS Dask cluster and for SLURM/PBS jobs."""
    options = [
        click.option(
            "--tls-ca-file",
            default=None,
            metavar="PATH",
            help="CA certificate that signed the cluster's certificates (TLS).",
        ),
        click.option(
            "--tls-cert",
            default=None,
            metavar="PATH",
            help="This client's certificate (PEM) for a tls:// scheduler.",
        ),
        click.option(
            "--tls-key",
            default=None,
            metavar="PATH",
            help="The private key of --tls-cert (if not in the same file).",
        ),
        click.option(
            "--dask-config",
            default=None,
            metavar="PATH",
            help="A Dask YAML configuration file (e.g. distributed.comm.tls settings).",
        ),
        click.option(
            "--slurm",
            "queue_kind",
            flag_value="slurm",
            default=None,
            help="Start Dask workers as SLURM jobs (dask-jobqueue) for the remote nodes.",
        ),
        click.option(
            "--pbs", "queue_kind", flag_value="pbs", help="Same as --slurm, on PBS/Torque."
        ),
        click.option(
            "--jobs",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="Batch jobs to submit (--slurm/--pbs).",
        ),
        click.option(
            "--cores",
            type=click.IntRange(min=1),
            default=1,
            show_default=True,
            help="Cores per job: one single-threaded Dask worker each.",
        ),
        click.option("--memory", default="2GB", show_default=True, help="Memory per job."),
        click.option(
            "--walltime", default="01:00:00", show_default=True, help="Time limit per job."
        ),
        click.option("--partition", default=None, help="SLURM partition / PBS queue."),
        click.option("--account", default=None, help="Account (project) to charge the jobs to."),
        click.option(
            "--all-remote",
            is_flag=True,
            help="Run process nodes (and nodes without a pool) on the batch jobs too, not "
            "only the nodes whose pool is a DaskPool (a pipeline without any DaskPool "
            "sends its nodes without a pool of their own anyway).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _queue_pool(pipe: Pipeline, remote: dict[str, Any]) -> Pool:
    """Start a SLURM/PBS cluster for ``papy run --slurm/--pbs``; move remote nodes onto it.

    The nodes whose pool is a DaskPool go to the batch jobs (with their ``resources``,
    which every job then provides), and with ``--all-remote`` the process nodes and the
    nodes without a pool too. A pipeline without any DaskPool sends the nodes without a
    pool of their own, as ``--dask`` does. The returned pool owns the cluster: closing it
    cancels every job it submitted.
    """
    from papy.pools.dask import DaskPool, jobqueue_cluster
    from papy.pools.process import ProcessPool

    kind = remote["queue_kind"]
    all_remote = remote.get("all_remote", False)

    def moves(pool: Pool | None) -> bool:
        if isinstance(pool, DaskPool):
            return True
        return all_remote and (pool is None or isinstance(pool, ProcessPool))

    default_moves = moves(pipe.pool)
    nodes = [n for n in pipe.nodes if (moves(n.pool) if n.pool is not None else default_moves)]
    if not nodes and pipe.pool is None:
        # No DaskPool anywhere: like --dask, the nodes without a pool of their own go.
        default_moves = True
        nodes = [n for n in pipe.nodes if n.pool is None]
    if not nodes:
        raise click.UsageError(
            f"no node of the pipeline runs on a DaskPool or the default pool; add "
            f"--all-remote to run its process nodes on {kind.upper()} jobs"
        )
    resources: dict[str, float] = {}
    for n in nodes:
        for k, v in (getattr(n.pool, "resources", None) or {}).items():
            resources[k] = max(resources.get(k, 0), v)
    try:
        cluster = jobqueue_cluster(
            kind,
            cores=remote["cores"],
            memory=remote["memory"],
            walltime=remote["walltime"],
            partition=remote.get("partition"),
            account=remote.get("account"),
            resources=resources or None,
        )
    except PapyError as exc:
        raise click.ClickException(str(exc)) from None
    except Exception as exc:
        raise click.UsageError(f"--{kind}: {exc}") from None
    pool = DaskPool(cluster)
    pool.own_cluster = True
    cluster.scale(jobs=remote["jobs"])
    for n in nodes:
        own = getattr(n.pool, "resources", None)
        if n.pool is not None:
            n.pool = pool.with_resources(own) if own else pool
    if default_moves:
        pipe.pool = pool
    click.echo(
        f"{kind.upper()}: {remote['jobs']} job(s) of {remote['cores']} core(s), "
        f"{remote['memory']}, {remote['walltime']}; TLS with certificates of this run only; "
        "worker logs in papy-job-logs/",
        err=True,
    )
    return pool


def _dask_pool(address: str, remote: dict[str, Any]) -> Pool:
    """Return the DaskPool of ``papy run --dask ADDRESS`` with its TLS/config options."""
    from papy.pools.dask import DaskPool

    if remote.get("dask_config"):
        import dask.config
        import yaml

        path = Path(remote["dask_config"])
        if not path.is_file():
            raise click.UsageError(f"Dask configuration file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise click.UsageError(f"{path} is not valid YAML: {exc}") from None
        dask.config.update(dask.config.config, data, priority="new")
    security = None
    tls = [remote.get("tls_ca_file"), remote.get("tls_cert"), remote.get("tls_key")]
    if any(tls):
        from distributed import Security

        for option, value in zip(("--tls-ca-file", "--tls-cert", "--tls-key"), tls):
            if value and not Path(value).is_file():
                raise click.UsageError(f"{option}: file not found: {value}")
        if not (tls[0] and tls[1]):
            raise click.UsageError("TLS needs both --tls-ca-file and --tls-cert")
        security = Security(
            tls_ca_file=tls[0],
            tls_client_cert=tls[1],
            tls_client_key=tls[2],
            require_encryption=True,
        )
    return DaskPool(address, security=security)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="papy", prog_name="papy")
def main() -> None:
    """PaPy: parallel pipelines of Python functions, on threads, processes or a cluster."""


@main.command(epilog=_RUN_EXAMPLES)
@click.argument("target", metavar="FILE.py[:NAME]")
@click.option(
    "--input",
    "input_path",
    default="-",
    show_default=True,
    help="Input file, one item per line; '-' reads stdin.",
)
@click.option(
    "--input-format",
    type=click.Choice(["lines", "jsonl"]),
    default="lines",
    show_default=True,
    help="Items are text lines, or JSON values one per line.",
)
@click.option(
    "--output",
    "output_path",
    default="-",
    show_default=True,
    help="Where to write the sink's outputs as JSON lines; '-' is stdout.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Workers of the default process pool (default: one per core).",
)
@click.option(
    "--dask",
    "dask_address",
    default=None,
    metavar="ADDRESS",
    help="Run nodes without a pool of their own on this Dask scheduler.",
)
@click.option(
    "--report", "report_path", default=None, metavar="PATH", help="Write the HTML run report here."
)
@click.option(
    "--journal",
    "journal_path",
    default=None,
    metavar="PATH",
    help="SQLite journal: resume an interrupted run, skipping finished items.",
)
@click.option("--no-progress", is_flag=True, help="Do not show live progress.")
@_cluster_options
def run(
    target: str,
    input_path: str,
    input_format: str,
    output_path: str,
    workers: int | None,
    dask_address: str | None,
    report_path: str | None,
    journal_path: str | None,
    no_progress: bool,
    **remote: Any,
) -> None:
    """Run the pipeline defined in FILE.py (object NAME, default 'pipeline') over items."""
    pipe = load_pipeline(target)
    own_pool: Pool | None = None
    if dask_address and remote.get("queue_kind"):
        raise click.UsageError("--dask and --slurm/--pbs exclude each other")
    if not dask_address and any(remote.get(k) for k in ("tls_ca_file", "tls_cert", "tls_key")):
        raise click.UsageError(
            "--tls-ca-file/--tls-cert/--tls-key connect to a scheduler given with --dask"
        )
    if dask_address:
        own_pool = pipe.pool = _dask_pool(dask_address, remote)
    elif remote.get("queue_kind"):
        own_pool = _queue_pool(pipe, remote)
    elif workers is not None and pipe.pool is None:
        from papy.pools.process import ProcessPool

        own_pool = pipe.pool = ProcessPool(workers)
    if input_path != "-" and not Path(input_path).is_file():
        raise click.UsageError(f"input file not found: {input_path}")
    src = sys.stdin if input_path == "-" else open(input_path, encoding="utf-8")  # noqa: SIM115
    out = sys.stdout if output_path == "-" else open(output_path, "w", encoding="utf-8")  # noqa: SIM115
    failed = 0
    try:
        for value in pipe.map(
            _read_items(src, input_format),
            errors="yield",
            progress=False if no_progress else None,
            report=report_path,
            journal=journal_path,
        ):
            if isinstance(value, Failure):
                failed += 1
                click.echo(f"failed: {value.describe()}", err=True)
                continue
            out.write(json.dumps(value, default=str) + "\n")
    except PapyError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    finally:
        if src is not sys.stdin:
            src.close()
        if out is not sys.stdout:
            out.close()
        else:
            out.flush()
        if own_pool is not None:
            own_pool.close()
    if pipe.last_report is not None:
        click.echo(pipe.last_report.table(), err=True)
    if report_path:
        click.echo(f"report written to {report_path}", err=True)
    if failed:
        click.echo(f"{failed} item(s) failed", err=True)
        sys.exit(1)


@main.command(epilog=_GRAPH_EXAMPLES)
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
    help="Write here instead of stdout (required for svg and png).",
)
def graph(target: str, fmt: str, output_path: str | None) -> None:
    """Draw the pipeline defined in FILE.py as Mermaid, DOT, SVG or PNG."""
    pipe = load_pipeline(target)
    try:
        if fmt == "mermaid":
            text: str | None = pipe.to_mermaid()
        elif fmt == "dot":
            text = pipe.to_dot()
        else:
            text = None
            if output_path is None:
                raise click.UsageError(f"--format {fmt} writes a binary file: give -o PATH")
            pipe.draw(output_path, fmt)
    except PapyError as exc:
        raise click.ClickException(str(exc)) from None
    if text is not None:
        if output_path:
            Path(output_path).write_text(text)
        else:
            click.echo(text, nl=False)
    if output_path:
        click.echo(f"wrote {output_path}", err=True)


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
    from papy.demo import main as demo_main

    try:
        demo_main(limit=files, progress=False if no_progress else None, report=report_path)
    except PapyError as exc:
        raise click.ClickException(str(exc)) from None
