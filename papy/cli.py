"""The ``papy`` command: run a pipeline from a file, draw it, or run the demo.

Errors a user can cause (a missing file, no pipeline object, a bad option, a bad input
line, an unwritable output) are reported as one line, never as a traceback.

Exit codes of ``papy run``: 0 every item succeeded; 1 some items failed (the first ten are
shown, then a count per node and exception type); 2 usage or input error; 130 interrupted
(SIGINT, Ctrl-C); 143 terminated (SIGTERM).
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import IO, Any

import click

from papy._errors import GraphError, JournalError, PapyError, _last_frame
from papy._items import Failure
from papy._pipeline import Pipeline
from papy._progress import progress_wanted
from papy.pools._base import Pool

#: exit codes (the shell conventions): 128 + signal number after a signal
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 2, 130, 143

#: how many failed items ``papy run`` prints one by one before it only counts them
SHOWN_FAILURES = 10

_RUN_EXAMPLES = """
\b
Examples:
  papy run examples/chain.py --input numbers.txt
  seq 100 | papy run examples/chain.py --input - --output out.jsonl
  papy run pipelines.py:wordcount --input-format jsonl --input docs.jsonl --workers 4
  papy run examples/chain.py --input numbers.txt --report run.html --journal run.db

\b
Exit codes: 0 all items ok, 1 some items failed, 2 usage or input error,
130 interrupted (SIGINT), 143 terminated (SIGTERM).
"""

_GRAPH_EXAMPLES = """
\b
Examples:
  papy graph examples/join.py                   # Mermaid text on stdout
  papy graph examples/join.py --format dot
  papy graph examples/join.py --format svg > graph.svg
  papy graph examples/join.py --format png -o graph.png
"""


class InputError(click.ClickException):
    """A usage or input error: one line on stderr, exit code 2, no traceback."""

    exit_code = EXIT_USAGE


def load_pipeline(target: str) -> Pipeline:
    """Load ``FILE.py[:NAME]`` and return the Pipeline object it defines.

    Without ``:NAME``: the file's only Pipeline object, whatever its variable is called;
    with several, the one called ``pipeline`` (an object or a factory function). The file
    runs with ``__name__ == "__papy__"``, so its ``if __name__ == "__main__":`` block does
    not run. Raise :class:`InputError` (exit 2) for a missing file or no such pipeline.
    """
    path_text, _, name = target.partition(":")
    path = Path(path_text)
    if not path.is_file():
        raise InputError(f"file not found: {path_text}")
    sys.path.insert(0, str(path.resolve().parent))
    try:
        namespace = runpy.run_path(str(path), run_name="__papy__")
    except Exception as exc:
        where = _last_frame("".join(_format_tb(exc)))
        raise click.ClickException(
            f"{path_text} raised {type(exc).__name__} while loading: {exc}"
            + (f" (at {where})" if where else "")
        ) from exc
    found: dict[int, str] = {}
    for key, value in namespace.items():
        if isinstance(value, Pipeline) and not key.startswith("__"):
            found.setdefault(id(value), key)
    if not name:
        if len(found) == 1 and not callable(namespace.get("pipeline")):
            name = next(iter(found.values()))
        else:
            name = "pipeline"
    obj = namespace.get(name)
    if obj is None:
        names = list(found.values())
        if len(names) > 1:
            hint = f"; it defines several ({', '.join(names)}): pick one with {path_text}:NAME"
        elif names:
            hint = f"; pipelines in it: {', '.join(names)}"
        else:
            hint = "; it defines none"
        raise InputError(f"{path_text} has no object named {name!r}{hint}")
    if callable(obj) and not isinstance(obj, Pipeline):
        obj = obj()  # a factory function
    if not isinstance(obj, Pipeline):
        raise InputError(f"{path_text}:{name} is a {type(obj).__name__}, not a Pipeline")
    return obj


def _format_tb(exc: BaseException) -> list[str]:
    import traceback

    return traceback.format_exception(type(exc), exc, exc.__traceback__)


class _InputReader:
    """Yield items from a text stream; stop at the first bad line and remember it.

    Stopping (rather than raising inside the run) lets the items before the bad line
    finish and be written; ``papy run`` then exits 2 naming the line.
    """

    def __init__(self, stream: IO[bytes], fmt: str) -> None:
        self.stream = stream
        self.fmt = fmt
        self.error: str | None = None

    def __iter__(self) -> Iterator[Any]:
        for number, raw in enumerate(self.stream, 1):
            try:
                line = raw.decode("utf-8").rstrip("\n")
            except UnicodeDecodeError as exc:
                self.error = f"input line {number} is not UTF-8 text: {exc.reason}"
                return
            if self.fmt == "lines":
                yield line
            elif line.strip():
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as exc:
                    self.error = f"input line {number} is not JSON: {exc}"
                    return
                yield value


class _Signals:
    """Turn the first SIGINT/SIGTERM into KeyboardInterrupt and remember which it was.

    A second signal while the run shuts down (closing pools, writing the report) only
    says so on one line; a third one quits at once. Either way no traceback is printed.
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._count = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except (ValueError, OSError):  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self._count += 1
        if self._count == 1:
            self.received = signum
            raise KeyboardInterrupt(signal.Signals(signum).name)
        if self._count == 2:
            os.write(2, b"papy: still shutting down; signal again to quit at once\n")
            return
        os._exit(self.exit_code)

    @property
    def exit_code(self) -> int:
        return EXIT_SIGTERM if self.received == signal.SIGTERM else EXIT_SIGINT

    def __exit__(self, *exc: object) -> None:
        # Keep the handlers until the process exits: a late signal must not print a
        # traceback from the interpreter's own shutdown either. After a signal, ignore
        # further ones: Python puts back the default handlers (which would kill the
        # process and lose the exit code) while it shuts down, but leaves ignored ones.
        if self.received is not None:
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    signal.signal(sig, signal.SIG_IGN)
                except (ValueError, OSError):
                    pass


