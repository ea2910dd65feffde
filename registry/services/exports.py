"""Export requests: merge adapters into a stored base, keyed by the digest of the canonical request.

The job/record model (exports, and every job that turns stored versions into a result the same way):
- A record is keyed by its *request key*, the digest of the canonical request, which names the input
  versions (``ns/name:N``, manifest digest, weight), the base's weights digest, the dtype and the
  format of the result. An identical request is answered from that record; two namespaces never
  share one, so a record only ever names what its requester asked for.
- Its *content key* is the same without the names. A request whose inputs have the same bytes as a
  finished record gets a record of its own, created done with that record's result files (no second
  merge; blobs are stored once), its lineage pointing at its own inputs. A worker that claims a
  queued job checks the same key first, so concurrent requests merge at most once in the common case.
- Who may read a record is decided by the input names stored with it: a token must be able to read
  every one. A deleted version keeps its name there, so access fails closed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from loreg.registry.db.models import Adapter, Export, ExportFile, ExportInput, Token, VersionFile
from loreg.registry.db.models import BaseModelRow
from loreg.registry.errors import (
    DeniedError,
    ExportNotFoundError,
    FileNotStoredError,
    MergeUnavailableError,
    MergeUnsupportedError,
    TooManyRequestsError,
    UnauthorizedError,
)
from loreg.registry.formats import fingerprint, names
from loreg.registry.merge.combine import CombineParams, check_params
from loreg.registry.services import jobs, resolve
from loreg.registry.services.adapters import AdapterService
from loreg.registry.services.bases import BaseService
from loreg.registry.services.context import AppContext
from loreg.registry.services.tokens import ANONYMOUS, Principal
from loreg.registry.services.views import BaseRefView, StoredFile, base_ref
from loreg.registry.version import loreg_version

# the result's format: part of both keys, bumped when the same inputs would give other bytes
EXPORT_FORMAT = 1


def content_key(
    base_digest: str, inputs: list[tuple[str, float]], dtype: str, combine: dict[str, Any] | None = None
) -> str:
    """Digest of what decides the result's bytes: base weights, [manifest digest, weight]..., dtype, and the
    combination method with its parameters when the adapters are combined first."""
    canonical: dict[str, Any] = {
        "format": EXPORT_FORMAT, "base": base_digest, "adapters": [[d, w] for d, w in inputs], "dtype": dtype,
    }  # exactly the request digest's form before 0005, so migrated rows keep it as their content digest
    if combine is not None:  # absent for the weighted sum: its keys stay what they were
        canonical["combine"] = combine
    return fingerprint.sha256_digest(fingerprint.canonical_json(canonical))


def request_key(
    base_digest: str, inputs: list[tuple[str, str, float]], dtype: str, combine: dict[str, Any] | None = None
) -> tuple[dict[str, Any], str]:
    """The canonical request (inputs as [``ns/name:N``, manifest digest, weight]) and its digest."""
    canonical: dict[str, Any] = {
        "format": EXPORT_FORMAT, "base": base_digest, "inputs": [[n, d, w] for n, d, w in inputs], "dtype": dtype,
    }
    if combine is not None:
        canonical["combine"] = combine
    return canonical, fingerprint.sha256_digest(fingerprint.canonical_json(canonical))


def split_input_name(name: str) -> tuple[str, str, int]:
    """``ns/name:N`` -> (ns, name, N)."""
    full, _, number = name.rpartition(":")
    namespace, _, adapter = full.partition("/")
    return namespace, adapter, int(number)


def can_read_inputs(principal: Principal, input_names: list[str | None]) -> bool:
    """Whether ``principal`` may read every input; a name lost before 0005 needs a token covering all."""
    if not principal.has_scope("read"):
        return False
    for name in input_names:
        if name is None:
            if principal.namespaces:
                return False
            continue
        namespace, adapter, _ = split_input_name(name)
        if not principal.covers(namespace, adapter):
            return False
    return True


def adopt_stored_result(session: Session, row: Export, now: datetime) -> bool:
    """Finish ``row`` with the files of a finished record of the same content key. True if one existed.

    The donor's file rows reference the blobs inside this transaction, so GC cannot remove them before
    ``row``'s own references are added.
    """
    donor = session.scalar(
        select(Export)
        .where(Export.content_digest == row.content_digest, Export.state == "done", Export.id != row.id)
        .order_by(Export.finished_at)
        .limit(1)
    )
    if donor is None:
        return False
    session.add_all(ExportFile(export_id=row.id, path=f.path, size=f.size, digest=f.digest) for f in donor.files)
    jobs.mark_done(row, progress=donor.progress or {}, device=donor.device, now=now)
    row.loreg_version = donor.loreg_version  # the version that made these bytes
    return True


@dataclass(frozen=True)
class WeightedRef:
    """An input of an export: an adapter reference (``ns/name[:tag]``) and its weight."""

    ref: str
    weight: float = 1.0


@dataclass(frozen=True)
class ExportInputView:
    name: str | None  # ``ns/name``; None for a version deleted before 0005 stored names
    version: int | None
    digest: str
    weight: float


@dataclass(frozen=True)
class ExportView:
    """An export record as the service answers it (routes map it to ExportPublic)."""

    id: str
    state: str
    request_digest: str
    base: BaseRefView | None
    adapters: list[ExportInputView]
    dtype: str
    combination: dict[str, Any] | None  # {method, params}: the adapters were combined first (else a weighted sum)
    progress: dict[str, Any]
    error: dict[str, Any] | None
    files: list[StoredFile]
    device: str | None
    attempts: int
    loreg_version: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True)
class ExportRequested:
    """What a request got: the record, and whether this request created it (else it was stored already)."""

    export: ExportView
    created: bool


@dataclass(frozen=True)
class _Resolved:
    base_id: int
    inputs: list[tuple[int, str, str, float]]  # (version id, ns/name:N, manifest digest, weight)
    canonical: dict[str, Any]
    request_digest: str
    content_digest: str


class ExportService:
    """Queue merges and read their state and results; workers (merge/worker.py) do the merging and
    the job queue (services/jobs.py) owns every transition of the job."""

    def __init__(self, registry: AppContext, adapters: AdapterService, bases: BaseService):
        self.registry = registry
        self.adapters = adapters
        self.bases = bases
        self.jobs = jobs.JobQueue(registry, Export)

    def request(
        self,
        adapters: Sequence[WeightedRef],
        principal: Principal,
        *,
        base: str | None = None,
        dtype: str = "auto",
        combination: CombineParams | None = None,
    ) -> ExportRequested:
        """Queue an export of ``adapters`` merged into ``base`` (default: the first adapter's), or answer it
        from what is stored. The caller has checked that ``principal`` may read every adapter reference.
        ``combination`` (its weights are the adapters'): combine the adapters with that method first
        (merge/combine.py), then merge the result; None: the weighted sum of their changes.

        Raises:
            VersionNotFoundError, BaseNotFoundError, MergeUnsupportedError (a weight out of bounds, a
            base without weights), MergeUnavailableError, TooManyRequestsError (a read token's bound),
            ConflictError (concurrent requests kept conflicting)
        """
        if principal is ANONYMOUS:  # anonymous read may not spend merge time
            raise UnauthorizedError("exports need a token", hint="run loreg login, or set LOREG_TOKEN")
        self._check_request(adapters)
        if combination is not None:  # the parameters first: no look-up for a request that cannot run
            check_params(dataclasses.replace(combination, weights=tuple(a.weight for a in adapters)), len(adapters))
        resolved = self._resolve(adapters, base, dtype, combination)
        return self.jobs.request(lambda session: self._record(session, resolved, dtype, principal), what="export request")

    def _check_request(self, adapters: Sequence[WeightedRef]) -> None:
        settings = self.registry.settings
        for a in adapters:
            if not math.isfinite(a.weight) or abs(a.weight) > settings.max_export_weight:
                raise MergeUnsupportedError(
                    f"the weight {a.weight!r} of {a.ref[:300]} is outside [-{settings.max_export_weight:g}, "
                    f"{settings.max_export_weight:g}]",
                    detail={"ref": a.ref[:300], "max": settings.max_export_weight},
                    hint="weights must be finite; negative ones subtract a task (LOREG_MAX_EXPORT_WEIGHT: the bound)",
                )
        if settings.export_worker == "inprocess" and importlib.util.find_spec("torch") is None:
            raise MergeUnavailableError(
                "this server cannot merge: torch is not installed",
                hint="install the merge extra on the server (pip install 'loreg[merge]'), or run `loreg worker` on a GPU host",
            )

    def _resolve(
        self, adapters: Sequence[WeightedRef], base_ref_: str | None, dtype: str, combination: CombineParams | None
    ) -> _Resolved:
        """The versions and the base the request names, checked to fit together, and the request's keys."""
        refs = [names.parse_reference(a.ref) for a in adapters]
        with self.registry.sessions.begin() as session:
            versions = [resolve.version(session, r.namespace, r.name, r.tag) for r in refs]
            if base_ref_ is not None:
                base = resolve.base(session, base_ref_)
            else:
                first = versions[0]
                if first.base_model_id is None:
                    raise MergeUnsupportedError(f"{refs[0]} was not validated against a base model; pass --base")
                base = session.get_one(BaseModelRow, first.base_model_id)
            for ref, v in zip(refs, versions):
                vbase = session.get(BaseModelRow, v.base_model_id) if v.base_model_id else None
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
            inputs = [
                (v.id, f"{session.get_one(Adapter, v.adapter_id).full_name}:{v.number}", v.manifest_digest,
                 float(a.weight))
                for v, a in zip(versions, adapters)
            ]
            files = [
                {f.path: f for f in session.scalars(select(VersionFile).where(VersionFile.version_id == v.id))}
                for v in versions
            ]
        combine = self._check_combination(combination, inputs, files)
        canonical, digest = request_key(base.weights_digest, [(n, md, w) for _, n, md, w in inputs], dtype, combine)
        content = content_key(base.weights_digest, [(md, w) for _, _, md, w in inputs], dtype, combine)
        return _Resolved(base.id, inputs, canonical, digest, content)

    def _check_combination(
        self, params: CombineParams | None, inputs: list[tuple[int, str, str, float]], files: list[dict[str, Any]]
    ) -> dict[str, Any] | None:
        """The canonical method and parameters of a combination (None: the weighted sum), refused like a
        combination request (naming the inputs) before anything is stored."""
        if params is None:
            return None
        from loreg.registry.services.combinations import PARAM_FIELDS, plan_stored

        checked = check_params(dataclasses.replace(params, weights=tuple(w for *_, w in inputs)), len(inputs))
        pairs = [(f["adapter_config.json"], f["adapter_model.safetensors"]) for f in files]
        plan_stored(self.registry, [n for _, n, _, _ in inputs], [(c.digest, c.size, t.digest, t.size) for c, t in pairs],
                    checked)
        return {"method": checked.method, "params": {k: getattr(checked, k) for k in PARAM_FIELDS}}

    def _record(
        self, session: Session, resolved: _Resolved, dtype: str, principal: Principal
    ) -> tuple[ExportRequested, str]:
        """The request's transaction: a new record (queued, or done from a stored result), the record of
        an identical request (a failed one is retried), or a refusal past the token's bound."""
        row = session.scalar(select(Export).where(Export.request_digest == resolved.request_digest).with_for_update())
        created = row is None
        if row is None:
            row = Export(
                id=uuid.uuid4().hex,
                request_digest=resolved.request_digest,
                content_digest=resolved.content_digest,
                requested_by=principal.token_id,
                base_model_id=resolved.base_id,
                request=resolved.canonical,
                dtype=dtype,
                state="queued",
                progress={},
                loreg_version=loreg_version(),
            )
            session.add(row)
            session.flush()
            session.add_all(
                ExportInput(export_id=row.id, position=i, version_id=vid, name=n, manifest_digest=md, weight=w)
                for i, (vid, n, md, w) in enumerate(resolved.inputs)
            )
            if not adopt_stored_result(session, row, datetime.now(UTC)):
                self._check_bound(session, principal, row.id)
        elif row.state == "failed":
            self._check_bound(session, principal, row.id)
            jobs.retry(row)
            row.requested_by = principal.token_id
        session.flush()
        return ExportRequested(self._view(session, row), created), row.state

    def _check_bound(self, session: Session, principal: Principal, new_id: str) -> None:
        """A read-scoped token (a host that only consumes) may have a bounded number of jobs waiting."""
        if principal.has_scope("write"):
            return
        limit = self.registry.settings.max_queued_exports_per_token
        session.get(Token, principal.token_id, with_for_update=True)  # serialises one token's requests
        waiting = session.scalar(
            select(func.count())
            .select_from(Export)
            .where(
                Export.requested_by == principal.token_id,
                Export.state.in_(("queued", "running")),
                Export.id != new_id,
            )
        ) or 0
        if waiting >= limit:
            raise TooManyRequestsError(
                f"this token already has {waiting} exports queued or running (at most {limit} for a read token)",
                detail={"queued": waiting, "limit": limit, "retry_after": 30},
                hint="wait for them to finish (GET /v1/exports/{id}), or raise LOREG_MAX_QUEUED_EXPORTS_PER_TOKEN",
            )

    def get(self, export_id: str) -> ExportView:
        with self.registry.sessions.begin() as session:
            return self._view(session, self._row(session, export_id))

    def recent(self, principal: Principal, limit: int = 50) -> list[ExportView]:
        """Newest exports whose every input ``principal`` can read (the rule of ``authorize``)."""
        out: list[ExportView] = []
        with self.registry.sessions.begin() as session:
            rows = session.scalars(select(Export).order_by(Export.created_at.desc()).limit(limit * 4)).all()
            for row in rows:
                if can_read_inputs(principal, [i.name for i in row.inputs]):
                    out.append(self._view(session, row))
                if len(out) >= limit:
                    break
        return out

    def authorize(self, export_id: str, principal: Principal) -> None:
        """Raise unless ``principal`` may read every input stored with the export (deleted ones included).

        Raises:
            ExportNotFoundError, DeniedError (which names nothing: the inputs may be another namespace's)
        """
        with self.registry.sessions.begin() as session:
            row = self._row(session, export_id)
            if not can_read_inputs(principal, [i.name for i in row.inputs]):
                raise DeniedError(
                    f"this token cannot read every adapter version export {export_id} was made from",
                    hint="a token must be able to read each input of an export, deleted ones included",
                )

    def file_entry(self, export_id: str, path: str) -> StoredFile:
        names.check_file_name(path)
        with self.registry.sessions.begin() as session:
            row = self._row(session, export_id)
            f = session.get(ExportFile, (row.id, path))
            if f is None or row.state != "done":
                raise FileNotStoredError(f"export {export_id} has no file {path}", detail={"path": path})
            return StoredFile(path=f.path, size=f.size, digest=f.digest)

    def for_version(self, namespace: str, name: str, tag: str, principal: Principal) -> list[ExportView]:
        """Exports that used this version (lineage), limited to those whose every input ``principal`` can read."""
        with self.registry.sessions.begin() as session:
            version = resolve.version(session, namespace, name, tag)
            ids = session.scalars(select(ExportInput.export_id).where(ExportInput.version_id == version.id)).all()
            rows = session.scalars(select(Export).where(Export.id.in_(ids)).order_by(Export.created_at.desc())).all()
            return [
                self._view(session, r) for r in rows if can_read_inputs(principal, [i.name for i in r.inputs])
            ]

    def _row(self, session: Session, export_id: str) -> Export:
        if not isinstance(export_id, str) or len(export_id) != 32 or not all(c in "0123456789abcdef" for c in export_id):
            raise ExportNotFoundError(f"no export {export_id[:40]!r}")
        row = session.get(Export, export_id)
        if row is None:
            raise ExportNotFoundError(f"no export {export_id}")
        return row

    def _view(self, session: Session, row: Export) -> ExportView:
        base = session.get_one(BaseModelRow, row.base_model_id)
        adapters = []
        for i in row.inputs:
            full, number = None, None
            if i.name is not None:  # kept after the version is deleted
                namespace, adapter, number = split_input_name(i.name)
                full = f"{namespace}/{adapter}"
            adapters.append(ExportInputView(name=full, version=number, digest=i.manifest_digest, weight=i.weight))
        return ExportView(
            id=row.id,
            state=row.state,
            request_digest=row.request_digest,
            base=base_ref(base),
            adapters=adapters,
            dtype=row.dtype,
            combination=(row.request or {}).get("combine"),
            progress=row.progress or {},
            error=row.error,
            files=[StoredFile(path=f.path, size=f.size, digest=f.digest) for f in row.files],
            device=row.device,
            attempts=row.attempts,
            loreg_version=row.loreg_version,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
        )
