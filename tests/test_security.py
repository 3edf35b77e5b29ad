"""Safe on shared machines: private files and directories, journals only from oneself.

The two-user test runs as root: it creates two unprivileged users, runs a pipeline as one
(a real process with their uid and gid) and checks, as the other, that nothing the run
created can be read.
"""

from __future__ import annotations

import functools
import os
import pickle
import pwd
import shutil
import sqlite3
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from helpers import unavailable

from papy import JournalError, Pipeline, ThreadPool, shell
from papy._errors import PapyError
from papy._html import render_html
from papy._rundir import make_run_dir, run_dir, set_current
from papy.cli import main
from papy.io import dump_item

ROOT = Path(__file__).resolve().parent.parent


def mode(path: str | Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@pytest.fixture
def own_config(tmp_path, monkeypatch) -> Path:
    """A config directory of this test's own, so the user's real key is not touched."""
    cfg = tmp_path / "config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(cfg))
    return cfg


# -- modes, whatever the umask ----------------------------------------------------------------


def _dump(x):
    return str(dump_item({"secret": x}))


def test_every_file_and_directory_papy_creates_is_private_whatever_the_umask(tmp_path, own_config):
    seen: dict[str, int] = {}

    def look(path):
        rd = run_dir()
        seen[str(rd)] = mode(rd)
        for p in rd.iterdir():
            seen[str(p)] = mode(p)
        jdir = tmp_path / "work"
        for p in jdir.iterdir():
            seen[str(p)] = mode(p)
        return path

    old = os.umask(0)
    try:
        work = tmp_path / "work"
        work.mkdir()
        pipe = Pipeline("modes", pool=ThreadPool(2))
        d = pipe.add(_dump, name="dump")
        s = pipe.add(shell(["echo", "{item}"], stdout="file"), after=d, name="echo")
        pipe.add(look, after=s, name="look", batch=1)
        pipe.run(range(3), journal=work / "run.db", report=work / "report.html")
    finally:
        os.umask(old)
    run_dirs = [p for p in seen if Path(p).name.startswith("papy-run-")]
    assert run_dirs and all(seen[p] == 0o700 for p in run_dirs)
    files = {p: m for p, m in seen.items() if p not in run_dirs}
    assert any(p.endswith(".pkl") for p in files) and any(p.endswith(".out") for p in files)
    assert any(p.endswith("run.db-wal") for p in files)
    assert any(p.endswith("run.db.lock") for p in files)
    assert {p: m for p, m in files.items() if m != 0o600} == {}
    for name in ("run.db", "run.db.lock", "report.html"):
        assert mode(work / name) == 0o600, name
    assert mode(own_config / "papy") == 0o700
    assert mode(own_config / "papy" / "secret") == 0o600
    assert not Path(run_dirs[0]).exists()  # removed at the end


def test_a_symlink_where_a_run_directory_would_go_is_refused_not_followed(tmp_path, monkeypatch):
    target = tmp_path / "attacker"
    target.mkdir()
    planted = tmp_path / "papy-run-planted"
    planted.symlink_to(target)
    set_current(str(planted))  # a worker told to use this run directory
    try:
        with pytest.raises(PapyError, match="symbolic link .*refused, not followed"):
            run_dir()
        with pytest.raises(PapyError, match="symbolic link"):
            dump_item(b"secret")
    finally:
        set_current(None)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "papy-files").symlink_to(target)  # the layout used outside a run
    with pytest.raises(PapyError, match="symbolic link"):
        dump_item(b"secret")
    assert list(target.iterdir()) == []
    # the scheduler's own run directories: fresh random names, made 0700, never reused
    made = {make_run_dir() for _ in range(20)}
    try:
        assert len(made) == 20 and all(mode(p) == 0o700 for p in made)
    finally:
        for p in made:
            os.rmdir(p)


# -- journals: only one's own ----------------------------------------------------------------


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {_Evil.marker}",))

    marker = ""


def _journal_with_records(path: Path) -> None:
    pipe = Pipeline("j", pool=ThreadPool(1))
    pipe.add(lambda x: x * 2, name="double")
    assert list(pipe.map(range(5), journal=path)) == [0, 2, 4, 6, 8]


