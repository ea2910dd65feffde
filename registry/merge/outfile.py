"""The merge writer's output files: hashed while written, through O_DIRECT where the file system takes it."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

STAGE_SIZE = 8 << 20  # the writer's staging buffers: output bytes go to the file in writes of this size
STAGE_BUFFERS = 3  # one filling, the others being hashed and written
DIRECT_ALIGN = 4096  # O_DIRECT: buffer address, file offset and length multiples of this (any block size up to 4 KiB)
O_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux, FreeBSD; 0 (always the page cache) elsewhere


class Staging:
    """Page-aligned staging buffers, an I/O thread and a hashing thread: while one buffer fills, the one
    before it is hashed and written at the same time (both only read it; each thread keeps file order)."""

    def __init__(self, torch: Any):
        self.buffers = [mmap.mmap(-1, STAGE_SIZE) for _ in range(STAGE_BUFFERS)]
        self.tensors = [torch.frombuffer(b, dtype=torch.uint8) for b in self.buffers]  # copies release the GIL
        self.io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loreg-merge-io")
        self.hashing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loreg-merge-hash")

    def close(self) -> None:
        self.io.shutdown(wait=True)
        self.hashing.shutdown(wait=True)
        self.tensors.clear()  # the tensors view the buffers: they must go first
        for b in self.buffers:
            # after a failed write, the traceback's frames may still hold a view: the buffer goes with them
            with contextlib.suppress(BufferError):
                b.close()


class OutFile:
    """One output file, hashed and written in STAGE_SIZE pieces from page-aligned staging buffers.

    With O_DIRECT (where the file system accepts it) the pieces go from the staging buffers to the device, not
    through the page cache: the merged model is written once and read back later if at all, so caching it
    only evicts pages worth keeping (the base's), and on VMs whose host backs guest memory lazily each fresh
    cache page costs a host fault (2 GB of buffered writes measured ~3.5 s of system time there, O_DIRECT
    ~0.7 s). The last piece is padded to DIRECT_ALIGN and the file truncated to its size. A file system that
    refuses O_DIRECT at open, or a write with EINVAL, gets plain buffered writes instead. While the calling
    thread fills one buffer, the staging threads hash and write the pieces before it (sha256 of the output is
    the largest CPU cost of a merge: off the calling thread, it overlaps the copying and the arithmetic).
    """

    def __init__(self, path: Path, staging: Staging):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        self.direct = False
        self.fd = -1
        if O_DIRECT:
            with contextlib.suppress(OSError):
                self.fd = os.open(path, flags | O_DIRECT, 0o644)
                self.direct = True
        if self.fd < 0:
            self.fd = os.open(path, flags, 0o644)
        self.staging = staging
        self.current = 0  # the staging buffer being filled
        self.pending: list[list[Future[None]]] = [[] for _ in staging.buffers]  # each buffer's hash and write
        self.fill = 0  # bytes in the current buffer
        self.offset = 0  # file offset of the current buffer's first byte
        self.hasher = hashlib.sha256()

    def write(self, data: Any) -> None:
        """Append ``data``, a uint8 tensor."""
        flat = data.reshape(-1)
        start, total = 0, flat.numel()
        while start < total:
            n = min(total - start, STAGE_SIZE - self.fill)
            self.staging.tensors[self.current][self.fill:self.fill + n].copy_(flat[start:start + n])
            self.fill += n
            start += n
            if self.fill == STAGE_SIZE:
                self._flush()

    def _flush(self) -> None:
        """Hand the current buffer to the hashing and I/O threads; go on with the next once it is free."""
        i = self.current
        view = memoryview(self.staging.buffers[i])[:self.fill]
        self.pending[i] = [self.staging.hashing.submit(self.hasher.update, view),
                           self.staging.io.submit(self._pwrite, i, self.fill, self.offset)]
        del view
        self.offset += self.fill
        self.fill = 0
        self.current = (i + 1) % len(self.staging.buffers)
        self._wait(self.current)

    def _wait(self, i: int) -> None:
        pending, self.pending[i] = self.pending[i], []
        for future in pending:
            future.result()

    def _pwrite(self, i: int, length: int, position: int) -> None:
        view = memoryview(self.staging.buffers[i])[:length]
        while len(view):
            try:
                n = os.pwrite(self.fd, view, position)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self.direct:
                    raise
                # accepted at open, refused on write (alignment, some FUSE/network file systems)
                fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~O_DIRECT)
                self.direct = False
                continue
            if n <= 0:
                raise OSError("write returned 0")
            view, position = view[n:], position + n

    def close(self) -> str:
        """Write what is staged, set the exact size, close; returns "sha256:<hex>" of the file's bytes."""
        try:
            for i in range(len(self.pending)):
                self._wait(i)
            if self.fill:  # the last piece, written here: zero-padded for O_DIRECT, truncated after
                i, length = self.current, self.fill
                self.hasher.update(memoryview(self.staging.buffers[i])[:length])
                if self.direct and length % DIRECT_ALIGN:
                    padded = length + DIRECT_ALIGN - length % DIRECT_ALIGN
                    self.staging.buffers[i][length:padded] = bytes(padded - length)
                    length = padded
                self._pwrite(i, length, self.offset)
                self.offset += self.fill
                self.fill = 0
            os.ftruncate(self.fd, self.offset)  # drops the padding (also if that write fell back to buffered)
        finally:
            self.abandon()
        return "sha256:" + self.hasher.hexdigest()

    def abandon(self) -> None:
        """Close without finishing (after an error): writes in flight end first, their errors dropped."""
        for i in range(len(self.pending)):
            with contextlib.suppress(Exception):
                self._wait(i)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
