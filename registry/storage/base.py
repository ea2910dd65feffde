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

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable

from loreg.registry.errors import DigestInvalidError

DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
CHUNK_SIZE = 1024 * 1024


def check_digest(digest: str) -> str:
    """Return ``digest`` if it is ``sha256:<64 lowercase hex>``, else raise DigestInvalidError."""
    if not isinstance(digest, str) or DIGEST_RE.fullmatch(digest) is None:
        raise DigestInvalidError("digest must be sha256:<64 lowercase hex>", detail={"digest": str(digest)[:80]})
    return digest


def blob_key(digest: str) -> str:
    hexdigest = check_digest(digest)[len("sha256:"):]
    return f"blobs/sha256/{hexdigest[:2]}/{hexdigest}"


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

    def open(self, digest: str, start: int = 0, end: int | None = None) -> BinaryIO:
        """A readable stream of bytes ``[start, end)`` of the blob (``end=None``: to the end).

        Raises:
            BlobNotFoundError
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