def _plant(path: Path, marker: Path) -> None:
    _Evil.marker = str(marker)
    con = sqlite3.connect(path)
    con.execute("UPDATE outputs SET value = ?", (pickle.dumps(_Evil()),))
    con.commit()
    con.close()


def test_a_tampered_journal_is_refused_before_any_pickle_is_loaded(tmp_path, own_config):
    journal = tmp_path / "run.db"
    marker = tmp_path / "pwned"
    _journal_with_records(journal)
    _plant(journal, marker)
    pipe = Pipeline("j", pool=ThreadPool(1))
    pipe.add(lambda x: x * 2, name="double")
    with pytest.raises(JournalError, match="fails authentication"):
        list(pipe.map(range(5), journal=journal))
    assert not marker.exists()
    # show and failures read metadata only: safe on a hostile file
    r = CliRunner().invoke(main, ["journal", "show", str(journal)])
    assert r.exit_code == 0, r.output
    assert "double" in r.output and "terminal" in r.output and "5" in r.output
    r = CliRunner().invoke(main, ["journal", "failures", str(journal)])
    assert r.exit_code == 0
    assert not marker.exists()


def test_a_journal_written_with_another_key_is_refused(tmp_path, monkeypatch, own_config):
    journal = tmp_path / "run.db"
    _journal_with_records(journal)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "someone-else"))
    pipe = Pipeline("j", pool=ThreadPool(1))
    pipe.add(lambda x: x * 2, name="double")
    with pytest.raises(JournalError, match="another user's key or modified"):
        list(pipe.map(range(5), journal=journal))


def test_the_key_file_must_be_private(tmp_path, own_config):
    _journal_with_records(tmp_path / "run.db")
    secret = own_config / "papy" / "secret"
    secret.chmod(0o644)
    try:  # each run reads the key anew: nothing to clear
        with pytest.raises(JournalError, match="can be read by other users"):
            _journal_with_records(tmp_path / "other.db")
    finally:
        secret.chmod(0o600)


# -- the HTML report escapes what it shows -----------------------------------------------------


def test_the_html_report_escapes_pipeline_node_and_item_text(tmp_path):
    pipe = Pipeline("<script>alert('p')</script>", pool=ThreadPool(1))
    pipe.add(lambda x: x, name="<img src=x onerror=alert(1)>")
    report = pipe.run(["<b>item</b>"])
    html = render_html(pipe, report)
    assert "<script>alert" not in html and "<img src=x" not in html
    assert "&lt;script&gt;alert(" in html and "&lt;img src=x onerror=alert(1)&gt;" in html


# -- two users on one machine ---------------------------------------------------------------


def needs_root(test: Any) -> Any:
    """Run ``test`` only as root (it creates local users); in CI it must run."""

    @functools.wraps(test)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if os.geteuid() != 0:
            unavailable("creating two local users to test file privacy needs root")
        return test(*args, **kwargs)

    return wrapper


def _useradd(name: str) -> pwd.struct_passwd:
    subprocess.run(
        ["useradd", "--no-create-home", "--user-group", "--shell", "/bin/sh", name],
        check=True,
        capture_output=True,
    )
    return pwd.getpwnam(name)


@pytest.fixture
def two_users() -> Iterator[tuple[pwd.struct_passwd, pwd.struct_passwd]]:
    if not shutil.which("useradd"):
        unavailable("useradd is not installed")
    tag = uuid.uuid4().hex[:6]
    names = [f"papy_a{tag}", f"papy_b{tag}"]
    made = []
    try:
        for n in names:
            made.append(n)
            _useradd(n)
        yield pwd.getpwnam(names[0]), pwd.getpwnam(names[1])
    finally:
        for n in made:
            subprocess.run(["userdel", n], capture_output=True)


