"""DaskPool on a real single-host SLURM through dask-jobqueue.

The fixture installs slurm-wlm and munge when missing (as root, with apt), starts munged,
slurmctld and slurmd with a private configuration, and stops them by pid at the end.
Jobs run in a directory of their own without PYTHONPATH: they import nothing of the tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import unavailable

from integration import slurm as slurm_mod
from integration.slurm import PARTITION, Slurm
from papy import Failure, Pipeline, PoolError, ThreadPool
from papy.pools.dask import DaskPool, jobqueue_cluster

_why_not = slurm_mod.why_not()


@pytest.fixture(autouse=True)
def _needs_slurm() -> None:
    if _why_not is not None:
        unavailable(f"SLURM: {_why_not}")


ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slurm]:
    s = Slurm(tmp_path_factory.mktemp("slurm"))
    old = os.environ.get("SLURM_CONF")
    try:
        slurm_mod.install()
    except subprocess.CalledProcessError as exc:
        unavailable(f"SLURM: apt-get could not install slurm-wlm and munge: {exc.stderr!r}")
    try:
        s.start()
        os.environ["SLURM_CONF"] = str(s.conf)
        yield s
    finally:
        s.stop()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


def _cluster(tmp: Path, **kw):
    jobs_dir = tmp / "jobs"
    jobs_dir.mkdir(exist_ok=True)
    return jobqueue_cluster(
        "slurm",
        cores=kw.pop("cores", 1),
        memory=kw.pop("memory", "1GB"),
        walltime=kw.pop("walltime", "00:10:00"),
        partition=kw.pop("partition", PARTITION),
        log_directory=str(tmp / "logs"),
        job_script_prologue=["unset PYTHONPATH"],
        job_extra_directives=[f"--chdir={jobs_dir}", *kw.pop("job_extra_directives", [])],
        **kw,
    )


def cpu_ms(x: int, ms: float = 20.0) -> int:
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        pass
    return x


def where(x: int) -> tuple[int, str]:
    return x, os.environ.get("SLURM_JOB_ID", "")


def _build(local, remote) -> Pipeline:
    pipe = Pipeline("mixed")
    parsed = pipe.add(int, pool=local, name="parse")
    sq = pipe.add(lambda x: x * x, after=parsed, pool=remote, name="square")
    tagged = pipe.add(where, after=sq, pool=remote)
    pipe.add(lambda t: t[0] + 1, after=tagged, pool=local, name="plus1")
    return pipe


def test_mixed_pipeline_on_slurm_equals_all_local(slurm, tmp_path):
    items = [str(i) for i in range(150)]
    with ThreadPool(2) as local:
        expected = list(_build(local, local).map(items))
        cluster = _cluster(tmp_path)
        cluster.scale(jobs=2)
        with DaskPool(cluster) as remote:
            remote.own_cluster = True
            got = list(_build(local, remote).map(items))
            job_ids = remote.client.run(os.getenv, "SLURM_JOB_ID")
            cwds = remote.client.run(os.getcwd)
        address = cluster.scheduler_address
        refused = Pipeline("stranger", pool=DaskPool(address, connect_timeout=3))
        refused.add(abs)
        with pytest.raises(PoolError, match="uses TLS and no certificates were given"):
            list(refused.map([1]))
    assert address.startswith("tls://")  # the scheduler takes code only from this run
    assert got == expected == [i * i + 1 for i in range(150)]
    assert job_ids and all(job_ids.values())  # the workers ran inside SLURM jobs
    assert set(cwds.values()) == {str(tmp_path / "jobs")}
    assert slurm.settle() == []


@pytest.mark.timeout(300)
def test_scancel_mid_run_loses_and_duplicates_nothing(slurm, tmp_path):
    import dask
    import distributed  # noqa: F401  (its configuration defaults must be loaded first)

    # A cancelled job's worker does not always say goodbye: the scheduler then notices it
    # by its missed heartbeats (worker-ttl, 5 minutes by default; 20 s here), and only
    # then re-runs its tasks elsewhere.
    with dask.config.set({"distributed.scheduler.worker-ttl": "20s"}):
        cluster = _cluster(tmp_path)
    cluster.scale(jobs=2)
    with DaskPool(cluster) as remote:
        remote.own_cluster = True
        remote.client.wait_for_workers(2, timeout=120)
        pipe = Pipeline("scancel", pool=remote)
        pipe.add(cpu_ms, batch=2)
        out = []
        victim = None
        for value in pipe.map(range(300), errors="yield"):
            out.append(value)
            if len(out) == 40 and victim is None:
                victim = slurm.jobs()[0][0]
                subprocess.run(["scancel", victim], check=True, env=slurm.env)
        assert victim is not None
    assert not [o for o in out if isinstance(o, Failure)]
    assert out == list(range(300))
    assert max(Counter(out).values()) == 1
    assert slurm.settle() == []


def test_a_partition_that_does_not_exist_fails_fast(slurm, tmp_path):
    t0 = time.monotonic()
    pipe = Pipeline("nopart", pool=DaskPool(_cluster(tmp_path, partition="nosuchpart")))
    pipe.add(abs)
    with pytest.raises(PoolError, match=r"SLURM refuses the job script.*partition"):
        list(pipe.map([1, 2]))
    assert time.monotonic() - t0 < 30
    assert slurm.settle() == []


def test_a_job_pending_past_start_timeout_fails_the_run(slurm, tmp_path):
    hog = subprocess.run(
        ["sbatch", "--parsable", "-c", str(slurm_mod.NODE_CPUS), "--wrap", "sleep 600"],
        capture_output=True,
        text=True,
        check=True,
        env=slurm.env,
        cwd=tmp_path,
    ).stdout.strip()
    try:
        cluster = _cluster(tmp_path)
        pool = DaskPool(cluster, start_timeout=8)
        pool.own_cluster = True
        cluster.scale(jobs=1)
        pipe = Pipeline("pending", pool=pool)
        pipe.add(abs)
        t0 = time.monotonic()
        with pytest.raises(PoolError, match=r"no worker of SLURMCluster joined within 8 s") as e:
            list(pipe.map([1, 2]))
        assert time.monotonic() - t0 < 60
        assert "PENDING" in str(e.value)
        pool.close()
    finally:
        subprocess.run(["scancel", hog], env=slurm.env, check=False)
    assert slurm.settle() == []


def test_elastic_jobs_rise_during_a_run_and_fall_to_zero_after(slurm, tmp_path):
    cluster = _cluster(tmp_path)
    counts: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            counts.append(len(slurm.jobs()))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        with DaskPool(cluster, adapt=(0, 3), idle_timeout=3) as remote:
            assert counts[-1:] in ([], [0])
            pipe = Pipeline("elastic", pool=remote)
            pipe.add(cpu_ms, batch=2)
            out = list(pipe.map(range(400)))
            assert out == list(range(400))
            during = max(counts)
            deadline = time.monotonic() + 60
            while (not counts or counts[-1]) and time.monotonic() < deadline:
                time.sleep(0.5)
            after = counts[-1]
            assert remote.scaled[0] == 0 and max(remote.scaled) == 3 and remote.scaled[-1] == 0
        cluster.close()
    finally:
        stop.set()
        sampler.join()
    assert during >= 2
    assert after == 0


def test_cli_slurm_runs_and_leaves_no_job(slurm, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    argv = [
        sys.executable,
        "-m",
        "papy",
        "run",
        str(ROOT / "examples" / "chain.py"),
        "--slurm",
        "--jobs",
        "2",
        "--cores",
        "1",
        "--memory",
        "1GB",
        "--walltime",
        "00:05:00",
        "--partition",
        PARTITION,
        "--no-progress",
    ]
    r = subprocess.run(
        argv,
        input="".join(f"{i}\n" for i in range(1, 31)),
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert [json.loads(x)["square"] for x in r.stdout.splitlines()] == [i * i for i in range(1, 31)]
    assert slurm.settle() == []
    assert (tmp_path / "papy-job-logs").is_dir()
    assert "daskx2" in r.stderr  # planned for both jobs, not only the first to start


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cli_slurm_interrupted_cancels_its_jobs(slurm, tmp_path, sig):
    script = tmp_path / "slow.py"
    script.write_text(
        "import time\nfrom papy import Pipeline\n\n"
        "def slow(x):\n    time.sleep(0.5)\n    return x\n\n"
        "pipeline = Pipeline('slow')\npipeline.add(slow)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "papy",
            "run",
            str(script),
            "--slurm",
            "--all-remote",
            "--jobs",
            "2",
            "--partition",
            PARTITION,
            "--memory",
            "1GB",
            "--no-progress",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("".join(f"{i}\n" for i in range(1000)))
    proc.stdin.close()
    first = proc.stdout.readline()  # a job is running and delivering
    assert first.strip()
    assert slurm.jobs()
    proc.send_signal(sig)
    proc.wait(timeout=60)
    err = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode == (130 if sig == signal.SIGINT else 143) or (
        sig == signal.SIGTERM and proc.returncode == 130  # older releases said 130
    ), err
    assert slurm.settle() == []


def slow_until(marker: str):  # type: ignore[no-untyped-def]
    """Items of 1 s until `marker` exists, then of 10 ms: the run outlasts a walltime kill
    (150 s of work on two jobs against SLURM's 60-90 s) and ends soon after it (the
    function travels by value: jobs cannot import the tests)."""

    def slow_item(x: int) -> int:
        time.sleep(0.01 if os.path.exists(marker) else 1.0)
        return x

    return slow_item


@pytest.mark.timeout(300)  # SLURM's shortest walltime is a minute, checked every 30 s
def test_jobs_killed_by_walltime_lose_and_duplicate_nothing(slurm, tmp_path):
    cluster = _cluster(tmp_path, walltime="00:01:00")  # SLURM's shortest time limit
    cluster.scale(jobs=2)
    seen: set[str] = set()
    stop = threading.Event()
    marker = tmp_path / "walltime-passed"
    log = slurm.where / "slurmctld.log"

    def sample() -> None:
        while not stop.wait(0.5):
            seen.update(jid for jid, _ in slurm.jobs())
            if len(seen) >= 3 and log.exists() and "Time limit exhausted" in log.read_text():
                marker.touch()  # a job was killed and replaced: the rest can be quick

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        with DaskPool(cluster, start_timeout=120) as remote:
            remote.own_cluster = True
            pipe = Pipeline("walltime", pool=remote)
            pipe.add(slow_until(str(marker)), batch=1, name="slow_item")
            out = list(pipe.map(range(300), errors="yield"))
    finally:
        stop.set()
        sampler.join()
    assert not [o for o in out if isinstance(o, Failure)]
    assert out == list(range(300))
    assert marker.exists()  # the run outlasted a walltime kill
    assert "Time limit exhausted" in log.read_text()  # SLURM ended jobs at their walltime...
    assert len(seen) >= 3  # ...and the pool asked for replacements
    assert slurm.settle() == []


def test_node_resources_become_job_resources(slurm, tmp_path):
    cluster = _cluster(tmp_path, resources={"GPU": 1})
    script = cluster.job_script()
    assert "#SBATCH --gres=gpu:1" in script
    assert "--resources GPU=1" in script
    cluster.scale(jobs=1)
    with DaskPool(cluster) as remote:
        remote.own_cluster = True
        with remote.with_resources({"GPU": 1}) as gpu:
            pipe = Pipeline("gpu")
            first = pipe.add(abs, pool=ThreadPool(2), name="local")
            pipe.add(lambda x: x * 10, after=first, pool=gpu, name="on_gpu")
            assert list(pipe.map(range(-20, 0))) == [x * 10 for x in range(20, 0, -1)]
            assert gpu.workers == 1
        job_ids = set(remote.client.run(os.getenv, "SLURM_JOB_ID").values())
    assert len(job_ids) == 1
    shown = subprocess.run(
        ["scontrol", "show", "job", job_ids.pop()], capture_output=True, text=True, env=slurm.env
    ).stdout
    assert "gres:gpu:1" in shown or "gres/gpu=1" in shown, shown
    assert slurm.settle() == []


def test_cli_slurm_failed_run_cancels_its_jobs(slurm, tmp_path):
    script = tmp_path / "boom.py"
    script.write_text(
        "from papy import Pipeline\n\n"
        "def boom(x):\n    raise ValueError(f'bad item {x}')\n\n"
        "pipeline = Pipeline('boom')\npipeline.add(boom)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "papy",
            "run",
            str(script),
            "--slurm",
            "--partition",
            PARTITION,
            "--memory",
            "1GB",
            "--no-progress",
        ],
        input="1\n2\n3\n",
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=tmp_path,
    )
    assert r.returncode == 1, r.stderr
    assert "bad item 2" in r.stderr
    assert slurm.settle() == []
