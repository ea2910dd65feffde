"""ORM models. Tables are plural snake_case; digests are ``sha256:<hex>`` under a CHECK constraint."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from loreg.registry.db.orm import OrmBase

DIGEST_LEN = 71  # "sha256:" + 64 hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def trigram_index(name: str, column: str) -> Index:
    """A trigram GIN index for substring matches (LIKE '%text%') on Postgres; SQLite scans."""
    return Index(name, column, postgresql_using="gin", postgresql_ops={column: "gin_trgm_ops"}).ddl_if(
        dialect="postgresql"
    )


def digest_check(column: str) -> CheckConstraint:
    # LIKE, not a regex: it must run on SQLite and Postgres alike; the API validates the full form.
    return CheckConstraint(f"{column} LIKE 'sha256:%' AND length({column}) = {DIGEST_LEN}", name=f"{column}_sha256")


class Blob(OrmBase):
    __tablename__ = "blobs"
    __table_args__ = (digest_check("digest"),)

    digest: Mapped[str] = mapped_column(String(DIGEST_LEN), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    # bumped by uploads and by blobs:check answering "present": GC spares blobs seen within the grace period
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)


class BlobScan(OrmBase):
    """Value facts of a safetensors blob, gathered while its upload streamed through the server,
    so a commit need not read the file again. Gone with its blob."""

    __tablename__ = "blob_scans"

    digest: Mapped[str] = mapped_column(ForeignKey("blobs.digest", ondelete="CASCADE"), primary_key=True)
    header_size: Mapped[int] = mapped_column(BigInteger)
    nonfinite: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    zero: Mapped[list[str]] = mapped_column(JSON, default=list)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Adapter(OrmBase):
    __tablename__ = "adapters"
    __table_args__ = (
        UniqueConstraint("namespace", "name"),
        # ?q= matches names here, a table of adapters, not of versions: a name's trigrams would
        # otherwise sit in the index once per version, and common ones cost the whole table
        trigram_index("ix_adapters_search_name_trgm", "search_name"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    namespace: Mapped[str] = mapped_column(String(128))
    name: Mapped[str] = mapped_column(String(128))
    # last number handed out: numbers are never reused, even after a version is deleted
    last_number: Mapped[int] = mapped_column(Integer, default=0)
    # "namespace/name", what ?q= matches besides version messages (names are lowercase already)
    search_name: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    versions: Mapped[list[Version]] = relationship(back_populates="adapter", passive_deletes=True)
    aliases: Mapped[list[Alias]] = relationship(back_populates="adapter", passive_deletes=True)

    @property
    def full_name(self) -> str:
        return f"{self.namespace}/{self.name}"


class AdapterBase(OrmBase):
    """A base model some version of an adapter was validated against, written with every version.
    A lookup by base asks each of these adapters for its newest matching version (a few index probes
    each) instead of ranking all of the base's versions. Never removed with a version: a pair whose
    versions are gone only answers nothing."""

    __tablename__ = "adapter_bases"

    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id", ondelete="CASCADE"), primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), primary_key=True)


class AdapterBlob(OrmBase):
    """A blob linked to an adapter name (an OCI repository): only linked blobs may appear in its
    versions. A link comes from an upload for that adapter whose bytes the server read and verified,
    or from a mount out of another adapter the same token can read; storing once is a saving, never
    a permission. Keyed by name, not adapter id: an upload precedes the adapter's first version, and
    no adapter row (which listings would show) is made for it."""

    __tablename__ = "adapter_blobs"

    namespace: Mapped[str] = mapped_column(String(128), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    # RESTRICT: GC drops a link only together with its unreferenced blob, in one transaction
    digest: Mapped[str] = mapped_column(ForeignKey("blobs.digest", ondelete="RESTRICT"), primary_key=True, index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class BaseModelRow(OrmBase):
    """A base model's weights, layout and facts (the Row suffix: pydantic's BaseModel is everywhere here)."""

    __tablename__ = "base_models"
    __table_args__ = (digest_check("weights_digest"), digest_check("layout_digest"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    weights_digest: Mapped[str] = mapped_column(String(DIGEST_LEN), unique=True)
    layout_digest: Mapped[str] = mapped_column(String(DIGEST_LEN), index=True)
    model_type: Mapped[str | None] = mapped_column(String(128))
    architectures: Mapped[list[str]] = mapped_column(JSON, default=list)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # [[name, dtype, shape, file, tensor sha256]] in checkpoint order
    tensors: Mapped[list[Any]] = mapped_column(JSON, default=list)
    # [{"path", "size", "digest"}] of the checkpoint's files
    files: Mapped[list[Any]] = mapped_column(JSON, default=list)
    weights_uploaded: Mapped[bool] = mapped_column(Boolean, default=False)
    parameter_count: Mapped[int] = mapped_column(BigInteger, default=0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    names: Mapped[list[BaseName]] = relationship(back_populates="base_model", passive_deletes=True)


class BaseName(OrmBase):
    """A name (and revision) of a base model; one name may point at several fingerprints over time."""

    __tablename__ = "base_names"
    __table_args__ = (UniqueConstraint("name", "revision", "base_model_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(256), index=True)
    revision: Mapped[str] = mapped_column(String(128), default="")
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    base_model: Mapped[BaseModelRow] = relationship(back_populates="names")


class Version(OrmBase):
    __tablename__ = "versions"
    __table_args__ = (
        UniqueConstraint("adapter_id", "number"),
        UniqueConstraint("adapter_id", "manifest_digest"),
        digest_check("manifest_digest"),
        CheckConstraint("number > 0", name="number_positive"),
        Index("ix_versions_base_rank", "base_model_id", "rank_max"),
        # a base's versions in the order of lookup's newest-per-adapter window, with the columns the
        # window and the rank filters read: an index-only scan, no visit to the wide rows
        Index("ix_versions_base_adapter_number", "base_model_id", "adapter_id", "number", "rank_min", "rank_max", "id"),
        # lookups' ?q= is a substring match: trigram indexes serve it on Postgres (SQLite scans)
        trigram_index("ix_versions_search_text_trgm", "search_text"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    manifest_digest: Mapped[str] = mapped_column(String(DIGEST_LEN), index=True)
    message: Mapped[str | None] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    facts: Mapped[dict[str, Any]] = mapped_column(JSON)
    warnings: Mapped[list[Any]] = mapped_column(JSON, default=list)
    # denormalised facts for lookup on indexed columns
    rank_min: Mapped[int] = mapped_column(Integer)
    rank_max: Mapped[int] = mapped_column(Integer)
    use_dora: Mapped[bool] = mapped_column(Boolean, default=False)
    task_type: Mapped[str | None] = mapped_column(String(64), index=True)
    base_model_id: Mapped[int | None] = mapped_column(ForeignKey("base_models.id", ondelete="RESTRICT"), index=True)
    base_mapping: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # lower(message), what ?q= matches in a version (the adapter's name is adapters.search_name)
    search_text: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    adapter: Mapped[Adapter] = relationship(back_populates="versions")
    files: Mapped[list[VersionFile]] = relationship(
        back_populates="version", passive_deletes=True, order_by="VersionFile.path"
    )
    targets: Mapped[list[VersionTarget]] = relationship(passive_deletes=True)
    metrics: Mapped[list[Metric]] = relationship(passive_deletes=True, order_by="Metric.id")
    base_model: Mapped[BaseModelRow | None] = relationship()


class VersionFile(OrmBase):
    __tablename__ = "version_files"
    __table_args__ = (digest_check("digest"),)

    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"), primary_key=True)
    path: Mapped[str] = mapped_column(String(256), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    digest: Mapped[str] = mapped_column(ForeignKey("blobs.digest", ondelete="RESTRICT"), index=True)

    version: Mapped[Version] = relationship(back_populates="files")


class VersionTarget(OrmBase):
    """One adapted module leaf name (q_proj, c_attn, …) of a version, for lookup by target."""

    __tablename__ = "version_targets"

    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"), primary_key=True)
    target: Mapped[str] = mapped_column(String(256), primary_key=True, index=True)


class Metric(OrmBase):
    """An evaluation appended to a version; lookups use each key's latest value."""

    __tablename__ = "metrics"
    __table_args__ = (
        Index("ix_metrics_key_version", "key", "version_id"),
        # a version's metrics, in order (every summary loads them)
        Index("ix_metrics_version_id", "version_id", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(128))
    value: Mapped[float] = mapped_column(Float)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class MetricLatest(OrmBase):
    """Each (version, key)'s latest value, written with every metric: lookups join, filter and sort
    by it on an index ((key, value, version_id)) instead of finding the latest row per version."""

    __tablename__ = "version_metrics_latest"
    __table_args__ = (Index("ix_version_metrics_latest_key_value", "key", "value", "version_id"),)

    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(128), primary_key=True)
    value: Mapped[float] = mapped_column(Float)
    # the metrics row it copies: of two racing evaluations the later row wins, whichever commits last
    metric_id: Mapped[int] = mapped_column(Integer)


