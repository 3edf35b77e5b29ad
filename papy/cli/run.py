"""``papy run``: run a pipeline from a file over items read from a file or stdin.

Errors a user can cause (a missing file, no pipeline object, a bad option, a bad input
line, an unwritable output) are reported as one line, never as a traceback.

Exit codes of ``papy run``: 0 every item succeeded; 1 some items failed (the first ten are
shown, then a count per node and exception type); 2 usage or input error; 130 interrupted
(SIGINT, Ctrl-C); 143 terminated (SIGTERM).
"""

from __future__ import annotations

import json
import os
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
from papy._progress import progress_wanted
from papy.cli.cluster import cluster_options, dask_pool, queue_pool
from papy.cli.exits import EXIT_FAILED, EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM, InputError
from papy.cli.loading import check_writable, load_pipeline
from papy.pools._base import Pool
from papy.pools.process import ProcessPool

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


@click.command(epilog=_RUN_EXAMPLES)
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
@cluster_options
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

    ``remote`` holds the cluster options (TLS, SLURM/PBS) of :func:`cluster_options`.
    """
    pipe = load_pipeline(target)
    if input_path != "-" and not Path(input_path).is_file():
        raise InputError(f"input file not found: {input_path}")
    if report_path:
        check_writable(report_path, "--report")
    if journal_path:
        check_writable(journal_path, "--journal")
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
        own_pool = pipe.pool = dask_pool(dask_address, remote)
    elif remote.get("queue_kind"):
        own_pool = queue_pool(pipe, remote)
    elif workers is not None and pipe.pool is None:
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
