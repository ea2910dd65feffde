"""Blob uploads and presence checks: streamed, hashed while written, refused early when hostile."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import BinaryIO

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from loreg.registry.db.models import AdapterBlob, Blob, BlobScan
from loreg.registry.db.retry import in_transaction
from loreg.registry.errors import BlobNotFoundError, ConflictError, TooLargeError, UnsupportedFormatError
from loreg.registry.faults import crash_point
from loreg.registry.formats import safetensors, values
from loreg.registry.services.context import AppContext
from loreg.registry.storage.protocol import CHUNK_SIZE, BlobStore, HashingReader, check_digest


class CheckedStream:
    """An upload as storage reads it, behind the checks every upload passes: pickle and zip bytes are
    refused (unless they open a safetensors header), the size is capped, and a StreamScanner sees
    every byte. One pass, nothing copied: ``read1`` hands on the source's own pieces.
    Deciding the format may hold back up to 8 bytes + the header size limit."""

    def __init__(self, raw: BinaryIO, scanner: values.StreamScanner, *, limit: int, max_header_size: int):
        self._read1 = getattr(raw, "read1", raw.read)
        self._raw = raw
        self.scanner = scanner
        self._limit = limit
        self._max_header = max_header_size
        self._count = 0
        self._head = b""
        self._checked = False

    def readable(self) -> bool:
        return True

    def read1(self, n: int = CHUNK_SIZE) -> bytes:
        if not self._checked:
            self._sniff()
        if n < 0:
            n = CHUNK_SIZE
        if self._head:
            data, self._head = self._head[:n], self._head[n:]
        else:
            data = self._read1(n)
        if data:
            self._count += len(data)
            if self._count > self._limit:
                raise TooLargeError(f"upload is larger than the limit of {self._limit} bytes", detail={"limit": self._limit})
            self.scanner.feed(data)
        return data

    def read(self, n: int = -1) -> bytes:
        pieces: list[bytes] = []
        got = 0
        while (n < 0 or got < n) and (data := self.read1(CHUNK_SIZE if n < 0 else n - got)):
            pieces.append(data)
            got += len(data)
        return b"".join(pieces)

    def _sniff(self) -> None:
        head = bytearray()
        while (need := safetensors.sniff_length(head, max_header_size=self._max_header)) > len(head):
            more = self._raw.read(need - len(head))
            if not more:
                break
            head += more
        self._checked = True
        refused = safetensors.refused_format(head, max_header_size=self._max_header)
        if refused:
            raise UnsupportedFormatError(
                f"upload refused: the bytes are {refused}; loreg never stores pickle",
                detail={"format": refused},
                hint="save weights as safetensors (safe_serialization=True)",
            )
        self._head = bytes(head)


class BlobService:
    """Content-addressed uploads. Storage keeps one copy of any bytes; an adapter may use a blob only
    once it is linked to it (``adapter_blobs``): by an upload for it whose bytes were read and
    verified here, or by a mount from another adapter the caller can read. Base weights have no
    adapter: their uploads are verified the same way and the base record's file list is their link.
    """

    def __init__(self, registry: AppContext):
        self.registry = registry

    def missing(self, digests: Iterable[str], *, link: tuple[str, str] | None = None) -> list[str]:
        """Digests not available to ``link`` (an adapter ``(namespace, name)``: not linked to it),
        or, without ``link``, not stored at all; in the order given. Available ones are touched
        (GC grace restarts). An adapter's answer says nothing about other adapters' blobs.

        Raises:
            DigestInvalidError
        """
        wanted = list(dict.fromkeys(check_digest(d) for d in digests))
        with self.registry.sessions.begin() as session:
            if link is None:
                query = select(Blob.digest).where(Blob.digest.in_(wanted))
            else:
                query = select(AdapterBlob.digest).where(
                    AdapterBlob.namespace == link[0], AdapterBlob.name == link[1], AdapterBlob.digest.in_(wanted)
                )
            known = set(session.scalars(query))
            present = [d for d in wanted if d in known and self.registry.store.exists(d)]
            if present:
                session.execute(update(Blob).where(Blob.digest.in_(present)).values(last_seen_at=datetime.now(UTC)))
        present_set = set(present)
        return [d for d in wanted if d not in present_set]

    def linked(self, namespace: str, name: str, digest: str) -> bool:
        """Whether ``digest`` is linked to the adapter and its object is stored."""
        with self.registry.sessions.begin() as session:
            row = session.get(AdapterBlob, (namespace, name, check_digest(digest)))
        return row is not None and self.registry.store.exists(digest)

    def _stored(self, digest: str) -> bool:
        with self.registry.sessions.begin() as session:
            row = session.get(Blob, check_digest(digest))
        return row is not None and self.registry.store.exists(digest)

    def upload(
        self, digest: str, stream: BinaryIO, size: int | None, *, link: tuple[str, str] | None = None
    ) -> tuple[int, bool]:
        """Read the whole stream, verify it hashes to ``digest``, store it unless the store holds
        those bytes already, and link it to ``link`` (an adapter). Returns (size, created).

        Raises:
            DigestInvalidError, DigestMismatchError, SizeMismatchError, TooLargeError,
            UnsupportedFormatError, storage errors.
        """
        check_digest(digest)
        limit = self.registry.settings.max_file_size
        if size is not None and size > limit:
            raise TooLargeError(f"upload of {size} bytes is over the limit of {limit}", detail={"limit": limit})
        tapped, scanner = self.checked_stream(stream)
        if self._stored(digest):
            # knowing a digest proves nothing: the bytes are read and checked, and storage keeps
            # the one copy it has
            reader = HashingReader(tapped, size)  # type: ignore[arg-type]
            reader.drain()
            reader.verify(digest)
            self.record(digest, reader.count, scanner.finish(), link=link)
            return reader.count, False
        stat = self.registry.store.put(tapped, digest, size)  # type: ignore[arg-type]
        crash_point("after_blob_put")  # testing hook (registry/faults.py)
        self.record(digest, stat.size, scanner.finish(), link=link)
        return stat.size, True

    def checked_stream(self, stream: BinaryIO) -> tuple[BinaryIO, values.StreamScanner]:
        """``stream`` behind the checks every upload passes (format sniff, size cap, value scan).
        Read it to the end, then ``scanner.finish()``."""
        settings = self.registry.settings
        scanner = values.StreamScanner(max_header_size=settings.max_header_size)
        checked = CheckedStream(stream, scanner, limit=settings.max_file_size, max_header_size=settings.max_header_size)
        return checked, scanner  # type: ignore[return-value]

    def mount(self, namespace: str, name: str, digest: str, source: tuple[str, str]) -> int:
        """Link a blob of adapter ``source`` to ``namespace/name`` without sending its bytes (OCI's
        cross-repository mount). The caller has checked that the token can read ``source``.
        Returns the blob's size.

        Raises:
            DigestInvalidError, BlobNotFoundError (``source`` holds no such blob)
        """
        if not self.linked(source[0], source[1], digest):
            raise BlobNotFoundError(
                f"{source[0]}/{source[1]} holds no blob {digest}",
                detail={"digest": digest, "from": f"{source[0]}/{source[1]}"},
                hint="upload the file for this adapter instead",
            )
        size = self.registry.store.stat(digest).size
        self.record(digest, size, link=(namespace, name))
        return size

    def record(
        self, digest: str, size: int, scan: values.StreamScan | None = None, *, link: tuple[str, str] | None = None
    ) -> None:
        now = datetime.now(UTC)
        in_transaction(  # a concurrent upload of the same bytes may record it first: then this one touches it
            self.registry.sessions,
            lambda session: register_blob(session, self.registry.store, digest, size, now=now, scan=scan, link=link),
            what="recording the blob",
        )


def register_blob(
    session: Session,
    store: BlobStore,
    digest: str,
    size: int,
    *,
    now: datetime,
    scan: values.StreamScan | None = None,
    link: tuple[str, str] | None = None,
    what: str = "this blob",
    again: str = "upload it again",
) -> None:
    """Record a stored blob in ``session``'s transaction: insert its row or touch it (GC grace restarts),
    keep its upload scan, link it to adapter ``link``; then check the object is still stored.

    Used by uploads, mounts and job results. An insert race surfaces as IntegrityError at the flush
    (run the transaction again: see db/retry.py).

    Raises:
        ConflictError: GC removed the object before this transaction held its row.
    """
    touched = session.execute(update(Blob).where(Blob.digest == digest).values(last_seen_at=now)).rowcount
    if not touched:
        session.add(Blob(digest=digest, size=size, created_at=now, last_seen_at=now))
        session.flush()
    if scan is not None and session.get(BlobScan, digest) is None:
        session.add(BlobScan(digest=digest, header_size=scan.header_size, nonfinite=scan.nonfinite, zero=scan.zero))
        session.flush()
    if link is not None and session.get(AdapterBlob, (link[0], link[1], digest)) is None:
        session.add(AdapterBlob(namespace=link[0], name=link[1], digest=digest, created_at=now))
        session.flush()
    # GC deletes an object only while its transaction holds the row (see MaintenanceService): now
    # that this one holds it, the object stays or is gone
    if not store.exists(digest):
        raise ConflictError(
            f"garbage collection removed {what} while it was being stored; {again}", detail={"digest": digest}
        )
