"""An authenticated cluster: a TLS scheduler and workers on 127.0.0.1, certificates made here.

A Dask scheduler runs any code a client sends it; with TLS (mutual: the scheduler checks
the client's certificate against its CA) only holders of a certificate of that CA get in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.cluster import (
    Certificates,
    Cluster,
    make_certificates,
    start_scheduler,
    start_worker,
    wait_for_workers,
)
from papy import Pipeline, PoolError, ThreadPool
from papy.pools.dask import DaskPool

ROOT = Path(__file__).resolve().parents[2]


def _security(certs: Certificates):
    from distributed import Security

    return Security(
        tls_ca_file=str(certs.ca_file),
        tls_client_cert=str(certs.cert),
        tls_client_key=str(certs.key),
        require_encryption=True,
    )


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, Certificates]]:
    tmp = tmp_path_factory.mktemp("tls")
    certs = make_certificates(tmp)
    c = start_scheduler(tmp, foreign=True, extra=["--protocol", "tls", *certs.options()])
    try:
        assert c.address.startswith("tls://127.0.0.1:")
        start_worker(c, "tls-1", foreign=True, extra=certs.options())
        start_worker(c, "tls-2", foreign=True, extra=certs.options())
        wait_for_workers(c, 2, security=_security(certs))
        yield c, certs
    finally:
        c.stop()


def square_plus(x: int) -> int:
    return x * x + 1


def test_pipeline_runs_through_a_tls_cluster(tls):
    cluster, certs = tls
    with DaskPool(cluster.address, security=_security(certs)) as remote:
        pipe = Pipeline("tls", pool=remote)
        pipe.add(square_plus)
        got = list(pipe.map(range(100)))
        assert remote.workers == 2
    with ThreadPool(2) as local:
        pipe = Pipeline("tls", pool=local)
        pipe.add(square_plus)
        assert got == list(pipe.map(range(100)))


def test_client_without_certificates_is_refused(tls):
    cluster, _ = tls
    pipe = Pipeline("nocert", pool=DaskPool(cluster.address, connect_timeout=3))
    pipe.add(square_plus)
    with pytest.raises(PoolError, match="uses TLS and no certificates were given"):
        list(pipe.map([1]))


def test_client_with_a_foreign_ca_is_refused(tls, tmp_path):
    cluster, _ = tls
    stranger = make_certificates(tmp_path, name="stranger")
    t0 = time.monotonic()
    pipe = Pipeline(
        "stranger", pool=DaskPool(cluster.address, security=_security(stranger), connect_timeout=3)
    )
    pipe.add(square_plus)
    with pytest.raises(PoolError, match="cannot reach the Dask scheduler at tls://"):
        list(pipe.map([1]))
    assert time.monotonic() - t0 < 30


def test_plain_tcp_to_the_tls_port_is_refused(tls):
    cluster, _ = tls
    plain = cluster.address.replace("tls://", "tcp://")
    pipe = Pipeline("plain", pool=DaskPool(plain, connect_timeout=3))
    pipe.add(square_plus)
    with pytest.raises(PoolError, match="cannot reach the Dask scheduler"):
        list(pipe.map([1]))


def _papy_run(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-m", "papy", "run", str(ROOT / "examples" / "chain.py"), *args],
        input="1\n2\n3\n",
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_cli_tls_options(tls, tmp_path):
    cluster, certs = tls
    ok = _papy_run(
        [
            "--dask",
            cluster.address,
            "--tls-ca-file",
            str(certs.ca_file),
            "--tls-cert",
            str(certs.cert),
            "--tls-key",
            str(certs.key),
            "--no-progress",
        ]
    )
    assert ok.returncode == 0, ok.stderr
    assert [json.loads(x)["square"] for x in ok.stdout.splitlines()] == [1, 4, 9]
    refused = _papy_run(["--dask", cluster.address, "--no-progress"])
    assert refused.returncode != 0
    assert "uses TLS and no certificates were given" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_cli_dask_config_file(tls, tmp_path):
    cluster, certs = tls
    config = tmp_path / "dask.yaml"
    config.write_text(
        "distributed:\n"
        "  comm:\n"
        "    require-encryption: true\n"
        "    tls:\n"
        f"      ca-file: {certs.ca_file}\n"
        "      client:\n"
        f"        cert: {certs.cert}\n"
        f"        key: {certs.key}\n"
    )
    ok = _papy_run(["--dask", cluster.address, "--dask-config", str(config), "--no-progress"])
    assert ok.returncode == 0, ok.stderr
    assert [json.loads(x)["square"] for x in ok.stdout.splitlines()] == [1, 4, 9]