@pytest.fixture
def shared_python(tmp_path_factory) -> Iterator[str]:
    """A Python every local user can run, seeing this project and its dependencies.

    The test's own interpreter may live in a directory only root can enter (a pyenv in
    /root), so a virtual environment is made in a world-readable place from a system
    Python of the same version, with a .pth file naming this project's site-packages.
    """
    import sysconfig

    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    base = shutil.which(version, path="/usr/local/bin:/usr/bin:/bin")
    if base is None:
        unavailable(f"no system {version} that other users can run")
    where = Path(tempfile.mkdtemp(prefix="papy-venv-"))
    try:
        where.chmod(0o755)
        subprocess.run([base, "-m", "venv", "--without-pip", str(where)], check=True)
        code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
        purelib = subprocess.run(
            [str(where / "bin" / "python"), "-c", code], capture_output=True, text=True, check=True
        ).stdout.strip()
        ours = sysconfig.get_paths()["purelib"]
        Path(purelib, "papy-tests.pth").write_text(f"{ROOT}\n{ours}\n")
        yield str(where / "bin" / "python")
    finally:
        shutil.rmtree(where, ignore_errors=True)


def _as(user: pwd.struct_passwd, argv: list[str], env: dict[str, str], **kw):
    return subprocess.Popen(
        argv,
        user=user.pw_uid,
        group=user.pw_gid,
        extra_groups=[],
        umask=0o022,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


_RUNNER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from papy import Pipeline, ProcessPool, shell
    from papy.io import dump_item, load_item, run_dir

    shared = Path(sys.argv[1])
    work = shared / "work"

    def dump(x):
        return str(dump_item({"secret": x}))

    def load(p):
        return load_item(p)["secret"]

    def pause(x):
        if x == 0:
            deadline = time.monotonic() + 60
            while not list(run_dir().glob("*.out")) and time.monotonic() < deadline:
                time.sleep(0.02)  # the shell node runs on the other worker
            (shared / "rundir.txt").write_text(str(run_dir()))
            (shared / "paused").touch()
            while not (shared / "go").exists():
                time.sleep(0.02)
        return x

    if __name__ == "__main__":
        work.mkdir()  # workers import this file: top-level code must be repeatable
        pipe = Pipeline("private", pool=ProcessPool(2))
        d = pipe.add(dump, name="dump")
        e = pipe.add(shell(["cat", "{item}"], stdout="file"), after=d, name="copy")
        loaded = pipe.add(load, after=d, name="load")
        pipe.add(pause, after=loaded, name="pause", batch=1)
        pipe.run(range(10), journal=work / "run.db", report=work / "report.html")
        print("DONE", flush=True)
    """
)

_PROBE = textwrap.dedent(
    """
    import os, sys
    for path in sys.argv[1:]:
        try:
            if os.path.isdir(path):
                os.listdir(path)
            else:
                with open(path, "rb") as fh:
                    fh.read(1)
            print("READ", path)
        except PermissionError:
            print("DENIED", path)
        except FileNotFoundError:
            print("GONE", path)  # a sink batch's pending file, committed meanwhile
    """
)


@needs_root
def test_another_user_cannot_read_anything_a_run_creates(tmp_path, two_users, shared_python):
    alice, bob = two_users
    python = shared_python
    shared = Path(tempfile.mkdtemp(prefix="papy-shared-"))
    try:
        shared.chmod(0o1777)  # like /tmp
        tmp = shared / "tmp"
        tmp.mkdir()
        tmp.chmod(0o1777)
        (shared / "runner.py").write_text(_RUNNER)
        (shared / "probe.py").write_text(_PROBE)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "PYTHONPATH": str(ROOT),
            "TMPDIR": str(tmp),
            "HOME": str(shared),
            "XDG_CONFIG_HOME": str(shared / "alice-config"),
        }
        run = _as(alice, [python, str(shared / "runner.py"), str(shared)], env)
        deadline = time.monotonic() + 120
        while not (shared / "paused").exists():
            assert run.poll() is None, run.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        rundir = Path((shared / "rundir.txt").read_text())
        during = [rundir, *rundir.iterdir()]
        during += [p for p in (shared / "work").iterdir()]
        during += [shared / "alice-config" / "papy", shared / "alice-config" / "papy" / "secret"]
        assert any(p.suffix == ".pkl" for p in during) and any(p.suffix == ".out" for p in during)
        assert any(p.name == "run.db-wal" for p in during)
        assert all(os.lstat(p).st_uid == alice.pw_uid for p in during if p.exists())
        probe = _as(bob, [python, str(shared / "probe.py"), *map(str, during)], env)
        out, err = probe.communicate(timeout=60)
        assert probe.returncode == 0, err
        assert "READ" not in out and out.count("DENIED") + out.count("GONE") == len(during), out
        assert out.count("DENIED") >= len(during) - 2, out
        # alice herself can read them: the files are hers, not broken
        own = _as(alice, [python, str(shared / "probe.py"), *map(str, during)], env)
        out, _ = own.communicate(timeout=60)
        assert "DENIED" not in out and "READ" in out, out
        (shared / "go").touch()
        out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
        after = [p for p in (shared / "work").iterdir()]
        assert {p.name for p in after} >= {"run.db", "report.html"}
        probe = _as(bob, [python, str(shared / "probe.py"), *map(str, after)], env)
        out, err = probe.communicate(timeout=60)
        assert "READ" not in out and out.count("DENIED") == len(after), out
        assert not rundir.exists()

        # bob cannot plant a link for alice's workdir, nor hand her his journal
        bobs = shared / "bobs"
        bobs.mkdir()
        os.chown(bobs, bob.pw_uid, bob.pw_gid)
        link = shared / "alice-work"
        link.symlink_to(bobs)
        os.lchown(link, bob.pw_uid, bob.pw_gid)
        use_link = textwrap.dedent(
            f"""
            from papy import Pipeline, ThreadPool
            from papy.io import dump_item
            pipe = Pipeline("w", pool=ThreadPool(1), workdir={str(link)!r})
            pipe.add(lambda x: str(dump_item(x)))
            try:
                pipe.run([b"secret"])
            except Exception as exc:
                print(type(exc).__name__, exc)
            """
        )
        r = _as(alice, [python, "-c", use_link], env)
        out, err = r.communicate(timeout=60)
        assert "refused, not followed" in out, out + err
        assert list(bobs.iterdir()) == []
        os.chown(shared / "work" / "run.db", bob.pw_uid, bob.pw_gid)
        reuse = textwrap.dedent(
            f"""
            from papy import Pipeline, ThreadPool
            pipe = Pipeline("w", pool=ThreadPool(1))
            pipe.add(abs)
            try:
                pipe.run([1], journal={str(shared / "work" / "run.db")!r})
            except Exception as exc:
                print(type(exc).__name__, exc)
            """
        )
        r = _as(alice, [python, "-c", reuse], env)
        out, err = r.communicate(timeout=60)
        assert "JournalError" in out and f"belongs to user {bob.pw_name!r}" in out, out + err
    finally:
        shutil.rmtree(shared, ignore_errors=True)


@needs_root
def test_a_journal_in_a_directory_one_cannot_write_names_the_cause(two_users, shared_python):
    alice, _ = two_users
    shared = Path(tempfile.mkdtemp(prefix="papy-ro-"))
    try:
        shared.chmod(0o755)  # root's: alice can read, not write
        cfg = Path(tempfile.mkdtemp(prefix="papy-cfg-"))
        os.chown(cfg, alice.pw_uid, alice.pw_gid)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(cfg),
            "XDG_CONFIG_HOME": str(cfg),
        }
        code = textwrap.dedent(
            f"""
            from papy import Pipeline, ThreadPool
            pipe = Pipeline("ro", pool=ThreadPool(1))
            pipe.add(abs)
            try:
                pipe.run([1, -2], journal={str(shared / "run.db")!r})
            except Exception as exc:
                print(type(exc).__name__, exc)
            """
        )
        r = _as(alice, [shared_python, "-c", code], env)
        out, err = r.communicate(timeout=60)
        assert "JournalError" in out and f"directory {shared} is not writable" in out, out + err
        shutil.rmtree(cfg, ignore_errors=True)
    finally:
        shutil.rmtree(shared, ignore_errors=True)