def _stderr_width() -> int:
    """Return the width to print in: the terminal's, or 80 when stderr is not one."""
    try:
        if sys.stderr.isatty():
            return shutil.get_terminal_size((80, 24)).columns
    except (AttributeError, ValueError):
        pass
    return 80


def _check_writable(path_text: str, option: str) -> None:
    """Raise InputError unless a file can be written at ``path_text`` (tested, not made)."""
    path = Path(path_text)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise InputError(f"cannot write {option} {path_text}: it is a directory")
    if not parent.is_dir():
        raise InputError(f"cannot write {option} {path_text}: no directory {parent}")
    if not os.access(parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"cannot write {option} {path_text}: permission denied")


class _FailurePrinter:
    """Print the first failures one per line, then only count them per (node, exception)."""

    def __init__(
        self, echo: Callable[[str], None], shown: int = SHOWN_FAILURES, defer: bool = False
    ) -> None:
        self.echo = echo
        self.shown = shown
        self.count = 0
        self.rest: dict[tuple[str, str], int] = {}
        #: with the live display on, lines wait for the end (they would tear the display)
        self.defer = defer
        self.waiting: list[str] = []

    def add(self, f: Failure) -> None:
        self.count += 1
        if self.count <= self.shown:
            where = _last_frame(f.traceback)
            line = f"failed: {f.describe()}" + (f" (at {where})" if where else "")
            if self.defer:
                self.waiting.append(line)
            else:
                self.echo(line)
            return
        key = (f.node, f.exc_type)
        self.rest[key] = self.rest.get(key, 0) + 1

    def summary(self) -> list[str]:
        """Return the deferred lines, then one per (node, exception type) not printed."""
        return self.waiting + [
            f"... and {n:,} more: node {node!r} {exc}"
            for (node, exc), n in sorted(self.rest.items(), key=lambda kv: -kv[1])
        ]


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
def run(**options: Any) -> None:
    """Run the pipeline defined in FILE.py over items (NAME: which Pipeline, if several)."""
    with _Signals() as signals:
        try:
            code = _run(**options)
        except KeyboardInterrupt:
            name = signal.Signals(signals.received).name if signals.received else "SIGINT"
            click.echo(f"interrupted ({name})", err=True)
            sys.exit(signals.exit_code)
    sys.exit(code)


def _run(
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
) -> int:
    """Do ``papy run``; return the exit code (0 or 1), raise ClickException for errors.

    ``remote`` holds the cluster options (TLS, SLURM/PBS) of :func:`_cluster_options`.
    """
    pipe = load_pipeline(target)
    if input_path != "-" and not Path(input_path).is_file():
        raise InputError(f"input file not found: {input_path}")
    if report_path:
        _check_writable(report_path, "--report")
    if journal_path:
        _check_writable(journal_path, "--journal")
    try:
        out = sys.stdout if output_path == "-" else open(output_path, "w", encoding="utf-8")  # noqa: SIM115
    except OSError as exc:
        raise InputError(f"cannot write --output {output_path}: {exc.strerror or exc}") from None
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
    # Bytes, decoded line by line, so that a bad line is named by its number.
    src = sys.stdin.buffer if input_path == "-" else open(input_path, "rb")  # noqa: SIM115
    reader = _InputReader(src, input_format)
    progress = False if no_progress else None
    failures = _FailurePrinter(
        lambda line: click.echo(line, err=True), defer=progress_wanted(progress)
    )
    try:
        for value in pipe.map(
            reader,
            errors="yield",
            progress=progress,
            report=report_path,
            journal=journal_path,
        ):
            if isinstance(value, Failure):
                failures.add(value)
                continue
            out.write(json.dumps(value, default=str) + "\n")
    except (GraphError, JournalError) as exc:
        raise InputError(str(exc)) from None
    except PapyError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        if src is not sys.stdin.buffer:
            src.close()
        if out is not sys.stdout:
            out.close()
        else:
            out.flush()
        if own_pool is not None:
            own_pool.close()
    for line in failures.summary():
        click.echo(line, err=True)
    if pipe.last_report is not None:
        click.echo(pipe.last_report.table(width=_stderr_width()), err=True)
    if report_path:
        click.echo(f"report written to {report_path}", err=True)
    if reader.error:
        raise InputError(reader.error + "; the items before it were run")
    if failures.count:
        click.echo(f"{failures.count:,} item(s) failed", err=True)
        return EXIT_FAILED
    return EXIT_OK


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
            from papy._draw import render_dot, to_dot

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


_JOURNAL_EXAMPLES = """
\b
Examples:
  papy journal show run.db
  papy journal failures run.db
  papy journal forget run.db --node score
"""


@main.group(epilog=_JOURNAL_EXAMPLES)
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
    from papy._journal.admin import describe

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
    from papy._journal.admin import failures

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
    from papy._journal.admin import forget

    try:
        dropped = forget(path, node)
    except PapyError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"forgot {', '.join(repr(n) for n in dropped)}")