class Alias(OrmBase):
    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("adapter_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"), index=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    adapter: Mapped[Adapter] = relationship(back_populates="aliases")
    version: Mapped[Version] = relationship()


class AliasEvent(OrmBase):
    """History of alias moves; version_number None = removed."""

    __tablename__ = "alias_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), index=True)
    alias: Mapped[str] = mapped_column(String(64))
    version_number: Mapped[int | None] = mapped_column(Integer)
    actor: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Token(OrmBase):
    """An API token; only the sha256 of its secret is stored."""

    __tablename__ = "tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    scope: Mapped[str] = mapped_column(String(16))
    namespaces: Mapped[list[str]] = mapped_column(JSON, default=list)
    description: Mapped[str | None] = mapped_column(String(256))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Export(OrmBase):
    """A merge request (base weights, weighted adapter versions by name and number, dtype) and its result.

    ``request_digest`` is the sha256 of the canonical request, which names the input versions: an
    identical request is answered from this record, and two namespaces never share one.
    ``content_digest`` is the same without the names: a request whose inputs have the same bytes as
    a finished record gets its own record with that record's result files (no second merge).
    Workers claim queued jobs (or running ones whose lease expired).
    """

    __tablename__ = "exports"
    __table_args__ = (
        digest_check("request_digest"),
        digest_check("content_digest"),
        CheckConstraint("state IN ('queued', 'running', 'done', 'failed')", name="state_valid"),
        Index("ix_exports_state_created", "state", "created_at"),
        Index("ix_exports_requested_by_state", "requested_by", "state"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    request_digest: Mapped[str] = mapped_column(String(DIGEST_LEN), unique=True)
    content_digest: Mapped[str] = mapped_column(String(DIGEST_LEN), index=True)
    # the token that queued the job (None: before 0005): read tokens have a bound on queued jobs
    requested_by: Mapped[str | None] = mapped_column(String(32))
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id", ondelete="RESTRICT"), index=True)
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    dtype: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default="queued")
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    loreg_version: Mapped[str] = mapped_column(String(64))
    device: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    inputs: Mapped[list[ExportInput]] = relationship(passive_deletes=True, order_by="ExportInput.position")
    files: Mapped[list[ExportFile]] = relationship(passive_deletes=True, order_by="ExportFile.path")


class ExportInput(OrmBase):
    """Lineage: which adapter version (with which weight) went into an export.

    ``name`` (``ns/name:N``) outlives the version: who may read the export is decided by it, so a
    deleted input still fails closed. None only for a version deleted before 0005 stored names:
    such an export is readable by tokens that cover every namespace.
    """

    __tablename__ = "export_inputs"

    export_id: Mapped[str] = mapped_column(ForeignKey("exports.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int | None] = mapped_column(ForeignKey("versions.id", ondelete="SET NULL"), index=True)
    name: Mapped[str | None] = mapped_column(String(160))
    manifest_digest: Mapped[str] = mapped_column(String(DIGEST_LEN))
    weight: Mapped[float] = mapped_column(Float)


class ExportFile(OrmBase):
    __tablename__ = "export_files"
    __table_args__ = (digest_check("digest"),)

    export_id: Mapped[str] = mapped_column(ForeignKey("exports.id", ondelete="CASCADE"), primary_key=True)
    path: Mapped[str] = mapped_column(String(256), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    digest: Mapped[str] = mapped_column(ForeignKey("blobs.digest", ondelete="RESTRICT"), index=True)


class Combination(OrmBase):
    """A request to combine adapter versions into the next version of ``target`` (``ns/name``), and its result.

    ``request_digest`` is the sha256 of the canonical request (inputs by name and manifest digest,
    method, every parameter canonicalized, target, aliases): an identical request is answered from
    this record. ``version_id`` is the pushed version; its lineage is this row (``made_by``).
    """

    __tablename__ = "combinations"
    __table_args__ = (
        digest_check("request_digest"),
        CheckConstraint("state IN ('queued', 'running', 'done', 'failed')", name="state_valid"),
        Index("ix_combinations_state_created", "state", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    request_digest: Mapped[str] = mapped_column(String(DIGEST_LEN), unique=True)
    requested_by: Mapped[str | None] = mapped_column(String(32))
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id", ondelete="RESTRICT"), index=True)
    target: Mapped[str] = mapped_column(String(160))
    aliases: Mapped[list[str]] = mapped_column(JSON, default=list)
    method: Mapped[str] = mapped_column(String(32))
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    version_id: Mapped[int | None] = mapped_column(ForeignKey("versions.id", ondelete="SET NULL"), index=True)
    result_name: Mapped[str | None] = mapped_column(String(160))  # ``ns/name:N``, kept after a delete
    state: Mapped[str] = mapped_column(String(16), default="queued")
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    loreg_version: Mapped[str] = mapped_column(String(64))
    device: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())

    inputs: Mapped[list[CombinationInput]] = relationship(
        passive_deletes=True, order_by="CombinationInput.position"
    )


class CombinationInput(OrmBase):
    """Lineage: which adapter version (with which weight) went into a combination; ``name`` outlives it."""

    __tablename__ = "combination_inputs"

    combination_id: Mapped[str] = mapped_column(ForeignKey("combinations.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int | None] = mapped_column(ForeignKey("versions.id", ondelete="SET NULL"), index=True)
    name: Mapped[str] = mapped_column(String(160))
    manifest_digest: Mapped[str] = mapped_column(String(DIGEST_LEN))
    weight: Mapped[float] = mapped_column(Float)
