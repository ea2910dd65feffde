"""The BlobStore protocol: immutable byte strings named by their sha256.

Layout (every backend, under its root or bucket prefix):

    blobs/sha256/<first 2 hex>/<64 hex>     the blob's bytes, written once
    uploads/<random uuid hex>               staging while a put hashes (local backend only;
                                            S3 stages in a multipart upload instead)

Keys come from the digest alone: no user string ever becomes a path or key.
A put is atomic: readers see the whole blob or nothing, and a blob is published only after
its bytes hashed to the expected digest and size. Writing an existing key again is harmless,
because the key is the content address.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from loreg.registry.errors import (
    DigestInvalidError,
    DigestMismatchError,
    RequestInvalidError,
    SizeMismatchError,
    StorageUnavailableError,
)

DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
BLOB_KEY_RE = re.compile(r"blobs/sha256/([0-9a-f]{2})/([0-9a-f]{64})")
CHUNK_SIZE = 1024 * 1024


def check_digest(digest: str) -> str:
    """Return ``digest`` if it is ``sha256:<64 lowercase hex>``, else raise DigestInvalidError."""
    if not isinstance(digest, str) or DIGEST_RE.fullmatch(digest) is None:
        raise DigestInvalidError("digest must be sha256:<64 lowercase hex>", detail={"digest": str(digest)[:80]})
    return digest


def blob_key(digest: str) -> str:
    hexdigest = check_digest(digest)[len("sha256:"):]
    return f"blobs/sha256/{hexdigest[:2]}/{hexdigest}"


def digest_from_key(key: str) -> str | None:
    """The digest a ``blobs/sha256/ab/<hex>`` key names, or None for any other key."""
    match = BLOB_KEY_RE.fullmatch(key)
    if match is None or match.group(2)[:2] != match.group(1):
        return None
    return f"sha256:{match.group(2)}"


def check_range(start: int, end: int | None) -> None:
    """Refuse a byte range that no blob could satisfy (``end`` past the blob is clamped, not refused)."""
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise RequestInvalidError("range start must be an integer >= 0", detail={"start": repr(start)[:40]})
    if end is not None and (isinstance(end, bool) or not isinstance(end, int) or end < start):
        raise RequestInvalidError(
            "range end must be an integer >= start", detail={"start": start, "end": repr(end)[:40]}
        )


class HashingReader:
    """Reads a put's stream, hashing (sha256) and counting as it goes.

    With a declared ``size`` it never asks the stream for more than one byte past it, and raises
    SizeMismatchError as soon as that byte arrives: an oversized body is not read to its end.
    Exceptions raised by the stream itself pass through unchanged.

    The stream's own pieces are passed on when it offers ``read1`` (io's "whatever one read gives"):
    ``read1`` and ``readinto`` then hash and hand over the bytes without another copy.
    """

    def __init__(self, stream: BinaryIO, size: int | None = None):
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise RequestInvalidError("size must be an integer >= 0", detail={"size": repr(size)[:40]})
        self._take_from = getattr(stream, "read1", stream.read)
        self.size = size
        self.count = 0
        self.eof = False
        self._hash = hashlib.sha256()

    def read1(self, n: int = CHUNK_SIZE) -> bytes:
        """At most ``n`` bytes from one read of the stream (b"" only at the end: then ``eof`` is set)."""
        if self.eof:
            return b""
        want = n if self.size is None else min(n, self.size - self.count + 1)
        chunk = self._take_from(want)
        if not chunk:
            self.eof = True
            return b""
        self.count += len(chunk)
        if self.size is not None and self.count > self.size:
            raise SizeMismatchError(
                f"the body is longer than the declared {self.size} bytes",
                detail={"expected": self.size, "received_at_least": self.count},
            )
        self._hash.update(chunk)
        return chunk

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes; fewer only at the end of the stream (then ``eof`` is set)."""
        pieces: list[bytes] = []
        got = 0
        while got < n and (chunk := self.read1(min(n - got, CHUNK_SIZE))):
            pieces.append(chunk)
            got += len(chunk)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def readinto(self, buffer: bytearray | memoryview) -> int:
        """Fill ``buffer``; fewer bytes only at the end of the stream (then ``eof`` is set)."""
        view = memoryview(buffer).cast("B")
        got = 0
        while got < len(view) and (chunk := self.read1(min(len(view) - got, CHUNK_SIZE))):
            view[got:got + len(chunk)] = chunk
            got += len(chunk)
        return got

    def drain(self) -> None:
        """Read (and hash) the rest of the stream, keeping nothing."""
        while self.read1(CHUNK_SIZE):
            pass

    @property
    def digest(self) -> str:
        return f"sha256:{self._hash.hexdigest()}"

    def verify(self, expected_digest: str) -> None:
        """After the end of the stream: raise unless the bytes had the declared size and digest.

        Raises:
            SizeMismatchError, DigestMismatchError
        """
        if not self.eof:
            raise RuntimeError("verify() before the end of the stream")
        if self.size is not None and self.count != self.size:
            raise SizeMismatchError(
                f"the body has {self.count} bytes, not the declared {self.size}",
                detail={"expected": self.size, "received": self.count},
            )
        if self.digest != expected_digest:
            raise DigestMismatchError(
                "the bytes do not hash to the expected digest",
                detail={"expected": expected_digest, "actual": self.digest, "size": self.count},
            )


