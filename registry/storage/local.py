"""Blobs in a local folder (the embedded default).

Layout under ``root`` (see base.py):

    blobs/sha256/<first 2 hex>/<64 hex>     published blobs, each written once by os.replace
    uploads/<uuid4 hex>                     a put in progress; the name never comes from the caller

A put streams into uploads/, hashing as it writes, fsyncs the file, renames it into blobs/ only
if the digest and size match, and fsyncs the folder so the rename survives a crash. A crash mid-put
leaves at most a file in uploads/, which ``cleanup_staging`` removes once it is older than the
grace period.
"""

from __future__ import annotations

import errno
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO, cast

from loreg.registry.errors import (
    BlobNotFoundError,
    InsufficientStorageError,
    SizeMismatchError,
    StorageUnavailableError,
)
from loreg.registry.storage.protocol import (
    CHUNK_SIZE,
    BlobStat,
    HashingReader,
    RangeStream,
    blob_key,
    check_digest,
    check_range,
    digest_from_key,
)

log = logging.getLogger(__name__)

_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _translate(exc: OSError, action: str) -> Exception:
    detail = {"errno": errno.errorcode.get(exc.errno or 0, str(exc.errno)), "action": action}
    if exc.errno in _FULL:
        return InsufficientStorageError("the blob folder is out of space", detail=detail)
    return StorageUnavailableError(f"the blob folder failed to {action}: {exc.strerror or exc}", detail=detail)


@contextmanager
def _filesystem(action: str) -> Iterator[None]:
    """Turn an OSError of the filesystem into the storage error it means."""
    try:
        yield
    except OSError as exc:
        raise _translate(exc, action) from exc


