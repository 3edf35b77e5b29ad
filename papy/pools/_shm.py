"""Large buffers between processes through shared memory, not through the pipes.

A NumPy array, ``bytes``, ``bytearray``, contiguous ``memoryview`` (or any object whose
pickle protocol 5 reduction yields a :class:`pickle.PickleBuffer`) of at least
:data:`SHM_THRESHOLD` bytes travels *out of band*: the pickling process writes it once
into an anonymous shared-memory file (``memfd_create``), and the message carries only a
small descriptor (which file, offset, length) while the file descriptor itself travels
beside the message over the worker's Unix socket (``SCM_RIGHTS``).

- A **worker** that returns a large array writes it once into a new segment.
- The **driver** maps the segments of a result (no copy: its array is a view over the
  mapping) and keeps one descriptor per segment; when it sends such a value on to another
  worker, it finds the segment the buffer lies in (:class:`Registry`) and passes the same
  descriptor: the driver never copies or pipes the data. A large value the driver made
  itself (an input item, the output of a thread pool) is written once into a new segment.
- The **consuming worker** maps the segment copy-on-write: its arrays are views over
  the mapping (writable, and its writes stay private), ``bytes`` are copied once.

Segments have no name in any file system: the kernel frees one when its last descriptor
and its last mapping are gone. The driver's descriptor is closed as soon as the last value
viewing it is garbage-collected (after the consuming task is done, or when the run drops
its items); a worker's mapping goes with its task's values. A process that dies for any
reason (a crash, SIGKILL, Ctrl-C) frees what it held, so nothing is ever left in
``/dev/shm`` or anywhere else to sweep.
"""

from __future__ import annotations

import bisect
import ctypes
import errno
import mmap
import os
import pickle
import resource
import socket
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import Any

from papy.pools._fds import _FDS_PER_MESSAGE, _close_fd, close_fds

#: bytes from which a buffer travels through shared memory instead of the pipes (1 MiB);
#: ``ProcessPool(shm_threshold=...)`` changes it per pool, ``None`` turns it off
SHM_THRESHOLD = 1 << 20
#: errors of a segment the system cannot make now: the buffer travels in the message
_NO_SEGMENT = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOSPC}

#: where one out-of-band buffer lies: (index of its segment in the message, offset, length)
Desc = tuple[int, int, int]


def available() -> bool:
    """Tell whether this system has anonymous shared-memory files (Linux does)."""
    return hasattr(os, "memfd_create") and hasattr(socket, "send_fds")


# -- the address of a buffer -----------------------------------------------------------------


class _PyBuffer(ctypes.Structure):
    _fields_ = [
        ("buf", ctypes.c_void_p),
        ("obj", ctypes.c_void_p),
        ("len", ctypes.c_ssize_t),
        ("itemsize", ctypes.c_ssize_t),
        ("readonly", ctypes.c_int),
        ("ndim", ctypes.c_int),
        ("format", ctypes.c_char_p),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("suboffsets", ctypes.c_void_p),
        ("internal", ctypes.c_void_p),
    ]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None


def address(obj: Any) -> int:
    """Return the address of the first byte of a contiguous buffer (read-only ones too)."""
    view = _PyBuffer()
    _get_buffer(obj, ctypes.byref(view), 0)  # PyBUF_SIMPLE; raises on a non-buffer
    try:
        return view.buf or 0
    finally:
        _release_buffer(ctypes.byref(view))


# -- segments ----------------------------------------------------------------------------------


def create_segment(data: memoryview) -> int:
    """Return the descriptor of a new shared-memory file holding a copy of ``data``."""
    fd = os.memfd_create("papy", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, data.nbytes)
        _write(fd, data)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write(fd: int, data: memoryview) -> None:
    view = data.cast("B") if data.format != "B" or data.ndim != 1 else data
    done = 0
    while done < view.nbytes:
        done += os.pwrite(fd, view[done:], done)


