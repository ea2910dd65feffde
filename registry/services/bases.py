"""Base models known by content: registration, resolution, and validation of adapters against them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from loreg.registry.db.models import BaseModelRow
from loreg.registry.db.models import BaseName, Blob
from loreg.registry.db.retry import in_transaction
from loreg.registry.errors import (
    BaseNotFoundError,
    BaseUnknownError,
    BlobMissingError,
    DigestInvalidError,
    LoregError,
    ManifestInvalidError,
    RequestInvalidError,
)
from loreg.registry.formats import fingerprint, names, peft, safetensors, validate
from loreg.registry.services import resolve
from loreg.registry.services.context import AppContext
from loreg.registry.services.views import BaseLayoutView, BaseRegistered, BaseView, StoredFile, base_label

MAX_TENSORS = 200_000


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: list[int]
    file: str
    digest: str  # sha256 of the tensor's bytes


@dataclass(frozen=True)
class BaseRegistration:
    """A base model to register: its name, the tensors read from its headers, its files."""

    name: str
    revision: str | None
    config: dict[str, Any]
    tensors: list[TensorEntry]
    files: list[StoredFile]
    weights_uploaded: bool = False


def layout_of(row: BaseModelRow) -> validate.BaseLayout:
    return validate.base_layout({t[0]: (t[1], t[2]) for t in row.tensors}, row.config)


class BaseService:
    """Base models: registered by an admin from a local checkpoint's headers (and optionally weights)."""

    def __init__(self, registry: AppContext):
        self.registry = registry

    # --- register -----------------------------------------------------------------------------

    def register(self, body: BaseRegistration) -> BaseRegistered:
        """Register a base model; the same weights under another name add that name.

        The layout and weights digests are recomputed here from the tensor list. With
        ``weights_uploaded`` every file must be a stored blob, and each shard's header (a ranged
        read) must list exactly the tensors claimed for it.

        Raises:
            NameInvalidError, ManifestInvalidError, BlobMissingError, header errors.
        """
        names.check_base_name(body.name)
        revision = names.check_base_revision(body.revision) if body.revision else ""
        if len(body.tensors) > MAX_TENSORS:
            raise ManifestInvalidError(f"a base model lists at most {MAX_TENSORS} tensors")
        files = {f.path: f for f in body.files}
        for f in body.files:
            names.check_file_name(f.path)
        tensors = []
        seen: set[str] = set()
        for t in body.tensors:
            if t.name in seen:
                raise ManifestInvalidError(f"tensor {t.name} is listed twice", detail={"key": t.name})
            seen.add(t.name)
            if t.dtype not in safetensors.DTYPE_SIZES:
                raise ManifestInvalidError(f"tensor {t.name} has unknown dtype {t.dtype}", detail={"key": t.name})
            if t.file not in files:
                raise ManifestInvalidError(f"tensor {t.name} is in {t.file}, which is not listed", detail={"key": t.name})
            tensors.append([t.name, t.dtype, list(t.shape), t.file, t.digest])
        if not tensors:
            raise ManifestInvalidError("a base model needs at least one tensor")
        if body.weights_uploaded:
            self._check_uploaded(body, tensors)
        layout_digest = fingerprint.layout_digest((t[0], t[1], t[2]) for t in tensors)
        weights_digest = fingerprint.weights_digest((t[0], t[1], t[2], t[4]) for t in tensors)
        layout = validate.base_layout({t[0]: (t[1], t[2]) for t in tensors}, body.config)
        model_type, archs = layout.model_type, list(layout.architectures)
        param_count = sum(math.prod(t[2]) for t in tensors)
        out, created = in_transaction(
            self.registry.sessions,
            lambda session: self._insert(
                session, body, revision, tensors, weights_digest, layout_digest, model_type, archs, param_count
            ),
            what=f"registering base model {body.name}",
        )
        return BaseRegistered(out, created)

    def _insert(
        self,
        session: Session,
        body: BaseRegistration,
        revision: str,
        tensors: list[list[Any]],
        weights_digest: str,
        layout_digest: str,
        model_type: str | None,
        archs: list[str],
        param_count: int,
    ) -> tuple[BaseView, bool]:
        """The registration's transaction: the record of these weights (new, or given its uploaded
        weights) and the name. Returns (base, created); an insert race raises IntegrityError (db/retry.py)."""
        files = [{"path": f.path, "size": f.size, "digest": f.digest} for f in body.files]
        row = session.scalar(select(BaseModelRow).where(BaseModelRow.weights_digest == weights_digest).with_for_update())
        created = row is None
        if row is None:
            row = BaseModelRow(
                weights_digest=weights_digest,
                layout_digest=layout_digest,
                model_type=model_type,
                architectures=archs,
                config=body.config,
                tensors=tensors,
                files=files,
                weights_uploaded=body.weights_uploaded,
                parameter_count=param_count,
            )
            session.add(row)
            session.flush()
        elif body.weights_uploaded and not row.weights_uploaded:
            row.files = files
            row.weights_uploaded = True
        exists = session.scalar(
            select(BaseName).where(
                BaseName.name == body.name, BaseName.revision == revision, BaseName.base_model_id == row.id
            )
        )
        if exists is None:
            session.add(BaseName(name=body.name, revision=revision, base_model_id=row.id))
        session.flush()
        return self._public(session, row), created

    def _check_uploaded(self, body: BaseRegistration, tensors: list[list[Any]]) -> None:
        store = self.registry.store
        with self.registry.sessions.begin() as session:
            known = set(session.scalars(select(Blob.digest).where(Blob.digest.in_([f.digest for f in body.files]))))
        by_file: dict[str, list[list[Any]]] = {}
        for t in tensors:
            by_file.setdefault(t[3], []).append(t)
        for f in body.files:
            if f.digest not in known or not store.exists(f.digest):
                raise BlobMissingError(f"{f.path}: blob {f.digest} was not uploaded", detail={"path": f.path})
            if store.stat(f.digest).size != f.size:
                raise ManifestInvalidError(f"{f.path}: size differs from the stored blob", detail={"path": f.path})
            if f.path not in by_file:
                continue
            header = safetensors.read_header(
                lambda s, e, d=f.digest: store.read_range(d, s, e),
                f.size,
                max_header_size=self.registry.settings.max_header_size,
            )
            claimed = {t[0]: (t[1], tuple(t[2])) for t in by_file[f.path]}
            actual = {n: (i.dtype, tuple(i.shape)) for n, i in header.tensors.items()}
            if claimed != actual:
                diff = sorted(set(claimed.items()) ^ set(actual.items()))[:20]
                raise ManifestInvalidError(
                    f"{f.path}: the tensor list does not match the uploaded file's header",
                    detail={"path": f.path, "differences": [[k, v[0], list(v[1])] for k, v in diff]},
                )

    # --- resolve ------------------------------------------------------------------------------

    def get(self, ref: str) -> BaseView:
        with self.registry.sessions.begin() as session:
            return self._public(session, resolve.base(session, ref))

    def layout(self, ref: str) -> BaseLayoutView:
        with self.registry.sessions.begin() as session:
            row = resolve.base(session, ref)
            return BaseLayoutView(
                weights_digest=row.weights_digest,
                layout_digest=row.layout_digest,
                model_type=row.model_type,
                architectures=row.architectures,
                config=row.config,
                tensors=[[t[0], t[1], t[2]] for t in row.tensors],
            )

    def list(self, layout_digest: str | None = None) -> list[BaseView]:
        """Every base model, newest first; with ``layout_digest``, those of that tensor layout."""
        query = select(BaseModelRow).options(selectinload(BaseModelRow.names)).order_by(BaseModelRow.id.desc())
        if layout_digest is not None:
            if names.DIGEST.fullmatch(layout_digest) is None:
                raise DigestInvalidError(
                    f"invalid layout digest {layout_digest[:80]!r}", hint="a layout digest is sha256:<64 lowercase hex>"
                )
            query = query.where(BaseModelRow.layout_digest == layout_digest)
        with self.registry.sessions.begin() as session:
            return [self._public(session, r) for r in session.scalars(query)]

    def lookup_ids(self, ref: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(ids of the bases ``ref`` names, ids of other bases with the same layout)."""
        with self.registry.sessions.begin() as session:
            return resolve.base_ids(session, ref)

    def _public(self, session: Session, row: BaseModelRow) -> BaseView:
        labels = session.scalars(
            select(BaseName).where(BaseName.base_model_id == row.id).order_by(BaseName.id)
        ).all()
        return BaseView(
            weights_digest=row.weights_digest,
            layout_digest=row.layout_digest,
            names=[base_label(n.name, n.revision) for n in labels],
            model_type=row.model_type,
            architectures=row.architectures,
            tensor_count=len(row.tensors),
            parameter_count=row.parameter_count,
            weights_uploaded=row.weights_uploaded,
            files=row.files,
            created_at=row.created_at,
        )

    # --- validation hook used by AdapterService.push ------------------------------------------

    def validate_push(
        self,
        config: peft.AdapterConfig,
        header: safetensors.Header,
        facts: dict[str, Any],
        requested: str | None,
        source: str | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """Resolve the adapter's base and validate its tensors against the base layout (headers only).

        ``source`` says how the client chose ``requested`` ("explicit", or "weights"/"layout" when
        matched by content); it is recorded in the facts as ``base_source`` ("config" when the
        config's name was used). Only a base taken from the config's name can warn that the name
        differs.
        """
        if requested is None and source is not None:
            raise RequestInvalidError("base_source needs base")
        ref = requested if requested is not None else self._config_base(config)
        with self.registry.sessions.begin() as session:
            try:
                row = resolve.base(session, ref)
            except BaseNotFoundError as exc:
                raise BaseUnknownError(exc.message, detail=exc.detail) from None
            layout = layout_of(row)
            base_id = row.id
        # a base the client chose (by name or by content) overrides the config's name on purpose
        source = source or ("config" if requested is None else "explicit")
        config_name = ref.split("@")[0] if source == "config" else None
        report = validate.validate_adapter(config, header, layout, base_name=config_name)
        out = report.to_dict()
        out["facts"]["base_source"] = source
        out["facts"]["serving"] = report.serving
        out["mapping"] = {"variant": report.variant, "modules": report.mapping, "layer_types": report.layer_types}
        return base_id, out

    @staticmethod
    def _config_base(config: peft.AdapterConfig) -> str:
        """The base reference the config names (``base_model_name_or_path`` and ``revision``)."""
        name = config.base_model_name_or_path
        if not name:
            raise BaseUnknownError(
                "adapter_config.json names no base model (base_model_name_or_path is empty)",
                hint="pass the base explicitly: loreg push DIR NAME --base ORG/MODEL",
            )
        try:
            names.check_base_name(name)
        except LoregError:
            raise BaseUnknownError(
                f"base_model_name_or_path {name[:200]!r} is not a registered base model name",
                detail={"base": name[:200]},
                hint="pass the base explicitly: loreg push DIR NAME --base ORG/MODEL (or a sha256 digest)",
            ) from None
        return f"{name}@{config.revision}" if config.revision and config.revision != "main" else name

