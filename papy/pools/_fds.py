"""Descriptors of shared-memory segments passed between processes (``SCM_RIGHTS``).

A message that carries segments is followed on the worker's Unix socket by its
descriptors, a few hundred per system call at most; the receiver reads exactly what was
announced, so the stream stays at a message boundary even when the kernel drops some.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence

#: descriptors the kernel passes in one message at most (SCM_MAX_FD); also the most
#: segments one message carries (further buffers travel in the message)
_FDS_PER_MESSAGE = 250


def _close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class DescriptorsLost(OSError):
    """The kernel dropped descriptors sent to this process (its open-file limit)."""


def send_fds(sock: socket.socket, fds: Sequence[int]) -> None:
    """Send descriptors right after a message (a few hundred per system call at most)."""
    for i in range(0, len(fds), _FDS_PER_MESSAGE):
        socket.send_fds(sock, [b"F"], list(fds[i : i + _FDS_PER_MESSAGE]))


def recv_fds(sock: socket.socket, count: int) -> list[int]:
    """Receive ``count`` descriptors sent by :func:`send_fds`; EOFError if the peer died.

    Every chunk :func:`send_fds` sent is read, even after the kernel dropped descriptors
    of one (this process's open-file limit: :class:`DescriptorsLost` then, once the
    stream is past them), so the next message is read from its start.
    """
    fds: list[int] = []
    lost = False
    try:
        for start in range(0, count, _FDS_PER_MESSAGE):
            want = min(_FDS_PER_MESSAGE, count - start)
            msg, got, flags, _addr = socket.recv_fds(sock, 1, want, socket.MSG_CMSG_CLOEXEC)
            if not msg:
                raise EOFError("the peer closed its socket")
            fds.extend(got)
            lost = lost or bool(flags & socket.MSG_CTRUNC) or len(got) < want
        if lost:
            raise DescriptorsLost(
                "shared-memory segments could not be received: this process has too "
                "many open files (raise its limit, `ulimit -n`, or keep fewer large values)"
            )
    except BaseException:
        for fd in fds:
            _close_fd(fd)
        raise
    return fds


def close_fds(fds: Sequence[int]) -> None:
    """Close received descriptors that will not be mapped (a message no longer wanted)."""
    for fd in fds:
        _close_fd(fd)