class Arena:
    """A worker's segments: those it sent, and those given back to be written again.

    Fresh shared memory costs the kernel a page allocation (and later a release) per
    4 KiB, several times the cost of the copy itself; a segment the driver gives back
    (:meth:`release`, once no process maps it any more) is reused for a later value of
    about its size. At most :data:`SPARE` segments and :data:`SPARE_BYTES` bytes wait
    for reuse (the rest are freed), and none once a run ended (:meth:`drop_spares`).
    """

    SPARE = 64
    SPARE_BYTES = 64 << 20

    def __init__(self, limit: int | None = None) -> None:
        #: segments sent and not yet given back at most (each is a descriptor here and in
        #: the driver); beyond it, and when the system refuses one, values stay in the
        #: message: see :func:`segment_limit`
        self.limit = segment_limit() if limit is None else limit
        self.ids = 0
        self.sent: dict[int, tuple[int, int]] = {}  # id -> (fd, capacity)
        self.spare: list[tuple[int, int, int]] = []  # (id, fd, capacity)

    def full(self) -> bool:
        """Tell whether no more segments may be sent before some are given back."""
        return len(self.sent) >= self.limit

    def take(self, data: memoryview) -> tuple[int, int]:
        """Return ``(id, fd)`` of a segment now holding a copy of ``data``."""
        n = data.nbytes
        for i, (seg, fd, cap) in enumerate(self.spare):
            if n <= cap <= 2 * n:
                del self.spare[i]
                try:
                    _write(fd, data)
                except BaseException:
                    _close_fd(fd)
                    raise
                self.sent[seg] = (fd, cap)
                return seg, fd
        fd = create_segment(data)
        self.ids += 1
        self.sent[self.ids] = (fd, n)
        return self.ids, fd

    def release(self, ids: Sequence[int], reuse: bool) -> None:
        """Take back segments nobody maps any more (``reuse``), or that go for good."""
        for seg in ids:
            entry = self.sent.pop(seg, None)
            if entry is None:
                continue
            spare_bytes = sum(cap for _, _, cap in self.spare) + entry[1]
            if reuse and len(self.spare) < self.SPARE and spare_bytes <= self.SPARE_BYTES:
                self.spare.append((seg, *entry))
            else:
                _close_fd(entry[0])

    def drop_spares(self) -> None:
        """Free the segments waiting for reuse (a run ended: the pool may stay idle)."""
        spare, self.spare = self.spare, []
        for _, fd, _ in spare:
            _close_fd(fd)


