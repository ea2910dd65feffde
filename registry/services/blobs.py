"""Blob uploads and presence checks: streamed, hashed while written, refused early when hostile."""

from __future__ import annotations

import io
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import BinaryIO

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from loreg.registry.db.models import Blob, BlobScan
from loreg.registry.errors import ConflictError, TooLargeError, UnsupportedFormatError
from loreg.registry.faults import crash_point
from loreg.registry.formats import safetensors
from loreg.registry.services.context import Registry
from loreg.registry.storage.base import check_digest

class GuardedStream(io.RawIOBase):
    """Wraps an upload stream: refuses pickle/zip bytes (unless they open a safetensors header) and
    enforces a size cap. Deciding may hold back up to 8 bytes + the header size limit."""

    def __init__(self, raw: BinaryIO, *, limit: int, max_header_size: int = safetensors.MAX_HEADER_SIZE_DEFAULT):
        self._raw = raw
        self._limit = limit
        self._max_header = max_header_size
        self._count = 0
        self._head = bytearray()
        self._checked = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        if not self._checked:
            while (need := safetensors.sniff_length(self._head, max_header_size=self._max_header)) > len(self._head):
                more = self._raw.read(need - len(self._head))
                if not more:
                    break
                self._head += more
            self._checked = True
            refused = safetensors.refused_format(self._head, max_header_size=self._max_header)
            if refused:
                raise UnsupportedFormatError(
                    f"upload refused: the bytes are {refused}; loreg never stores pickle",
                    detail={"format": refused},
                    hint="save weights as safetensors (safe_serialization=True)",
                )
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            del self._head[:n]
        else:
            data = self._raw.read(len(buffer))
            n = len(data)
            buffer[:n] = data
        self._count += n
        if self._count > self._limit:
            raise TooLargeError(f"upload is larger than the limit of {self._limit} bytes", detail={"limit": self._limit})
        return n


class ScanningStream(io.RawIOBase):
    """Passes an upload through while a StreamScanner looks at every byte (one pass, no re-read)."""

    def __init__(self, raw: io.RawIOBase, scanner: safetensors.StreamScanner):
        self._raw = raw
        self.scanner = scanner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[no-untyped-def]
        n = self._raw.readinto(buffer)
        if n:
            self.scanner.feed(memoryview(buffer)[:n])
        return n or 0


class BlobService:
    """Content-addressed uploads shared by every adapter version, base model and export."""

    def __init__(self, registry: Registry):
        self.registry = registry

    def missing(self, digests: Iterable[str]) -> list[str]:
        """Digests the store lacks, in the order given. Present ones are touched (GC grace restarts).

        Raises:
            DigestInvalidError
        """
        wanted = list(dict.fromkeys(check_digest(d) for d in digests))
        with self.registry.sessions.begin() as session:
            known = set(session.scalars(select(Blob.digest).where(Blob.digest.in_(wanted))))
            present = [d for d in wanted if d in known and self.registry.store.exists(d)]
            if present:
                session.execute(update(Blob).where(Blob.digest.in_(present)).values(last_seen_at=datetime.now(UTC)))
        present_set = set(present)
        return [d for d in wanted if d not in present_set]

    def exists(self, digest: str) -> bool:
        with self.registry.sessions.begin() as session:
            row = session.get(Blob, check_digest(digest))
        return row is not None and self.registry.store.exists(digest)

    def upload(self, digest: str, stream: BinaryIO, size: int | None) -> tuple[int, bool]:
        """Store the stream as blob ``digest``. Returns (size, created).

        Raises:
            DigestInvalidError, DigestMismatchError, SizeMismatchError, TooLargeError,
            UnsupportedFormatError, storage errors.
        """
        check_digest(digest)
        limit = self.registry.settings.max_file_size
        if size is not None and size > limit:
            raise TooLargeError(f"upload of {size} bytes is over the limit of {limit}", detail={"limit": limit})
        if self.exists(digest):
            stat = self.registry.store.stat(digest)
            self._record(digest, stat.size)
            return stat.size, False
        scanner = safetensors.StreamScanner(max_header_size=self.registry.settings.max_header_size)
        guarded = GuardedStream(stream, limit=limit, max_header_size=self.registry.settings.max_header_size)
        tapped = io.BufferedReader(ScanningStream(guarded, scanner), buffer_size=1 << 20)
        stat = self.registry.store.put(tapped, digest, size)  # type: ignore[arg-type]
        crash_point("after_blob_put")  # testing hook (registry/faults.py)
        self._record(digest, stat.size, scanner.finish())
        return stat.size, True

    def _record(self, digest: str, size: int, scan: safetensors.StreamScan | None = None) -> None:
        now = datetime.now(UTC)
        for _attempt in range(3):
            try:
                with self.registry.sessions.begin() as session:
                    touched = session.execute(
                        update(Blob).where(Blob.digest == digest).values(last_seen_at=now)
                    ).rowcount
                    if not touched:
                        session.add(Blob(digest=digest, size=size, created_at=now, last_seen_at=now))
                        session.flush()
                    if scan is not None and session.get(BlobScan, digest) is None:
                        session.add(
                            BlobScan(
                                digest=digest, header_size=scan.header_size, nonfinite=scan.nonfinite, zero=scan.zero
                            )
                        )
                        session.flush()
                    # GC deletes an object only while its transaction holds the row (see
                    # MaintenanceService): now that this one holds it, the object stays or is gone
                    if not self.registry.store.exists(digest):
                        raise ConflictError(
                            "garbage collection removed this blob while it was being uploaded; upload it again",
                            detail={"digest": digest},
                        )
                return
            except IntegrityError:
                continue  # a concurrent upload of the same bytes recorded it first: touch it instead
