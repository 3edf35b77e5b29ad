"""A real single-host SLURM for tests: munged, slurmctld and slurmd started and stopped here.

As root, Debian's ``slurm-wlm`` and ``munge`` packages are installed with apt when missing
(``make slurm`` does the same). The configuration is private to the test session: a
directory of its own, pointed to by ``SLURM_CONF``, so it touches nothing in /etc/slurm.
The daemons run in the foreground as children of the test process and are stopped by pid.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
DAEMONS = ("slurmctld", "slurmd", "munged")
#: How many jobs can run at once on the test node (its CPUs are over-declared: the jobs
#: are one small Dask worker each, and the machine has only a couple of cores).
NODE_CPUS = 8
PARTITION = "papy"


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin:/bin")


def why_not() -> str | None:
    """Return None when a SLURM can be installed/started here, else the reason."""
    if all(_which(d) for d in DAEMONS) and all(_which(c) for c in ("sbatch", "squeue")):
        return None if os.geteuid() == 0 else "starting slurmd needs root"
    if os.geteuid() != 0:
        return "installing slurm-wlm and munge needs root"
    if shutil.which("apt-get") is None:
        return "slurm-wlm and munge are missing and there is no apt-get to install them"
    return None


def install() -> None:
    """Install slurm-wlm and munge with apt when their programs are missing."""
    if all(_which(d) for d in DAEMONS):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, capture_output=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", *PACKAGES], check=True, env=env, capture_output=True
    )


def _conf(where: Path, host: str, memory_mb: int) -> str:
    return f"""# Written by PaPy's tests: one host, one partition.
ClusterName=papytest
SlurmctldHost={host}
SlurmctldPort=6917
SlurmdPort=6918
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
ReturnToService=2
SlurmUser=root
SlurmdUser=root
SlurmctldPidFile={where}/slurmctld.pid
SlurmdPidFile={where}/slurmd.pid
SlurmdSpoolDir={where}/spool
StateSaveLocation={where}/state
SlurmctldLogFile={where}/slurmctld.log
SlurmdLogFile={where}/slurmd.log
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SlurmdParameters=config_overrides
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MinJobAge=5
KillWait=5
InactiveLimit=0
OverTimeLimit=0
GresTypes=gpu
NodeName={host} CPUs={NODE_CPUS} RealMemory={memory_mb} Gres=gpu:2 State=UNKNOWN
PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class Slurm:
    """munged + slurmctld + slurmd on this host, with a private configuration."""

    def __init__(self, where: Path) -> None:
        self.where = where
        self.host = socket.gethostname().split(".")[0]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.conf = where / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def _munge_ok(self) -> bool:
        if not _which("munge"):
            return False
        enc = subprocess.run(["munge", "-n"], capture_output=True)
        if enc.returncode != 0:
            return False
        dec = subprocess.run(["unmunge"], input=enc.stdout, capture_output=True)
        return dec.returncode == 0

    def start(self, timeout: float = 60) -> None:
        """Start the daemons; return once the node accepts jobs."""
        install()
        (self.where / "spool").mkdir(parents=True, exist_ok=True)
        (self.where / "state").mkdir(parents=True, exist_ok=True)
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 // 2
        self.conf.write_text(_conf(self.where, self.host, memory_mb))
        for i in range(2):  # stand-ins for GPU device files: SLURM only counts them
            (self.where / f"gpu{i}").touch()
        (self.where / "gres.conf").write_text(
            f"NodeName={self.host} Name=gpu File={self.where}/gpu[0-1]\n"
        )
        if not self._munge_ok():
            run = Path("/run/munge")
            run.mkdir(exist_ok=True)
            shutil.chown(run, "munge", "munge")
            self.procs["munged"] = subprocess.Popen(
                ["runuser", "-u", "munge", "--", _which("munged") or "munged", "-F"],
                stdout=open(self.where / "munged.log", "wb"),  # noqa: SIM115
                stderr=subprocess.STDOUT,
            )
            self._wait(self._munge_ok, timeout, "munged")
        for daemon in ("slurmctld", "slurmd"):
            self.procs[daemon] = subprocess.Popen(
                [_which(daemon) or daemon, "-D", "-f", str(self.conf)],
                stdout=open(self.where / f"{daemon}.out", "wb"),  # noqa: SIM115
                stderr=subprocess.STDOUT,
                env=self.env,
            )
        self._wait(self._node_ready, timeout, "the SLURM node")

    def _node_ready(self) -> bool:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise RuntimeError(f"{name} exited with {p.returncode}: {self.logs()}")
        r = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env=self.env
        )
        return r.returncode == 0 and r.stdout.strip() in {"idle", "mixed", "allocated"}

    def _wait(self, ready: object, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():  # type: ignore[operator]
                return
            time.sleep(0.3)
        raise RuntimeError(f"{what} did not come up in {timeout:g} s: {self.logs()}")

    def logs(self) -> str:
        out = []
        for name in ("slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out", "munged.log"):
            path = self.where / name
            if path.exists():
                out.append(f"--- {name}\n" + path.read_text(errors="replace")[-3000:])
        return "\n".join(out)

    def jobs(self, name: str | None = None) -> list[tuple[str, str]]:
        """Return (job id, state) of the jobs in the queue, optionally by job name."""
        argv = ["squeue", "-h", "-o", "%i %T"]
        if name:
            argv += ["-n", name]
        r = subprocess.run(argv, capture_output=True, text=True, env=self.env, check=True)
        return [tuple(line.split()) for line in r.stdout.splitlines() if line.strip()]  # type: ignore[misc]

    def settle(self, timeout: float = 30) -> list[tuple[str, str]]:
        """Wait until the queue is empty (jobs finish COMPLETING); return what is left."""
        deadline = time.monotonic() + timeout
        left = self.jobs()
        while left and time.monotonic() < deadline:
            time.sleep(0.5)
            left = self.jobs()
        return left

    def cancel_all(self) -> None:
        subprocess.run(["scancel", "--full", "-u", "root"], env=self.env, capture_output=True)

    def stop(self) -> None:
        """Cancel every job, then stop the daemons this object started, by pid."""
        if "slurmctld" in self.procs:
            self.cancel_all()
            deadline = time.monotonic() + 15
            while self.jobs() and time.monotonic() < deadline:
                time.sleep(0.3)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=5)
        self.procs.clear()
