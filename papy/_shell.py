"""External programs as node functions, run safely per item.

``shell(["gzip", "-c", "{path}"], stdout="bytes")`` returns a function that runs ``gzip``
for each item. Every element of ``argv`` is one argument: placeholders are filled with
``str.format`` and never go through a shell, so an item such as ``"; rm -rf ~"`` or
``"$(reboot)"`` reaches the program as plain text.

Placeholders: ``{item}`` (the item), ``{path}`` (the item, meant as a path), and for a
mapping item each of its keys (``{name}``). Programs are I/O for the driver: a ThreadPool
is the natural pool for shell nodes.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from papy._errors import ShellError
from papy._rundir import open_private, run_dir

StdoutMode = Literal["text", "bytes", "file"]


class Shell:
    """Make a node function that runs the program ``argv`` for each item (``papy.shell``).

    ``stdin``: ``None`` (no input), ``"item"`` (send the item: text, bytes or a path's
    contents), constant bytes/text, a template like argv's, or a function of the item.
    ``stdout``: return it as ``"text"``, ``"bytes"``, or ``"file"`` (a path in the run
    directory). A non-zero exit raises :class:`ShellError` with the exit code and the end
    of stderr and of stdout, so the item becomes a Failure that says why; ``ok_codes`` lists
    the exit codes that are not errors (``(0, 1)`` for grep, whose 1 means "no match").
    ``timeout`` kills the program and fails the item. Instances pickle, so shell nodes run
    in any pool.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        stdin: Literal["item"] | bytes | str | Callable[[Any], bytes | str] | None = None,
        stdout: StdoutMode = "text",
        timeout: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | Path | None = None,
        stderr_lines: int = 20,
        ok_codes: Sequence[int] = (0,),
    ) -> None:
        if isinstance(argv, str):
            raise TypeError(
                "shell() takes argv as a list (['grep', '-c', '{item}']), not a string: "
                "a string would need a shell to split it"
            )
        if not argv:
            raise ValueError("shell() needs a program to run")
        if stdout not in ("text", "bytes", "file"):
            raise ValueError(f"stdout must be 'text', 'bytes' or 'file', got {stdout!r}")
        self.argv = [str(a) for a in argv]
        self.stdin = stdin
        self.stdout = stdout
        self.timeout = timeout
        self.env = dict(env) if env is not None else None
        self.cwd = str(cwd) if cwd is not None else None
        self.stderr_lines = stderr_lines
        codes = (ok_codes,) if isinstance(ok_codes, int) else tuple(ok_codes)
        if not codes or not all(isinstance(c, int) for c in codes):
            raise ValueError(f"ok_codes must be exit codes (ints), got {ok_codes!r}")
        self.ok_codes = codes
        self.__name__ = Path(self.argv[0]).name
        self.__qualname__ = f"shell:{self.__name__}"

    @staticmethod
    def _fields(item: Any) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        if isinstance(item, Mapping):
            fields.update(item)
        fields.setdefault("item", item)
        fields.setdefault("path", os.fspath(item) if isinstance(item, (str, os.PathLike)) else item)
        return fields

    def fill(self, item: Any) -> list[str]:
        """Return argv with the placeholders filled for ``item`` (one argument each)."""
        fields = self._fields(item)
        try:
            return [a.format(**fields) if "{" in a else a for a in self.argv]
        except (KeyError, IndexError) as exc:
            raise ValueError(
                f"placeholder {exc} in {self.argv} has no value for item {item!r}; use "
                "{item}, {path} or a key of a mapping item"
            ) from None

    def _input(self, item: Any) -> bytes | None:
        src = self.stdin
        if src is None:
            return None
        if src == "item":
            data = item
        elif callable(src):
            data = src(item)
        elif isinstance(src, str) and "{" in src:
            data = src.format(**self._fields(item))  # a template, like argv's
        else:
            data = src
        if isinstance(data, os.PathLike):
            data = Path(data).read_bytes()
        return data.encode() if isinstance(data, str) else bytes(data)

    def __call__(self, item: Any) -> Any:
        argv = self.fill(item)
        env = {**os.environ, **self.env} if self.env is not None else None
        data = self._input(item)
        out_path: Path | None = None
        try:
            if self.stdout == "file":
                out_path = run_dir() / f"{self.__name__}-{uuid.uuid4().hex}.out"
                with open_private(out_path, "wb") as sink:
                    proc = subprocess.run(
                        argv,
                        input=data,
                        stdout=sink,
                        stderr=subprocess.PIPE,
                        stdin=None if data is not None else subprocess.DEVNULL,
                        timeout=self.timeout,
                        env=env,
                        cwd=self.cwd,
                    )
            else:
                proc = subprocess.run(
                    argv,
                    input=data,
                    capture_output=True,
                    stdin=None if data is not None else subprocess.DEVNULL,
                    timeout=self.timeout,
                    env=env,
                    cwd=self.cwd,
                )
        except subprocess.TimeoutExpired:
            raise TimeoutError(
                f"{argv[0]} did not finish within {self.timeout:g} s and was killed"
            ) from None
        except FileNotFoundError:
            raise FileNotFoundError(f"program not found: {argv[0]!r}") from None
        if proc.returncode not in self.ok_codes:
            n = self.stderr_lines
            err = proc.stderr.decode(errors="replace").splitlines()
            out = b"" if out_path is not None else proc.stdout
            # Only the end matters: decode at most the last 64 KiB of a large output.
            out_lines = out[-65536:].decode(errors="replace").splitlines()
            raise ShellError(argv, proc.returncode, "\n".join(err[-n:]), "\n".join(out_lines[-n:]))
        if out_path is not None:
            return out_path
        return proc.stdout.decode() if self.stdout == "text" else proc.stdout

    def __repr__(self) -> str:
        codes = f", ok_codes={self.ok_codes!r}" if self.ok_codes != (0,) else ""
        return f"shell({self.argv!r}, stdout={self.stdout!r}{codes})"


#: ``papy.shell(argv, ...)``: the constructor is the function users call.
shell = Shell