class _Count:
    """Segments this process made for messages and has not closed yet (see Outgoing)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.n = 0

    def reset(self) -> None:
        """In a forked child: it made none of them, and the lock may be held."""
        self.lock = threading.Lock()
        self.n = 0

    def add(self, k: int) -> None:
        if k:
            with self.lock:
                self.n += k


_MADE = _Count()


def driver_budget() -> int:
    """Return how many segments the driver holds at most before large values it sends
    travel in the message: a quarter of its open-file limit (those it maps of results,
    and those it makes for messages, several senders at once)."""
    return segment_limit() * 4


def segment_limit() -> int:
    """Return how many segments a worker keeps in flight at most: a sixteenth of this
    process's open-file limit (``ulimit -n``, inherited from the driver; 64 of 1,024),
    so that the driver, which holds a descriptor for each, stays well below its own."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        soft = 1024
    if soft == resource.RLIM_INFINITY or soft <= 0:
        soft = 1 << 20
    return max(4, soft // 16)


class Registry:
    """The driver's mapped segments by address, to pass a view of one on without a copy.

    Values view a mapping through an exporter (a ctypes array over it) that dies with the
    last view; the entry, which holds the mapping, then goes first, and the mapping is
    unmapped after, so an address in the registry is always mapped (mmap would unmap
    before telling anyone, and a new mapping could take its address meanwhile).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.starts: list[int] = []
        self.entries: dict[int, tuple[int, int, mmap.mmap]] = {}  # start -> (end, fd, map)
        self.inodes: dict[int, int] = {}  # inode -> start
        self.pinned: set[int] = set()  # inodes a worker still maps after its task
        self.fds: set[int] = set()  # descriptors this registry opened and must close

    def add(
        self, mm: mmap.mmap, fd: int, ino: int, give_back: Callable[[bool], None] | None
    ) -> memoryview:
        """Keep ``fd`` (of inode ``ino``) open and ``mm`` mapped while a view of the
        returned one lives.

        ``give_back(reuse)`` is called when the last view goes: ``reuse`` is true unless a
        worker said it still maps the segment (:meth:`pin`).
        """
        exporter = (ctypes.c_char * len(mm)).from_buffer(mm)
        start = ctypes.addressof(exporter)  # the mapping's first byte
        with self.lock:
            bisect.insort(self.starts, start)
            self.entries[start] = (start + len(mm), fd, mm)
            self.inodes[ino] = start
            self.fds.add(fd)
        weakref.finalize(exporter, self.forget, start, fd, ino, give_back)
        return memoryview(exporter).cast("B")

    def pin(self, inodes: Sequence[int]) -> None:
        """Record that a worker keeps mapping these segments: they must not be rewritten."""
        with self.lock:
            self.pinned.update(i for i in inodes if i in self.inodes)

    def before_fork(self) -> None:
        """Before this process forks: the child inherits every mapping, and a value it
        reads through one (a global of the driver's) must never show a later item's
        data, so no segment mapped now is given back to be written again. The lock is
        held across the fork (a child must not inherit it held by another thread)."""
        self.lock.acquire()
        self.pinned.update(self.inodes)

    def after_fork_in_parent(self) -> None:
        self.lock.release()

    def after_fork_in_child(self) -> None:
        self.lock = threading.Lock()  # the inherited one is held, by the forking thread

    def forget(
        self, start: int, fd: int, ino: int, give_back: Callable[[bool], None] | None
    ) -> None:
        with self.lock:
            if fd not in self.fds:
                return  # cleared (a forked worker): that number is not ours any more
            self.fds.discard(fd)
            entry = self.entries.get(start)
            if entry is not None and entry[1] == fd:
                del self.entries[start]  # the mapping goes once its exporter has
                i = bisect.bisect_left(self.starts, start)
                if i < len(self.starts) and self.starts[i] == start:
                    del self.starts[i]
            if self.inodes.get(ino) == start:
                del self.inodes[ino]
            reuse = ino not in self.pinned
            self.pinned.discard(ino)
            _close_fd(fd)  # under the lock: the number is not reused before it is forgotten
        if give_back is not None:
            give_back(reuse)

    def clear(self) -> None:
        """Close the descriptors a forked worker inherited from its driver, and forget them."""
        with self.lock:
            for fd in self.fds:
                _close_fd(fd)
            self.starts, self.entries, self.inodes, self.pinned = [], {}, {}, set()
            self.fds = set()

    def find(self, data: memoryview) -> tuple[int, int] | None:
        """Return ``(fd, offset)`` of the segment ``data`` lies in, or None."""
        if not self.starts:
            return None
        try:
            start = address(data)
        except (BufferError, TypeError, ValueError):
            return None
        with self.lock:
            i = bisect.bisect_right(self.starts, start) - 1
            if i < 0:
                return None
            base = self.starts[i]
            end, fd, _ = self.entries[base]
            if start + data.nbytes > end:
                return None
            return fd, start - base

    def __len__(self) -> int:
        return len(self.entries)


#: this process's mapped segments: one for all its pools, as a value received by one pool
#: may go on to another (the address space is the process's, not a pool's or a run's)
REGISTRY = Registry()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=REGISTRY.before_fork,
        after_in_parent=REGISTRY.after_fork_in_parent,
        after_in_child=REGISTRY.after_fork_in_child,
    )
    os.register_at_fork(after_in_child=_MADE.reset)


class Outgoing:
    """The out-of-band buffers of one message: pickle's ``buffer_callback``.

    A buffer under the threshold stays in the message. A larger one is found in the
    driver's registry (sent on as it is) or written once into a new segment, which this
    object owns until :meth:`close` (after the message and its descriptors are sent).
    """

    def __init__(
        self, threshold: int, registry: Registry | None = None, arena: Arena | None = None
    ) -> None:
        self.threshold = threshold
        self.registry = registry
        self.arena = arena  # a worker's: its segments are given back to be reused
        #: the driver's segments at most (read once per message, not per buffer)
        self.budget = driver_budget() if arena is None else 0
        self.fds: list[int] = []  # to send beside the message, in order
        self.segments: list[int] = []  # arena ids of ``fds``
        self.owned: list[int] = []  # created here: closed by close()
        self.descs: list[Desc] = []
        self.nbytes = 0
        self._index: dict[int, int] = {}

    def __call__(self, buffer: pickle.PickleBuffer) -> bool:
        """Return True to keep ``buffer`` in the message, False when it goes out of band."""
        try:
            raw = buffer.raw()
        except BufferError:
            return True  # not contiguous: pickle refuses it either way
        n = raw.nbytes
        if n < self.threshold:
            return True
        found = self.registry.find(raw) if self.registry is not None else None
        seg = 0
        if found is not None:
            fd, offset = found
        elif len(self.fds) >= _FDS_PER_MESSAGE or self._full():
            return True  # descriptors are a bounded resource: this one goes in the message
        else:
            try:
                if self.arena is not None:
                    seg, fd = self.arena.take(raw)
                else:
                    fd = create_segment(raw)
                    self.owned.append(fd)
                    _MADE.add(1)
            except OSError as exc:
                if exc.errno in _NO_SEGMENT:
                    return True  # out of descriptors or shared memory: in the message
                raise
            offset = 0
        index = self._index.get(fd)
        if index is None:
            index = self._index[fd] = len(self.fds)
            self.fds.append(fd)
            self.segments.append(seg)
        self.descs.append((index, offset, n))
        self.nbytes += n
        return False

    def _full(self) -> bool:
        if self.arena is not None:
            return self.arena.full()
        # a mapping holds two descriptors: the registry's, and the one mmap keeps
        held = 2 * len(self.registry.fds) if self.registry is not None else 0
        return held + _MADE.n >= self.budget

    def close(self) -> None:
        """Close the segments made for this message (the receiver holds its own copy)."""
        owned, self.owned = self.owned, []
        for fd in owned:
            _close_fd(fd)
        _MADE.add(-len(owned))

    def reset(self) -> None:
        """Forget every buffer taken so far (pickling failed and starts again)."""
        self.close()
        if self.arena is not None:
            self.arena.release(self.segments, reuse=True)
        self.fds, self.descs, self.nbytes, self._index = [], [], 0, {}
        self.segments = []


#: a worker's mapped inputs of the task it runs, ``(mapping, inode)`` (see map_buffers),
#: and the inodes of those that were mapped when the worker forked: a child may read
#: them after the task, so they are reported pinned (never written again)
MAPPED: list[tuple[weakref.ref[mmap.mmap], int]] = []
FORKED: set[int] = set()


def _note_fork() -> None:
    FORKED.update(ino for ref, ino in MAPPED if ref() is not None)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_note_fork)


def map_buffers(
    fds: Sequence[int],
    descs: Sequence[Desc],
    registry: Registry | None,
    give_back: Sequence[Callable[[bool], None] | None] = (),
    mapped: list[tuple[weakref.ref[mmap.mmap], int]] | None = None,
) -> list[memoryview]:
    """Map received segments; return the out-of-band buffers of a message, in order.

    The driver (with a ``registry``) maps each segment shared and keeps its descriptor
    while the mapping lives, to pass it on; ``give_back[i]`` is called when the mapping of
    segment ``i`` goes (see :meth:`Registry.add`). A worker maps copy-on-write (its writes
    stay its own, so a task run again sees its input unchanged), closes the descriptor,
    and notes ``(mapping, inode)`` in ``mapped`` to tell afterwards whether it still maps
    it. The descriptors are always consumed, mapped or closed.
    """
    views: list[memoryview] = []
    try:
        for i, fd in enumerate(fds):
            st = os.fstat(fd)
            if registry is not None:
                mm = mmap.mmap(fd, st.st_size, access=mmap.ACCESS_WRITE)
                back = give_back[i] if i < len(give_back) else None
                views.append(registry.add(mm, fd, st.st_ino, back))
            else:
                mm = mmap.mmap(fd, st.st_size, access=mmap.ACCESS_COPY)
                if mapped is not None:
                    mapped.append((weakref.ref(mm), st.st_ino))
                _close_fd(fd)
                views.append(memoryview(mm))
    except BaseException:
        close_fds(fds[len(views) :])
        raise
    return [views[i][offset : offset + n] for i, offset, n in descs]
