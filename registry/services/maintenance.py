"""Garbage collection of unreferenced blobs and fsck of stored ones (run on the server host).

GC is safe while pushes run: a blob goes only when nothing references it AND it was not uploaded
or reported present (blobs:check) within the grace period; a commit touches every blob it
references inside its own transaction, and the foreign keys from version_files / export_files to
blobs make a commit that raced with a deletion fail (and the client re-upload). Each object is
deleted inside the transaction that deletes (or, for an object with no row, claims) its row, and
an upload checks the object after it has written the row: an upload of the same bytes racing the
deletion waits for it and then fails (409, upload again) instead of recording a blob that is gone.

A link of a blob to an adapter (adapter_blobs) is not a reference: an upload that no version ever
used (a refused or abandoned push) must not keep its bytes forever. When an unreferenced blob's
grace period is over, its links are deleted with it, in the transaction that deletes its row.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, exists, select
from sqlalchemy.exc import IntegrityError

from loreg.registry.db.models import BaseModelRow
from loreg.registry.db.models import AdapterBlob, Blob, ExportFile, VersionFile
from loreg.registry.errors import BlobNotFoundError
from loreg.registry.observability import metrics
from loreg.registry.services.context import AppContext

log = logging.getLogger("loreg.gc")
HASH_CHUNK = 8 << 20
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass
class GcReport:
    deleted: list[str] = field(default_factory=list)
    kept_recent: int = 0
    referenced: int = 0
    stray_deleted: list[str] = field(default_factory=list)
    staging_removed: int = 0
    multipart_aborted: int = 0
    bytes_freed: int = 0
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__ | {"deleted_count": len(self.deleted)}


@dataclass
class FsckReport:
    checked: int = 0
    bytes_checked: int = 0
    corrupt: list[dict[str, Any]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.corrupt and not self.missing

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__ | {"ok": self.ok}


class MaintenanceService:
    def __init__(self, registry: AppContext):
        self.registry = registry

    def _base_digests(self, session: Any) -> set[str]:
        out: set[str] = set()
        for files in session.scalars(select(BaseModelRow.files)):
            out.update(f["digest"] for f in files or [] if isinstance(f, dict) and "digest" in f)
        return out

    def gc(self, *, grace: timedelta | None = None, now: datetime | None = None, dry_run: bool = False) -> GcReport:
        """Delete blobs no version, base model or export references, unseen for the grace period."""
        grace = grace if grace is not None else timedelta(seconds=self.registry.settings.gc_grace_seconds)
        now = now or datetime.now(UTC)
        cutoff = now - grace
        report = GcReport(dry_run=dry_run)
        store = self.registry.store
        sizes: dict[str, int] = {}
        with self.registry.sessions.begin() as session:
            base_refs = self._base_digests(session)
            candidates = session.scalars(
                select(Blob).where(
                    ~exists().where(VersionFile.digest == Blob.digest),
                    ~exists().where(ExportFile.digest == Blob.digest),
                )
            ).all()
            known = set(session.scalars(select(Blob.digest)))
            for blob in candidates:
                if blob.digest in base_refs:
                    report.referenced += 1
                elif blob.last_seen_at > cutoff:
                    report.kept_recent += 1
                else:
                    report.deleted.append(blob.digest)
                    sizes[blob.digest] = blob.size
        if not dry_run:
            report.deleted = [d for d in report.deleted if self._delete_blob(d, cutoff)]
        report.bytes_freed += sum(sizes[d] for d in report.deleted)
        # objects in the store with no row at all: a crash between the store write and the record
        for stat in store.iter_digests():
            if stat.digest in known or stat.digest in base_refs:
                continue
            if stat.modified is not None and stat.modified > cutoff:
                continue
            if dry_run or self._delete_stray(stat.digest, stat.size):
                report.stray_deleted.append(stat.digest)
                report.bytes_freed += stat.size
        if not dry_run:
            cleanup = getattr(store, "cleanup_staging", None)
            if callable(cleanup):
                report.staging_removed = int(cleanup(cutoff))
            abort = getattr(store, "abort_stale_multipart_uploads", None)
            if callable(abort):
                report.multipart_aborted = int(abort(cutoff))
            metrics().record_gc(len(report.deleted) + len(report.stray_deleted), report.bytes_freed, time.time())
        return report

    # Each deletion holds the blob's row (deleted, or claimed with a placeholder) in an open
    # transaction while the object goes. An upload recording the same digest (BlobService.record)
    # or a commit touching it waits for that transaction, then finds the row gone and checks the
    # object: so an object is never deleted after a push re-uploaded it and saw it present.

    def _delete_blob(self, digest: str, cutoff: datetime) -> bool:
        """Delete an unreferenced blob unseen since ``cutoff``, row and object; False if it was
        seen or referenced meanwhile."""
        try:
            with self.registry.sessions.begin() as session:
                # the row lock makes an upload linking this digest meanwhile wait, then find it gone
                held = session.scalar(
                    select(Blob.digest)
                    .where(
                        Blob.digest == digest,
                        Blob.last_seen_at <= cutoff,
                        ~exists().where(VersionFile.digest == Blob.digest),
                        ~exists().where(ExportFile.digest == Blob.digest),
                    )
                    .with_for_update()
                )
                if held is None:
                    return False
                # a link alone keeps nothing: links of an unreferenced blob go with it (see module doc)
                session.execute(
                    delete(AdapterBlob).where(AdapterBlob.digest == digest).execution_options(synchronize_session=False)
                )
                gone = session.execute(
                    delete(Blob).where(Blob.digest == digest).execution_options(synchronize_session=False)
                ).rowcount
                if gone:
                    self.registry.store.delete(digest)
                return bool(gone)
        except IntegrityError:
            return False  # referenced meanwhile (a foreign key refused the delete)

    def _delete_stray(self, digest: str, size: int) -> bool:
        """Delete an object that has no row; False if an upload recorded it meanwhile."""
        try:
            with self.registry.sessions.begin() as session:
                session.add(Blob(digest=digest, size=size, created_at=EPOCH, last_seen_at=EPOCH))
                session.flush()  # the claim: a concurrent record of this digest now waits for us
                self.registry.store.delete(digest)
                session.execute(delete(Blob).where(Blob.digest == digest).execution_options(synchronize_session=False))
            return True
        except IntegrityError:
            return False

    def fsck(self) -> FsckReport:
        """Re-hash every blob the database knows; report corrupt and missing ones."""
        store = self.registry.store
        report = FsckReport()
        with self.registry.sessions.begin() as session:
            blobs = [(b.digest, b.size) for b in session.scalars(select(Blob).order_by(Blob.digest))]
        for digest, size in blobs:
            h = hashlib.sha256()
            n = 0
            try:
                with store.open(digest) as f:
                    while chunk := f.read(HASH_CHUNK):
                        h.update(chunk)
                        n += len(chunk)
            except BlobNotFoundError:
                report.missing.append(digest)
                continue
            report.checked += 1
            report.bytes_checked += n
            actual = "sha256:" + h.hexdigest()
            if actual != digest or n != size:
                report.corrupt.append({"digest": digest, "actual": actual, "size": size, "actual_size": n})
        metrics().record_fsck(report.checked, len(report.corrupt), len(report.missing), time.time())
        return report