class LocalBlobStore:
    """BlobStore on a local folder: atomic puts by rename, ranged reads, an mmap-able path."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self._blobs = self.root / "blobs" / "sha256"
        self._uploads = self.root / "uploads"

    def __repr__(self) -> str:
        return f"LocalBlobStore({str(self.root)!r})"

    def _path(self, digest: str) -> Path:
        return self.root / blob_key(digest)

    def put(self, stream: BinaryIO, expected_digest: str, size: int | None = None) -> BlobStat:
        """Store the stream as blob ``expected_digest``; see BlobStore.put.

        Exceptions raised by ``stream`` pass through unchanged (after the staging file is removed).

        Raises:
            DigestInvalidError, DigestMismatchError, SizeMismatchError, InsufficientStorageError,
            StorageUnavailableError
        """
        final = self._path(expected_digest)
        reader = HashingReader(stream, size)
        with _filesystem("create the staging folder"):
            self._uploads.mkdir(parents=True, exist_ok=True)
        staging = self._uploads / uuid.uuid4().hex
        with _filesystem("create a staging file"):
            fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        published = False
        try:
            try:
                while True:
                    chunk = reader.read1(CHUNK_SIZE)
                    if not chunk:
                        break
                    with _filesystem("write"):
                        _write_all(fd, chunk)
                reader.verify(expected_digest)
                with _filesystem("flush to disk"):
                    os.fsync(fd)
            finally:
                os.close(fd)
            with _filesystem("publish the blob"):
                st = self._publish(staging, final)
                published = True
        finally:
            if not published:
                try:
                    staging.unlink(missing_ok=True)
                except OSError:
                    log.warning("could not remove staging file %s", staging, exc_info=True)
        return BlobStat(expected_digest, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    @staticmethod
    def _publish(src: Path, final: Path) -> os.stat_result:
        """Rename an fsynced file into its blob path and fsync the folder(s), so the rename survives a crash."""
        created_parent = not final.parent.is_dir()
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, final)
        _fsync_dir(final.parent)
        if created_parent:
            _fsync_dir(final.parent.parent)
        return final.stat()

    def put_file(self, path: Path, digest: str, size: int) -> BlobStat:
        """Move the file at ``path`` into place as blob ``digest`` (fsync + rename: no copy, no second hash).

        A file on another file system is copied by ``put`` instead (which hashes it).

        Raises:
            DigestInvalidError, SizeMismatchError, InsufficientStorageError, StorageUnavailableError
        """
        final = self._path(digest)
        with _filesystem("open a file to store"):
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                found = os.fstat(fd).st_size
                if found != size:
                    raise SizeMismatchError(
                        f"the file has {found} bytes, not the declared {size}", detail={"expected": size, "received": found}
                    )
                os.fsync(fd)
            finally:
                os.close(fd)
        if final.is_file():
            return self.stat(digest)
        try:
            st = self._publish(Path(path), final)
        except OSError:
            log.debug("could not rename %s into the blob folder; copying it", path, exc_info=True)
            with _filesystem("open a file to store"), open(path, "rb") as stream:
                return self.put(stream, digest, size)
        return BlobStat(digest, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    def open(self, digest: str, start: int = 0, end: int | None = None) -> BinaryIO:
        """Bytes ``[start, end)`` of the blob, ``end`` clamped to its size.

        Raises:
            DigestInvalidError, RequestInvalidError (a negative or reversed range),
            BlobNotFoundError, StorageUnavailableError
        """
        path = self._path(digest)
        check_range(start, end)
        try:
            file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by the RangeStream
        except FileNotFoundError:
            raise BlobNotFoundError("no such blob", detail={"digest": digest}) from None
        except OSError as exc:
            raise _translate(exc, "open a blob") from exc
        try:
            with _filesystem("read a blob"):
                blob_size = os.fstat(file.fileno()).st_size
                stop = blob_size if end is None else min(end, blob_size)
                first = min(start, blob_size)
                file.seek(first)
        except BaseException:
            file.close()
            raise

        def read(n: int) -> bytes:
            with _filesystem("read a blob"):
                return file.read(n) or b""

        def readinto(buffer: memoryview) -> int:
            with _filesystem("read a blob"):
                return file.readinto(buffer) or 0

        return cast(BinaryIO, RangeStream(read, stop - first, file.close, readinto))

    def read_range(self, digest: str, start: int, end: int) -> bytes:
        with self.open(digest, start, end) as stream:
            return stream.read()

    def exists(self, digest: str) -> bool:
        path = self._path(digest)
        with _filesystem("check a blob"):
            return path.is_file()

    def stat(self, digest: str) -> BlobStat:
        path = self._path(digest)
        try:
            st = path.stat()
        except FileNotFoundError:
            raise BlobNotFoundError("no such blob", detail={"digest": digest}) from None
        except OSError as exc:
            raise _translate(exc, "stat a blob") from exc
        return BlobStat(digest, st.st_size, datetime.fromtimestamp(st.st_mtime, UTC))

    def delete(self, digest: str) -> None:
        path = self._path(digest)
        with _filesystem("delete a blob"):
            path.unlink(missing_ok=True)

    def iter_digests(self) -> Iterator[BlobStat]:
        """Every published blob, in digest order; stray files under blobs/ are skipped."""
        for fan in self._list(self._blobs, directories=True):
            for name in self._list(self._blobs / fan, directories=False):
                digest = digest_from_key(f"blobs/sha256/{fan}/{name}")
                if digest is None:
                    continue
                try:
                    yield self.stat(digest)
                except BlobNotFoundError:
                    continue  # deleted while we listed

    @staticmethod
    def _list(folder: Path, *, directories: bool) -> list[str]:
        try:
            with os.scandir(folder) as entries:
                return sorted(
                    entry.name
                    for entry in entries
                    if (entry.is_dir if directories else entry.is_file)(follow_symlinks=False)
                )
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise _translate(exc, "list blobs") from exc

    def local_path(self, digest: str) -> Path:
        """The blob's file (for mmap).

        Raises:
            BlobNotFoundError
        """
        path = self._path(digest)
        if not path.is_file():
            raise BlobNotFoundError("no such blob", detail={"digest": digest})
        return path

    def presign_get(self, digest: str, expires_s: int = 3600) -> str | None:
        check_digest(digest)
        return None

    def cleanup_staging(self, older_than: datetime) -> int:
        """Remove staging files last written before ``older_than`` (left by a crashed put).

        A put in progress rewrites its file's mtime with every chunk, so only a put stalled for
        longer than the grace period loses its file (and then fails).

        Returns:
            how many files were removed.
        """
        if older_than.tzinfo is None:
            raise ValueError("older_than must be timezone-aware")
        cutoff = older_than.timestamp()
        removed = 0
        try:
            with os.scandir(self._uploads) as listing:
                entries = list(listing)
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise _translate(exc, "list staging files") from exc
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    os.unlink(entry.path)
                    removed += 1
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise _translate(exc, "remove a staging file") from exc
        return removed
