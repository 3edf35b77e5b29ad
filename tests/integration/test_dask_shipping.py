"""The user's own modules reach Dask workers that cannot import them.

The workers of these tests run in a directory of their own with no PYTHONPATH: they can
import PaPy and Dask (installed) and nothing of the tests, like workers on another host.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import unavailable

from integration.cluster import Cluster, start_scheduler, start_worker, wait_for_workers
from papy import Pipeline, PoolError, ThreadPool
from papy.pools.dask import DaskPool

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("foreign")
    c = start_scheduler(tmp, foreign=True)
    try:
        start_worker(c, "far-1", foreign=True)
        start_worker(c, "far-2", foreign=True)
        wait_for_workers(c, 2)
        yield c
    finally:
        c.stop()


class Reading:
    """An item type defined in this (test) module."""

    def __init__(self, sensor: str, value: float) -> None:
        self.sensor = sensor
        self.value = value


LOADS = []


@functools.cache
def calibration() -> dict[str, float]:
    """A module-level cached loader, as users write them for lookup tables and models."""
    LOADS.append(os.getpid())
    return {f"s{i}": 1.0 + i / 10 for i in range(5)}


def calibrate(r: Reading) -> Reading:
    return Reading(r.sensor, round(r.value * calibration()[r.sensor], 6))


def as_pair(r: Reading) -> tuple[str, float]:
    return (r.sensor, r.value)


def test_workers_cannot_import_the_tests(foreign):
    from distributed import Client

    with Client(foreign.address, set_as_default=False) as client:
        found = client.run(importlib.util.find_spec, "integration")
        cwds = client.run(os.getcwd)
    assert set(found.values()) == {None}
    assert not any(cwd.startswith(str(ROOT)) for cwd in cwds.values())


def test_functions_classes_and_cached_loaders_of_a_test_module_run_remotely(foreign, caplog):
    items = [Reading(f"s{i % 5}", float(i)) for i in range(200)]

    def build(pool) -> Pipeline:
        pipe = Pipeline("calibrate")
        fixed = pipe.add(calibrate, pool=pool)
        pipe.add(as_pair, after=fixed, pool=pool)
        return pipe

    with ThreadPool(2) as local:
        expected = list(build(local).map(items))
    caplog.set_level(logging.INFO, logger="papy")
    with DaskPool(foreign.address) as remote:
        got = list(build(remote).map(items))
        assert remote.shipped == {__name__}
    assert got == expected
    assert got[7] == ("s2", round(7 * 1.2, 6))
    assert f"ships the module(s) {__name__}" in caplog.text


def test_ships_nothing_that_is_installed(foreign):
    import math

    with DaskPool(foreign.address) as remote:
        pipe = Pipeline("stdlib", pool=remote)
        pipe.add(math.sqrt)
        assert list(pipe.map([4.0, 9.0])) == [2.0, 3.0]
        assert remote.shipped == set()


def _write_project(where: Path) -> Path:
    """Write a pipeline file and the package of steps next to it, as a user would."""
    pkg = where / "mypipeline"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "steps.py").write_text(
        textwrap.dedent(
            '''
            import functools

            from mypipeline.units import KM_PER_MILE


            @functools.cache
            def distances():
                """Loaded once per process, then reused."""
                return {"a": 1.0, "b": 2.5, "c": 4.0}


            def parse(line):
                name, count = line.split(",")
                return {"name": name, "count": int(count)}


            def enrich(row):
                return {**row, "km": distances()[row["name"]] * row["count"] * KM_PER_MILE}
            '''
        )
    )
    (pkg / "units.py").write_text("KM_PER_MILE = 1.609344\n")
    script = where / "pipe.py"
    script.write_text(
        textwrap.dedent(
            """
            import functools

            from papy import Pipeline
            from mypipeline.steps import enrich, parse


            @functools.cache
            def precision():
                return 3


            def rounded(row):
                return {**row, "km": round(row["km"], precision())}


            pipeline = Pipeline("miles")
            rows = pipeline.add(parse)
            km = pipeline.add(enrich, after=rows)
            pipeline.add(rounded, after=km)
            """
        )
    )
    return script


def _papy_run(args: list[str], cwd: Path, stdin: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [sys.executable, "-m", "papy", "run", *args, "--no-progress"],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=cwd,
        env=env,
    )


def test_cli_same_file_runs_locally_and_on_the_cluster(foreign, tmp_path):
    script = _write_project(tmp_path)
    lines = "".join(f"{'abc'[i % 3]},{i}\n" for i in range(60))
    local = _papy_run([str(script), "--workers", "2"], tmp_path, lines)
    assert local.returncode == 0, local.stderr
    remote = _papy_run([str(script), "--dask", foreign.address], tmp_path, lines)
    assert remote.returncode == 0, remote.stderr
    assert remote.stdout == local.stdout
    rows = [json.loads(x) for x in remote.stdout.splitlines()]
    assert len(rows) == 60
    assert rows[4] == {"name": "b", "count": 4, "km": round(2.5 * 4 * 1.609344, 3)}
    assert "daskx2" in remote.stderr


_EXT_SOURCE = r"""
#include <Python.h>
static PyObject *twice(PyObject *self, PyObject *arg) {
    long v = PyLong_AsLong(arg);
    return PyLong_FromLong(2 * v);
}
static PyMethodDef methods[] = {{"twice", twice, METH_O, "2*x"}, {NULL, NULL, 0, NULL}};
static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "papyfastext", NULL, -1, methods};
PyMODINIT_FUNC PyInit_papyfastext(void) { return PyModule_Create(&mod); }
"""


def _build_extension(where: Path) -> None:
    import sysconfig

    cc = shutil.which("cc") or shutil.which("gcc")
    include = sysconfig.get_paths()["include"]
    if cc is None or not (Path(include) / "Python.h").exists():
        unavailable("compiling a C extension needs a C compiler and Python's headers")
    src = where / "papyfastext.c"
    src.write_text(_EXT_SOURCE)
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    subprocess.run(
        [
            cc,
            "-shared",
            "-fPIC",
            f"-I{include}",
            str(src),
            "-o",
            str(where / f"papyfastext{suffix}"),
        ],
        check=True,
        capture_output=True,
    )


def test_a_compiled_extension_that_workers_lack_is_one_clear_error(foreign, tmp_path):
    _build_extension(tmp_path)
    sys.path.insert(0, str(tmp_path))
    try:
        import papyfastext  # type: ignore[import-not-found]

        assert papyfastext.twice(4) == 8
        with DaskPool(foreign.address) as remote:
            pipe = Pipeline("ext", pool=remote)
            pipe.add(papyfastext.twice)
            with pytest.raises(PoolError) as info:
                list(pipe.map(range(10)))
        text = str(info.value)
        assert "'papyfastext'" in text
        assert "compiled extension" in text
        assert "install it in the workers' environment" in text
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("papyfastext", None)


def test_an_extension_the_workers_can_import_is_used_by_name(tmp_path):
    """Workers that share the extension (same path, a shared filesystem) just import it."""
    _build_extension(tmp_path)
    cluster = start_scheduler(tmp_path, foreign=True)
    sys.path.insert(0, str(tmp_path))
    try:
        start_worker(cluster, "sharing", foreign=True, env={"PYTHONPATH": str(tmp_path)})
        wait_for_workers(cluster, 1)
        import papyfastext  # type: ignore[import-not-found]

        with DaskPool(cluster.address) as remote:
            pipe = Pipeline("ext-shared", pool=remote)
            pipe.add(papyfastext.twice)
            assert list(pipe.map(range(10))) == [2 * x for x in range(10)]
            assert remote.shipped == set()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("papyfastext", None)
        cluster.stop()
