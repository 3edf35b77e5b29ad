"""Usage errors of the cluster options of ``papy run``: one line, exit code 2, no job."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "papy", "run", str(ROOT / "examples" / "chain.py"), *args],
        input="1\n",
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_tls_options_need_dask():
    r = _run("--tls-cert", "me.pem")
    assert r.returncode == 2
    assert "connect to a scheduler given with --dask" in r.stderr
    assert "Traceback" not in r.stderr


def test_slurm_with_only_thread_nodes_needs_all_remote(tmp_path):
    script = tmp_path / "threads.py"
    script.write_text(
        "from papy import Pipeline, ThreadPool\n"
        "pipeline = Pipeline('threads', pool=ThreadPool(2))\n"
        "pipeline.add(abs)\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "papy", "run", str(script), "--slurm", "--jobs", "2"],
        input="1\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "no node of the pipeline runs on a DaskPool or the default pool" in r.stderr


def test_dask_and_slurm_exclude_each_other():
    r = _run("--slurm", "--dask", "tcp://127.0.0.1:9")
    assert r.returncode == 2
    assert "exclude each other" in r.stderr


def test_missing_certificate_file_is_a_usage_error(tmp_path):
    r = _run("--dask", "tls://127.0.0.1:9", "--tls-ca-file", str(tmp_path / "nope.pem"))
    assert r.returncode == 2
    assert "--tls-ca-file: file not found" in r.stderr
