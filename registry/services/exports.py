"""Export requests: merge adapters into a stored base, keyed by the digest of the canonical request."""

from __future__ import annotations

import importlib.util
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from loreg.registry.api.schemas import ExportCreate, ExportInputPublic, ExportPublic, FilePublic
from loreg.registry.db.models import Adapter, Export, ExportFile, ExportInput, Version
from loreg.registry.db.models import BaseModel as BaseRow
from loreg.registry.errors import (
    ExportNotFoundError,
    MergeUnavailableError,
    MergeUnsupportedError,
    VersionNotFoundError,
)
from loreg.registry.formats import fingerprint, names
from loreg.registry.services.adapters import AdapterService, base_ref
from loreg.registry.services.bases import BaseService
from loreg.registry.services.context import Registry

EXPORT_FORMAT = 1


def loreg_version() -> str:
    from loreg.registry.api.routes.health import loreg_version as v

    return v()


class ExportService:
    """Queue merges and read their state and results; workers (merge/worker.py) do the merging."""

    def __init__(self, registry: Registry, adapters: AdapterService, bases: BaseService):
        self.registry = registry
        self.adapters = adapters
        self.bases = bases
        self.on_queued: list[Any] = []  # callbacks that wake in-process workers

    def request(self, body: ExportCreate) -> tuple[ExportPublic, bool]:
        """Queue an export, or answer an identical one from what is stored. Returns (export, done_already).

        Raises:
            VersionNotFoundError, BaseNotFoundError, MergeUnsupportedError, MergeUnavailableError
        """
        settings = self.registry.settings
        if settings.export_worker == "inprocess" and importlib.util.find_spec("torch") is None:
            raise MergeUnavailableError(
                "this server cannot merge: torch is not installed",
                hint="install the merge extra on the server (pip install 'loreg[merge]'), or run `loreg worker` on a GPU host",
            )
        refs = [names.parse_reference(a.ref) for a in body.adapters]
        with self.registry.sessions.begin() as session:
            versions = [self.adapters._resolve(session, r.namespace, r.name, r.tag) for r in refs]
            if body.base is not None:
                base = self.bases._by_ref(session, body.base)
            else:
                first = versions[0]
                if first.base_model_id is None:
                    raise MergeUnsupportedError(f"{refs[0]} was not validated against a base model; pass --base")
                base = session.get_one(BaseRow, first.base_model_id)
            for ref, v in zip(refs, versions):
                vbase = session.get(BaseRow, v.base_model_id) if v.base_model_id else None
                if vbase is None or vbase.layout_digest != base.layout_digest:
                    raise MergeUnsupportedError(
                        f"{ref} was validated against a base with another layout than {base.weights_digest[:19]}…",
                        detail={"ref": str(ref)},
                        hint="every adapter of an export must fit the same base layout",
                    )
            if not base.weights_uploaded:
                label = base.names[0].name if base.names else base.weights_digest
                raise MergeUnsupportedError(
                    f"base model {label} has no stored weights to merge into",
                    hint=f"register it with its weights: loreg base register DIR --name {label} --upload-weights",
                )
            canonical = {
                "format": EXPORT_FORMAT,
                "base": base.weights_digest,
                "adapters": [[v.manifest_digest, float(a.weight)] for v, a in zip(versions, body.adapters)],
                "dtype": body.dtype,
            }
            digest = fingerprint.sha256_digest(fingerprint.canonical_json(canonical))
            inputs = [(v.id, v.manifest_digest, float(a.weight)) for v, a in zip(versions, body.adapters)]
            base_id = base.id
        for _attempt in range(5):
            try:
                with self.registry.sessions.begin() as session:
                    row = session.scalar(select(Export).where(Export.request_digest == digest).with_for_update())
                    if row is None:
                        row = Export(
                            id=uuid.uuid4().hex,
                            request_digest=digest,
                            base_model_id=base_id,
                            request=canonical,
                            dtype=body.dtype,
                            state="queued",
                            progress={},
                            loreg_version=loreg_version(),
                        )
                        session.add(row)
                        session.flush()
                        session.add_all(
                            ExportInput(export_id=row.id, position=i, version_id=vid, manifest_digest=md, weight=w)
                            for i, (vid, md, w) in enumerate(inputs)
                        )
                    elif row.state == "failed":
                        # an identical request retries a failed export
                        row.state, row.error, row.progress = "queued", None, {}
                        row.lease_owner = row.lease_expires_at = None
                    session.flush()
                    out = self._public(session, row)
                break
            except IntegrityError:
                continue
        if out.state in ("queued",):
            for wake in self.on_queued:
                wake()
        return out, out.state == "done"

    def get(self, export_id: str) -> ExportPublic:
        with self.registry.sessions.begin() as session:
            return self._public(session, self._row(session, export_id))

    def namespaces(self, export_id: str) -> list[tuple[str, str]]:
        """The (namespace, name) of every adapter in an export, for authorisation."""
        with self.registry.sessions.begin() as session:
            row = self._row(session, export_id)
            out = []
            for i in row.inputs:
                v = session.get(Version, i.version_id) if i.version_id else None
                if v is not None:
                    a = session.get_one(Adapter, v.adapter_id)
                    out.append((a.namespace, a.name))
            return out

    def file_entry(self, export_id: str, path: str) -> FilePublic:
        names.check_file_name(path)
        with self.registry.sessions.begin() as session:
            row = self._row(session, export_id)
            f = session.get(ExportFile, (row.id, path))
            if f is None or row.state != "done":
                raise VersionNotFoundError(f"export {export_id} has no file {path}", detail={"path": path})
            return FilePublic(path=f.path, size=f.size, digest=f.digest)

    def for_version(self, namespace: str, name: str, tag: str) -> list[ExportPublic]:
        """Exports that used this version (lineage)."""
        with self.registry.sessions.begin() as session:
            version = self.adapters._resolve(session, namespace, name, tag)
            ids = session.scalars(select(ExportInput.export_id).where(ExportInput.version_id == version.id)).all()
            rows = session.scalars(select(Export).where(Export.id.in_(ids)).order_by(Export.created_at.desc())).all()
            return [self._public(session, r) for r in rows]

    def _row(self, session: Session, export_id: str) -> Export:
        if not isinstance(export_id, str) or len(export_id) != 32 or not all(c in "0123456789abcdef" for c in export_id):
            raise ExportNotFoundError(f"no export {export_id[:40]!r}")
        row = session.get(Export, export_id)
        if row is None:
            raise ExportNotFoundError(f"no export {export_id}")
        return row

    def _public(self, session: Session, row: Export) -> ExportPublic:
        base = session.get_one(BaseRow, row.base_model_id)
        adapters = []
        for i in row.inputs:
            v = session.get(Version, i.version_id) if i.version_id else None
            a = session.get(Adapter, v.adapter_id) if v else None
            adapters.append(
                ExportInputPublic(
                    name=a.full_name if a else None, version=v.number if v else None, digest=i.manifest_digest, weight=i.weight
                )
            )
        return ExportPublic(
            id=row.id,
            state=row.state,  # type: ignore[arg-type]
            request_digest=row.request_digest,
            base=base_ref(base),  # type: ignore[arg-type]
            adapters=adapters,
            dtype=row.dtype,
            progress=row.progress or {},
            error=row.error,
            files=[FilePublic(path=f.path, size=f.size, digest=f.digest) for f in row.files],
            device=row.device,
            attempts=row.attempts,
            loreg_version=row.loreg_version,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
        )
