"""Start a real Dask cluster for tests: a scheduler and workers as separate processes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

DASK = [sys.executable, "-m", "distributed.cli.dask_scheduler"]
WORKER = [sys.executable, "-m", "distributed.cli.dask_worker"]


@dataclass
class Cluster:
    address: str
    scheduler: subprocess.Popen[bytes]
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: Path | None = None

    def worker_processes(self) -> list[psutil.Process]:
        """Return the worker processes (the children of the nannies)."""
        out = []
        for nanny in self.workers:
            with contextlib.suppress(psutil.NoSuchProcess):  # a nanny that is gone has none
                out.extend(psutil.Process(nanny.pid).children(recursive=True))
        return out

    def stop(self) -> None:
        # The workers first, while their scheduler still answers: stopped together, each
        # worker waited for a scheduler that was gone (8 s a cluster).
        for group in (self.workers, [self.scheduler]):
            for p in group:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in group:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    for child in psutil.Process(p.pid).children(recursive=True):
                        child.kill()
                    p.kill()
                    p.wait(timeout=5)


def _env(foreign: bool = False) -> dict[str, str]:
    """Return the environment of cluster processes.

    ``foreign`` processes see only the installed packages (PaPy, Dask): no PYTHONPATH, so
    they can import nothing of the tests, like workers on another machine.
    """
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")]),
        "DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL": "5s",
        "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "5s",
    }
    if foreign:
        del env["PYTHONPATH"]
    return env


def start_scheduler(
    tmp: Path,
    host: str = "127.0.0.1",
    prefix: list[str] | None = None,
    *,
    foreign: bool = False,
    extra: list[str] | None = None,
) -> Cluster:
    """Start ``dask scheduler`` on a random port; return once it accepts connections.

    ``foreign`` runs it in ``tmp`` without the tests on its path; ``extra`` are more
    options (TLS, ``--protocol``).
    """
    sched_file = tmp / "scheduler.json"
    log = open(tmp / "scheduler.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            *(prefix or []),
            *DASK,
            "--host",
            host,
            "--port",
            "0",
            "--no-dashboard",
            "--scheduler-file",
            str(sched_file),
            *(extra or []),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_env(foreign),
        cwd=tmp if foreign else None,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if sched_file.exists():
            try:
                address = json.loads(sched_file.read_text())["address"]
                return Cluster(address, proc, logs=tmp)
            except (json.JSONDecodeError, KeyError):
                pass
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"dask scheduler did not start: {(tmp / 'scheduler.log').read_text()}")


def start_worker(
    cluster: Cluster,
    name: str,
    *,
    host: str = "127.0.0.1",
    resources: str | None = None,
    prefix: list[str] | None = None,
    foreign: bool = False,
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> None:
    """Start one ``dask worker`` (one thread) under a nanny.

    ``foreign`` workers run in a directory of their own without the tests on their path.
    """
    assert cluster.logs is not None
    log = open(cluster.logs / f"{name}.log", "wb")  # noqa: SIM115
    argv = [
        *(prefix or []),
        *WORKER,
        cluster.address,
        "--name",
        name,
        "--nthreads",
        "1",
        "--nworkers",
        "1",
        "--host",
        host,
        "--no-dashboard",
        "--memory-limit",
        "0",
    ]
    if resources:
        argv += ["--resources", resources]
    argv += extra or []
    cwd = None
    if foreign:
        cwd = cluster.logs / f"{name}-cwd"
        cwd.mkdir(exist_ok=True)
    cluster.workers.append(
        subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**_env(foreign), **(env or {})},
            cwd=cwd,
        )
    )


def wait_for_workers(
    cluster: Cluster, n: int, timeout: float = 60, security: object = None
) -> None:
    from distributed import Client

    with Client(cluster.address, timeout=30, set_as_default=False, security=security) as client:
        client.wait_for_workers(n, timeout=timeout)


def have_netns() -> str | None:
    """Return None when network namespaces can be made here, else why not."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2's 'ip' command"
    probe = subprocess.run(["ip", "netns", "add", "papy-probe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"'ip netns add' failed: {probe.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", "papy-probe"], capture_output=True)
    return None


class Hosts:
    """Separate network hosts on this machine: namespaces on one bridge, own addresses.

    ``10.213.0.0/24`` is used only inside namespaces this class creates and deletes.
    """

    SUBNET = "10.213.0"

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.bridge = "papybr0"
        self.address = {n: f"{self.SUBNET}.{i + 1}" for i, n in enumerate(names)}

    def _ip(self, *args: str, ns: str | None = None) -> None:
        argv = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
        subprocess.run(argv, check=True, capture_output=True, text=True)

    def up(self) -> None:
        self.down()
        self._ip("link", "add", self.bridge, "type", "bridge")
        self._ip("addr", "add", f"{self.SUBNET}.254/24", "dev", self.bridge)
        self._ip("link", "set", self.bridge, "up")
        for n in self.names:
            subprocess.run(["ip", "netns", "add", n], check=True, capture_output=True)
            self._ip("link", "add", f"v-{n}", "type", "veth", "peer", "name", "eth0", "netns", n)
            self._ip("link", "set", f"v-{n}", "master", self.bridge)
            self._ip("link", "set", f"v-{n}", "up")
            self._ip("addr", "add", f"{self.address[n]}/24", "dev", "eth0", ns=n)
            self._ip("link", "set", "eth0", "up", ns=n)
            self._ip("link", "set", "lo", "up", ns=n)

    def prefix(self, name: str) -> list[str]:
        """Return the argv prefix that runs a command on host ``name``."""
        return ["ip", "netns", "exec", name]

    def cut(self, name: str) -> None:
        """Unplug host ``name`` from the network."""
        self._ip("link", "set", f"v-{name}", "down")

    def down(self) -> None:
        for n in self.names:
            pids = subprocess.run(["ip", "netns", "pids", n], capture_output=True, text=True)
            for pid in pids.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", n], capture_output=True)
            subprocess.run(["ip", "link", "del", f"v-{n}"], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


@dataclass
class Certificates:
    """A test CA and one certificate it signed, as PEM files (for TLS on 127.0.0.1)."""

    ca_file: Path
    cert: Path
    key: Path

    def options(self) -> list[str]:
        """Return the ``dask scheduler``/``dask worker`` options that use them."""
        return [
            "--tls-ca-file",
            str(self.ca_file),
            "--tls-cert",
            str(self.cert),
            "--tls-key",
            str(self.key),
        ]


def make_certificates(where: Path, name: str = "papy-test") -> Certificates:
    """Generate a CA and a certificate for 127.0.0.1/localhost signed by it."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    out = Certificates(where / "ca.pem", where / f"{name}.pem", where / f"{name}.key")
    out.ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    out.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    out.key.chmod(0o600)
    return out
