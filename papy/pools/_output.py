"""A process worker's standard output and error, copied line by line to the driver's.

The worker's file descriptors 1 and 2 are pipes the driver reads (the pool's manager
thread, :class:`Output`); complete lines are written to the driver's own streams.
"""

from __future__ import annotations

import codecs
import os
import sys
from multiprocessing.connection import Connection

__all__ = ["LONG_LINE", "Output", "finish_outputs"]


#: a worker's line longer than this (bytes) reaches the driver in pieces of this size
LONG_LINE = 1 << 20


class Output:
    """One of a worker's output streams, copied line by line to the driver's own stream.

    Complete lines only are written, each in one call, so output of workers never
    interleaves mid-line and a live display (which redirects the driver's ``sys.stdout``)
    prints them above itself. A carriage return ends a line too (a progress bar redrawn
    in place shows as it moves), and a line longer than ``LONG_LINE`` bytes is written in
    pieces of that size: the driver holds at most that much of a worker's line. Text is
    decoded as UTF-8 across reads, so a character split between two reads stays whole.
    """

    __slots__ = ("conn", "decoder", "name", "partial")

    def __init__(self, conn: Connection, name: str) -> None:
        self.conn = conn
        self.name = name  # "stdout" or "stderr"
        self.partial = bytearray()
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def read(self) -> bool:
        """Copy what is available; return False at end of file."""
        try:
            data = os.read(self.conn.fileno(), 1 << 16)
        except (OSError, ValueError):
            data = b""
        if not data:
            self.flush()
            return False
        end = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1  # in what came now only
        if end:
            self.partial += data[:end]
            self.write(bytes(self.partial))
            self.partial = bytearray(data[end:])
        else:
            self.partial += data
            if len(self.partial) >= LONG_LINE:
                self.write(bytes(self.partial))
                self.partial.clear()
        return True

    def flush(self) -> None:
        if self.partial:
            self.write(bytes(self.partial) + b"\n")
            self.partial.clear()

    def write(self, data: bytes) -> None:
        stream = getattr(sys, self.name)
        if self.name == "stderr" and type(sys.stdout).__name__ == "FileProxy":
            # A live display (rich) is drawn on the terminal and proxies stdout only:
            # route error lines through it too, so they print above the display.
            stream = sys.stdout
        if stream is None:
            return
        try:
            stream.write(self.decoder.decode(data))
            stream.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        try:
            self.conn.close()
        except OSError:
            pass


def finish_outputs(outputs: list[Output]) -> None:
    """Copy what a dead worker still had in its output pipes, then close them."""
    for out in outputs:
        try:
            while out.conn.poll(0) and out.read():
                pass
        except (OSError, ValueError):
            pass
        out.flush()
        out.close()
