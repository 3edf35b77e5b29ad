"""Options of ``papy run`` for a Dask cluster (TLS, configuration) and SLURM/PBS jobs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from papy._errors import PapyError
from papy._pipeline import Pipeline
from papy.pools._base import Pool
from papy.pools.dask import DaskPool, jobqueue_cluster
from papy.pools.process import ProcessPool


def cluster_options(func: Any) -> Any:
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


def queue_pool(pipe: Pipeline, remote: dict[str, Any]) -> Pool:
    """Start a SLURM/PBS cluster for ``papy run --slurm/--pbs``; move remote nodes onto it.

    The nodes whose pool is a DaskPool go to the batch jobs (with their ``resources``,
    which every job then provides), and with ``--all-remote`` the process nodes and the
    nodes without a pool too. A pipeline without any DaskPool sends the nodes without a
    pool of their own, as ``--dask`` does. The returned pool owns the cluster: closing it
    cancels every job it submitted.
    """
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


def dask_pool(address: str, remote: dict[str, Any]) -> Pool:
    """Return the DaskPool of ``papy run --dask ADDRESS`` with its TLS/config options."""
    if remote.get("dask_config"):
        # Dask (and its YAML reader) are optional and slow to import: only when asked for.
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
        from distributed import Security  # optional, slow to import: only when asked for

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