class RangeStream(io.RawIOBase):
    """A read-only stream of exactly ``length`` bytes pulled from ``read``; ``close`` runs once.

    A source that ends before ``length`` bytes raises StorageUnavailableError: a short blob
    is never passed off as a whole one. ``readinto``, when the source has one, fills a caller's
    buffer with no bytes object between (the pull path reads a whole blob through one buffer).
    """

    def __init__(
        self,
        read: Callable[[int], bytes],
        length: int,
        close: Callable[[], None] | None = None,
        readinto: Callable[[memoryview], int] | None = None,
    ):
        super().__init__()
        self._read = read
        self._readinto = readinto
        self._remaining = length
        self._close = close
        self.length = length

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        if self.closed:
            raise ValueError("I/O operation on closed stream")
        if size is None or size < 0:
            return self.readall()
        want = min(size, self._remaining)
        if want <= 0:
            return b""
        data = self._read(want)
        if not data:
            raise self._short()
        data = bytes(data[:want])
        self._remaining -= len(data)
        return data

    def _short(self) -> StorageUnavailableError:
        return StorageUnavailableError(
            "the stored blob ended before its expected length",
            detail={"expected": self.length, "missing": self._remaining},
        )

    def readall(self) -> bytes:
        pieces = []
        while self._remaining > 0:
            pieces.append(self.read(CHUNK_SIZE))
        return b"".join(pieces)

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def, override]
        if self._readinto is None:
            data = self.read(len(buffer))
            buffer[: len(data)] = data
            return len(data)
        if self.closed:
            raise ValueError("I/O operation on closed stream")
        want = min(len(buffer), self._remaining)
        if want <= 0:
            return 0
        n = self._readinto(memoryview(buffer).cast("B")[:want])
        if not n:
            raise self._short()
        self._remaining -= n
        return n

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self._close is not None:
                self._close()
        finally:
            super().close()


@dataclass(frozen=True)
class BlobStat:
    digest: str
    size: int
    modified: datetime | None = None


@runtime_checkable
class BlobStore(Protocol):
    """Content-addressed blob storage. Every method may raise the storage errors of
    ``loreg.registry.errors`` (StorageUnavailableError, StorageTimeoutError,
    InsufficientStorageError); backend exceptions never escape."""

    def put(self, stream: BinaryIO, expected_digest: str, size: int | None = None) -> BlobStat:
        """Store the bytes read from ``stream`` (until EOF) as blob ``expected_digest``.

        Hashes while writing and publishes only if the sha256 and (when given) the size match.

        Raises:
            DigestMismatchError / SizeMismatchError: nothing is kept.
        """
        ...

    def put_file(self, path: Path, digest: str, size: int) -> BlobStat:
        """Store the file at ``path`` as blob ``digest``; the store may move the file (it is consumed).

        For files whose digest the caller computed while writing them (the merge engine's outputs):
        the size is checked, the bytes are not hashed again. A blob already stored is left as it is.

        Raises:
            SizeMismatchError: nothing is kept.
        """
        ...

    def open(self, digest: str, start: int = 0, end: int | None = None) -> BinaryIO:
        """A readable stream of bytes ``[start, end)`` of the blob (``end=None``: to the end).

        Like a slice, a range past the end is clamped (``start`` at or past the end: no bytes).

        Raises:
            BlobNotFoundError
            RequestInvalidError: a negative ``start`` or an ``end`` before it.
        """
        ...

    def read_range(self, digest: str, start: int, end: int) -> bytes:
        """Bytes ``[start, end)`` of the blob, read with one ranged request."""
        ...

    def exists(self, digest: str) -> bool: ...

    def stat(self, digest: str) -> BlobStat:
        """Size (and modification time where known). Raises BlobNotFoundError."""
        ...

    def delete(self, digest: str) -> None:
        """Remove the blob; a missing blob is not an error."""
        ...

    def iter_digests(self) -> Iterator[BlobStat]:
        """Every stored blob (for garbage collection and fsck)."""
        ...

    def local_path(self, digest: str) -> Path | None:
        """A filesystem path to the blob's bytes when the backend has one (lets the merge engine mmap)."""
        ...

    def presign_get(self, digest: str, expires_s: int = 3600) -> str | None:
        """A URL that downloads the blob without going through the API, if the backend can make one."""
        ...
