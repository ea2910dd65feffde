"""Adapters and versions: push (commit), resolve, list, aliases, metrics, delete."""

from __future__ import annotations

import base64
import itertools
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from loreg.registry.api.schemas import (
    AdapterPublic,
    AliasEventPublic,
    AliasPublic,
    BaseRef,
    FilePublic,
    MetricPublic,
    Page,
    VersionCreate,
    VersionPublic,
    VersionSummary,
    VersionValidation,
)
from loreg.registry.db.models import (
    Adapter,
    AdapterBlob,
    Alias,
    AliasEvent,
    Blob,
    BlobScan,
    Metric,
    Version,
    VersionFile,
    VersionTarget,
)
from loreg.registry.db.models import BaseModel as BaseModelRow
from loreg.registry.errors import (
    AdapterNotFoundError,
    AliasNotFoundError,
    BlobMissingError,
    BlobNotFoundError,
    ConfigTooLargeError,
    ConflictError,
    DigestAmbiguousError,
    FileNotStoredError,
    LoregError,
    ManifestInvalidError,
    NonFiniteValuesError,
    RequestInvalidError,
    VersionNotFoundError,
)
from loreg.registry.faults import crash_point
from loreg.registry.formats import names, peft, safetensors
from loreg.registry.formats.fingerprint import manifest_digest
from loreg.registry.services.context import Registry

log = logging.getLogger(__name__)

COMMIT_ATTEMPTS = 8


@dataclass(frozen=True)
class LookupFilters:
    namespace: str | None = None
    name: str | None = None
    base_ids: tuple[int, ...] | None = None
    layout_base_ids: tuple[int, ...] | None = None
    target: str | None = None
    min_rank: int | None = None
    max_rank: int | None = None
    dora: bool | None = None
    task_type: str | None = None
    metric: str | None = None
    metric_min: float | None = None
    metric_max: float | None = None
    order: str | None = None  # None: default_order(metric)
    q: str | None = None
    latest_only: bool = True
    # the caller's token globs ("team-a/*"): filtered in SQL, so pages and cursors reveal nothing else
    allowed: tuple[str, ...] | None = None


def _glob_to_like(glob: str) -> str:
    """A token namespace glob (``team-a``, ``team-a/*``, ``team-*/bot``) as a SQL LIKE pattern."""
    if "/" not in glob:
        glob = f"{glob}/*"
    escaped = glob.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%")


def _encode_cursor(values: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str, *, by_metric: bool) -> list[Any]:
    """A cursor is the sort key of the last row handed out: ``[id]``, or by a metric
    ``[true, value, id]`` for a row with the metric and ``[false, null, id]`` for one without (those
    sort last, by id), so a page boundary may fall anywhere, the null boundary included."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        values = json.loads(raw)
    except (ValueError, TypeError) as exc:
        raise RequestInvalidError("invalid cursor") from exc
    if not isinstance(values, list) or not values or not _row_id(values[-1]):
        raise RequestInvalidError("invalid cursor")
    if by_metric:
        fits = len(values) == 3 and (
            (values[0] is True and _finite(values[1])) or (values[0] is False and values[1] is None)
        )
    else:
        fits = len(values) == 1
    if not fits:
        raise RequestInvalidError("cursor does not fit this query", hint="start again without cursor")
    return values


# a cursor's numbers reach the database as parameters: a mistyped or overflowing one would be a
# DataError on Postgres (a 500), so only row ids in range and finite metric values pass
def _row_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def _finite(value: Any) -> bool:
    return _row_id(value) or (isinstance(value, float) and math.isfinite(value))


def default_order(metric: str | None) -> str:
    """The order when none is asked for (the CLI's too): by a metric whose name contains ``loss``,
    ascending (lower is better); by any other metric, and newest first without one, descending."""
    return "asc" if metric and "loss" in metric.lower() else "desc"


def latest_metrics(version: Version) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in version.metrics:  # ordered by id: later evaluations win
        out[m.key] = m.value
    return out


def base_ref(base: BaseModelRow | None) -> BaseRef | None:
    if base is None:
        return None
    labels = [f"{n.name}@{n.revision}" if n.revision else n.name for n in base.names]
    return BaseRef(weights_digest=base.weights_digest, layout_digest=base.layout_digest, names=labels)


class AdapterService:
    """Use cases on adapters and their immutable versions. Each method owns its transaction."""

    def __init__(self, registry: Registry, *, validator: Callable[..., Any] | None = None):
        self.registry = registry
        # base-model validation hook: (session, config, header, facts, requested_base) -> (base_row, report)
        self.validator = validator

    # --- push ---------------------------------------------------------------------------------

    def push(self, namespace: str, name: str, body: VersionCreate, *, actor: str | None = None) -> VersionPublic:
        """Commit a version from already uploaded blobs.

        Identical files (same manifest digest) return the existing version (``created`` False).

        Raises:
            NameInvalidError, ManifestInvalidError, BlobMissingError, CONFIG_* / header / shape errors.
        """
        names.check_name(namespace, name)
        settings = self.registry.settings
        files = self._check_files(body)
        aliases = [names.check_alias(a) for a in dict.fromkeys(body.aliases)]
        store = self.registry.store
        digest = manifest_digest((f.path, f.size, f.digest) for f in files.values())
        existing = self._existing(namespace, name, digest, aliases, actor)
        if existing is not None:
            return existing

        self._check_linked(namespace, name, files.values())
        for f in files.values():
            try:
                stat = store.stat(f.digest)
            except BlobNotFoundError as exc:
                raise _not_linked(namespace, name, f.path, f.digest) from exc
            if stat.size != f.size:
                raise ManifestInvalidError(
                    f"{f.path}: declared size {f.size} but the blob has {stat.size} bytes",
                    detail={"path": f.path, "expected": stat.size, "actual": f.size},
                )

        cfg_entry = files["adapter_config.json"]
        if cfg_entry.size > settings.max_config_size:
            raise ConfigTooLargeError(
                f"adapter_config.json is {cfg_entry.size} bytes, over the limit of {settings.max_config_size}",
                detail={"limit": settings.max_config_size},
            )
        config = peft.parse_adapter_config(
            store.read_range(cfg_entry.digest, 0, cfg_entry.size), max_size=settings.max_config_size
        )
        st_entry = files["adapter_model.safetensors"]
        header = safetensors.read_header(
            lambda s, e: store.read_range(st_entry.digest, s, e),
            st_entry.size,
            max_header_size=settings.max_header_size,
        )
        warnings = self._scan_values(st_entry.digest, header)
        facts = peft_facts(config, header)

        base_row_id: int | None = None
        base_mapping: dict[str, Any] | None = None
        if self.validator is not None:
            base_row_id, report = self.validator(config, header, facts, body.base, body.base_source)
            facts = report.get("facts", facts)
            warnings.extend(report.get("warnings", []))
            base_mapping = report.get("mapping")

        for attempt in range(COMMIT_ATTEMPTS):
            try:
                with self.registry.sessions.begin() as session:
                    adapter = self._lock_adapter(session, namespace, name)
                    existing = session.scalar(
                        select(Version).where(Version.adapter_id == adapter.id, Version.manifest_digest == digest)
                    )
                    if existing is not None:
                        for alias in aliases:
                            self._move_alias(session, adapter, alias, existing, actor)
                        created = False
                        version_id = existing.id
                    else:
                        self._touch_blobs(session, [f.digest for f in files.values()], link=(namespace, name))
                        adapter.last_number += 1
                        version = Version(
                            adapter_id=adapter.id,
                            number=adapter.last_number,
                            manifest_digest=digest,
                            message=body.message,
                            size=sum(f.size for f in files.values()),
                            config=config.raw,
                            facts=facts,
                            warnings=warnings,
                            rank_min=min(facts["ranks"]) if facts["ranks"] else 0,
                            rank_max=max(facts["ranks"]) if facts["ranks"] else 0,
                            use_dora=bool(facts.get("use_dora")),
                            task_type=facts.get("task_type"),
                            base_model_id=base_row_id,
                            base_mapping=base_mapping,
                        )
                        session.add(version)
                        session.flush()
                        session.add_all(
                            VersionFile(version_id=version.id, path=f.path, size=f.size, digest=f.digest)
                            for f in files.values()
                        )
                        session.add_all(
                            VersionTarget(version_id=version.id, target=t) for t in sorted(set(facts["targets"]))
                        )
                        session.add_all(Metric(version_id=version.id, key=k, value=v) for k, v in body.metrics.items())
                        session.flush()
                        for alias in aliases:
                            self._move_alias(session, adapter, alias, version, actor)
                        created = True
                        version_id = version.id
                break
            except IntegrityError:
                # the loser of an insert race (same adapter created, same manifest pushed) retries
                # and then sees the winner's row
                log.debug("push %s/%s: integrity race, attempt %d", namespace, name, attempt + 1)
                if attempt == COMMIT_ATTEMPTS - 1:
                    raise ConflictError("concurrent pushes kept conflicting; retry") from None
        crash_point("after_commit")  # testing hook (registry/faults.py)
        with self.registry.sessions.begin() as session:
            out = self._public(session, session.get_one(Version, version_id))
        out.created = created
        return out

    def validate(
        self, namespace: str, name: str, config_bytes: bytes, header_prefix: bytes, file_size: int, base: str | None
    ) -> VersionValidation:
        """Validate an adapter from its config and safetensors header alone, before any upload:
        the same refusals (and warnings) the commit would give from these bytes; nothing is stored.
        The commit still re-checks the stored files (and their values, which a header cannot show).

        Raises:
            NameInvalidError, CONFIG_* / header / shape errors, BaseUnknownError.
        """
        names.check_name(namespace, name)
        settings = self.registry.settings
        config = peft.parse_adapter_config(config_bytes, max_size=settings.max_config_size)
        # with the file's size the parser checks the data section fills it exactly, as at commit
        header = safetensors.read_header(
            lambda s, e: header_prefix[s:e], file_size, max_header_size=settings.max_header_size
        )
        facts = peft_facts(config, header)
        warnings: list[Any] = []
        base_out: BaseRef | None = None
        if self.validator is not None:
            base_row_id, report = self.validator(config, header, facts, base)
            facts = report.get("facts", facts)
            warnings.extend(report.get("warnings", []))
            with self.registry.sessions.begin() as session:
                row = session.get(BaseModelRow, base_row_id, options=[selectinload(BaseModelRow.names)])
                base_out = base_ref(row)
        return VersionValidation(base=base_out, facts=facts, warnings=warnings)

    def _existing(
        self, namespace: str, name: str, digest: str, aliases: list[str], actor: str | None
    ) -> VersionPublic | None:
        """The version with these exact files, if stored (a re-push): aliases move, nothing else."""
        with self.registry.sessions.begin() as session:
            version = session.scalar(
                select(Version)
                .join(Adapter, Adapter.id == Version.adapter_id)
                .where(Adapter.namespace == namespace, Adapter.name == name, Version.manifest_digest == digest)
            )
            if version is None:
                return None
            if aliases:
                adapter = self._lock_adapter(session, namespace, name)
                for alias in aliases:
                    self._move_alias(session, adapter, alias, version, actor)
                session.flush()
            out = self._public(session, version)
        out.created = False
        return out

    def _check_files(self, body: VersionCreate) -> dict[str, Any]:
        limit = self.registry.settings.max_files_per_version
        if len(body.files) > limit:
            raise ManifestInvalidError(f"a version holds at most {limit} files", detail={"limit": limit})
        files: dict[str, Any] = {}
        for f in body.files:
            names.check_adapter_file(f.path, f.size, max_card_size=self.registry.settings.max_card_size)
            if f.path in files:
                raise ManifestInvalidError(f"file {f.path} is listed twice", detail={"path": f.path})
            if f.size > self.registry.settings.max_file_size:
                raise ManifestInvalidError(f"{f.path} is over the file size limit", detail={"path": f.path})
            files[f.path] = f
        for required in names.REQUIRED_FILES:
            if required not in files:
                raise ManifestInvalidError(
                    f"a PEFT adapter needs {required}",
                    detail={"missing": required},
                    hint="push the folder written by model.save_pretrained()",
                )
        return dict(sorted(files.items()))

    def _scan_values(self, digest: str, header: safetensors.Header) -> list[dict[str, Any]]:
        bad: list[dict[str, Any]] = []
        zero_b: list[str] = []
        with self.registry.sessions.begin() as session:
            scan = session.get(BlobScan, digest)
            facts = (scan.header_size, dict(scan.nonfinite), list(scan.zero)) if scan is not None else None
        if facts is not None and facts[0] == header.header_size:
            # scanned while the upload streamed through: no second read of the file
            bad = [{"key": k, "nonfinite": n} for k, n in facts[1].items()]
            zero_b = [k for k in facts[2] if ".lora_B." in k or k.endswith(".lora_embedding_B")]
        else:
            bad, zero_b = self._read_and_scan(digest, header)
        return self._value_verdict(header, bad, zero_b)

    def _read_and_scan(self, digest: str, header: safetensors.Header) -> tuple[list[dict[str, Any]], list[str]]:
        bad: list[dict[str, Any]] = []
        zero_b: list[str] = []
        # one streamed read of the data section (one request on S3), split at tensor boundaries
        with self.registry.store.open(digest, header.data_offset, header.file_size) as stream:
            position = 0
            for tensor in header.tensors.values():
                if tensor.start > position:
                    _skip(stream, tensor.start - position)
                    position = tensor.start
                if tensor.dtype not in safetensors.FLOAT_DTYPES:
                    continue  # the validator refuses non-float LoRA tensors with a precise error
                stats = safetensors.scan_values(_read_chunks(stream, tensor.end - tensor.start), tensor.dtype)
                position = tensor.end
                if stats.nonfinite:
                    bad.append({"key": tensor.name, "nonfinite": stats.nonfinite})
                elif stats.all_zero and (".lora_B." in tensor.name or tensor.name.endswith(".lora_embedding_B")):
                    zero_b.append(tensor.name)
        return bad, zero_b

    def _value_verdict(
        self, header: safetensors.Header, bad: list[dict[str, Any]], zero_b: list[str]
    ) -> list[dict[str, Any]]:
        if bad:
            raise NonFiniteValuesError(
                f"{len(bad)} tensor(s) hold NaN or infinite values, e.g. {bad[0]['key']}",
                detail={"problems": bad},
                hint="the training diverged; push a checkpoint from before the loss became NaN",
            )
        warnings: list[dict[str, Any]] = []
        if zero_b and len(zero_b) == sum(
            1 for t in header.tensors if ".lora_B." in t or t.endswith(".lora_embedding_B")
        ):
            warnings.append(
                {
                    "code": "ZERO_LORA_B",
                    "message": "every lora_B is all zeros: the adapter does not change the model",
                    "keys": zero_b[:20],
                }
            )
        elif zero_b:
            warnings.append(
                {"code": "ZERO_LORA_B", "message": f"{len(zero_b)} lora_B tensor(s) are all zeros", "keys": zero_b[:20]}
            )
        return warnings

    def _lock_adapter(self, session: Session, namespace: str, name: str) -> Adapter:
        adapter = session.scalar(
            select(Adapter).where(Adapter.namespace == namespace, Adapter.name == name).with_for_update()
        )
        if adapter is None:
            adapter = Adapter(namespace=namespace, name=name, last_number=0)
            session.add(adapter)
            session.flush()
        return adapter

    def _check_linked(self, namespace: str, name: str, files: Any) -> None:
        """Refuse a manifest naming a blob not linked to this adapter. Stored elsewhere or not at
        all gets the same answer, so a commit cannot probe what other adapters hold."""
        wanted = {f.digest: f.path for f in files}
        with self.registry.sessions.begin() as session:
            linked = set(
                session.scalars(
                    select(AdapterBlob.digest).where(
                        AdapterBlob.namespace == namespace, AdapterBlob.name == name, AdapterBlob.digest.in_(wanted)
                    )
                )
            )
        for digest, path in wanted.items():
            if digest not in linked:
                raise _not_linked(namespace, name, path, digest)

    def _touch_blobs(self, session: Session, digests: list[str], *, link: tuple[str, str] | None = None) -> None:
        # Inside the commit's transaction: a blob row GC removed meanwhile fails here (and the FK),
        # and the touch keeps GC (which only takes blobs unseen for the grace period) away.
        if link is not None:
            linked = set(
                session.scalars(
                    select(AdapterBlob.digest).where(
                        AdapterBlob.namespace == link[0], AdapterBlob.name == link[1], AdapterBlob.digest.in_(digests)
                    )
                )
            )
            unlinked = sorted(set(digests) - linked)
            if unlinked:
                raise _not_linked(link[0], link[1], None, unlinked[0])
        found = session.execute(
            update(Blob).where(Blob.digest.in_(digests)).values(last_seen_at=datetime.now(UTC))
        ).rowcount
        if found != len(set(digests)):
            missing = sorted(set(digests) - set(session.scalars(select(Blob.digest).where(Blob.digest.in_(digests)))))
            raise BlobMissingError("blobs vanished before the commit; upload them again", detail={"missing": missing})

    # --- resolve / read -----------------------------------------------------------------------

    def _adapter(self, session: Session, namespace: str, name: str) -> Adapter:
        names.check_name(namespace, name)
        adapter = session.scalar(select(Adapter).where(Adapter.namespace == namespace, Adapter.name == name))
        if adapter is None:
            raise AdapterNotFoundError(
                f"adapter {namespace}/{name} does not exist",
                detail={"name": f"{namespace}/{name}"},
                hint=f"list what exists: loreg ls {namespace}",
            )
        return adapter

    def _resolve(self, session: Session, namespace: str, name: str, tag: str) -> Version:
        adapter = self._adapter(session, namespace, name)
        tag = names.check_tag(tag)
        query = select(Version).where(Version.adapter_id == adapter.id)
        ref = f"{namespace}/{name}"
        if tag == "latest":
            version = session.scalar(query.order_by(Version.number.desc()).limit(1))
            if version is None:
                raise VersionNotFoundError(f"{ref} has no versions", detail={"name": ref})
            return version
        if tag.startswith("sha256:"):
            version = one_by_digest(
                session.scalars(query.where(digest_matches(Version.manifest_digest, tag)).order_by(Version.number)),
                tag,
                lambda v: {"version": f"{ref}:{v.number}", "digest": v.manifest_digest},
            )
        elif tag.isdigit():
            version = session.scalar(query.where(Version.number == int(tag)))
        else:
            alias = session.scalar(select(Alias).where(Alias.adapter_id == adapter.id, Alias.name == tag))
            if alias is None:
                known = sorted(session.scalars(select(Alias.name).where(Alias.adapter_id == adapter.id)))
                raise AliasNotFoundError(
                    f"{ref} has no alias {tag!r}",
                    detail={"name": ref, "alias": tag, "aliases": known},
                    hint=f"aliases of {ref}: {', '.join(known)}" if known else f"set one: loreg alias set {ref}:N {tag}",
                )
            version = session.get(Version, alias.version_id)
        if version is None:
            raise VersionNotFoundError(f"{ref} has no version {tag}", detail={"name": ref, "version": tag})
        return version

    def get(self, namespace: str, name: str, tag: str = "latest") -> VersionPublic:
        with self.registry.sessions.begin() as session:
            return self._public(session, self._resolve(session, namespace, name, tag))

    def get_many(self, refs: list[names.Reference]) -> list[VersionPublic | LoregError]:
        """Each reference's version, or the error a lookup of it alone raises (one session for the
        batch; an alias moved meanwhile changes the ETag of the next batch, so the follower sees it then)."""
        out: list[VersionPublic | LoregError] = []
        with self.registry.sessions.begin() as session:
            for r in refs:
                try:
                    out.append(self._public(session, self._resolve(session, r.namespace, r.name, r.tag)))
                except LoregError as exc:
                    out.append(exc)
        return out

    def file_entry(self, namespace: str, name: str, tag: str, path: str) -> FilePublic:
        names.check_file_name(path)
        with self.registry.sessions.begin() as session:
            version = self._resolve(session, namespace, name, tag)
            row = session.get(VersionFile, (version.id, path))
            if row is None:
                raise FileNotStoredError(
                    f"{namespace}/{name}:{version.number} has no file {path}", detail={"path": path}
                )
            return FilePublic(path=row.path, size=row.size, digest=row.digest)

    def adapter(self, namespace: str, name: str) -> AdapterPublic:
        with self.registry.sessions.begin() as session:
            adapter = self._adapter(session, namespace, name)
            versions = session.scalars(
                select(Version)
                .where(Version.adapter_id == adapter.id)
                .order_by(Version.number.desc())
                .options(selectinload(Version.metrics), selectinload(Version.base_model))
            ).all()
            alias_map = self._alias_map(session, [v.id for v in versions])
            return AdapterPublic(
                name=adapter.full_name,
                created_at=adapter.created_at,
                latest=versions[0].number if versions else None,
                aliases={a: v.number for v in versions for a in alias_map.get(v.id, [])},
                versions=[self._summary(v, adapter, alias_map.get(v.id, [])) for v in versions],
            )

    def versions(self, namespace: str, name: str, *, cursor: str | None = None, limit: int = 50) -> Page[VersionSummary]:
        """An adapter's versions, newest first, a page at a time (the cursor is the last number)."""
        limit = max(1, min(limit, 500))
        with self.registry.sessions.begin() as session:
            adapter = self._adapter(session, namespace, name)
            query = select(Version).where(Version.adapter_id == adapter.id)
            if cursor:
                query = query.where(Version.number < _decode_cursor(cursor, by_metric=False)[0])
            rows = session.scalars(
                query.order_by(Version.number.desc())
                .limit(limit + 1)
                .options(selectinload(Version.metrics), selectinload(Version.base_model))
            ).all()
            page = rows[:limit]
            alias_map = self._alias_map(session, [v.id for v in page])
            return Page[VersionSummary](
                items=[self._summary(v, adapter, alias_map.get(v.id, [])) for v in page],
                next_cursor=_encode_cursor([page[-1].number]) if len(rows) > limit else None,
            )

    def _alias_map(self, session: Session, version_ids: list[int]) -> dict[int, list[str]]:
        out: dict[int, list[str]] = {}
        if not version_ids:
            return out
        for alias in session.scalars(select(Alias).where(Alias.version_id.in_(version_ids)).order_by(Alias.name)):
            out.setdefault(alias.version_id, []).append(alias.name)
        return out

    def _summary(self, v: Version, adapter: Adapter, aliases: list[str], match: str | None = None) -> VersionSummary:
        facts = v.facts
        return VersionSummary(
            name=adapter.full_name,
            version=v.number,
            digest=v.manifest_digest,
            size=v.size,
            created_at=v.created_at,
            rank=v.rank_max,
            lora_alpha=facts.get("lora_alpha"),
            target_modules=sorted(facts.get("targets", [])),
            task_type=v.task_type,
            use_dora=v.use_dora,
            base=base_ref(v.base_model),
            metrics=latest_metrics(v),
            aliases=aliases,
            warnings=v.warnings,
            match=match,  # type: ignore[arg-type]
        )

    def _public(self, session: Session, v: Version) -> VersionPublic:
        adapter = session.get_one(Adapter, v.adapter_id)
        aliases = self._alias_map(session, [v.id]).get(v.id, [])
        return VersionPublic(
            name=adapter.full_name,
            version=v.number,
            digest=v.manifest_digest,
            size=v.size,
            message=v.message,
            created_at=v.created_at,
            files=[FilePublic(path=f.path, size=f.size, digest=f.digest) for f in v.files],
            config=v.config,
            facts=v.facts,
            warnings=v.warnings,
            metrics=latest_metrics(v),
            metrics_history=[MetricPublic(key=m.key, value=m.value, created_at=m.created_at) for m in v.metrics],
            aliases=aliases,
            base=base_ref(v.base_model),
        )

    # --- lookup -------------------------------------------------------------------------------

    def lookup(self, filters: LookupFilters, *, cursor: str | None = None, limit: int = 50) -> Page[VersionSummary]:
        """Versions matching every filter, newest first (or by a metric's latest value), paginated.

        With ``latest_only`` each adapter contributes only its newest matching version.
        """
        limit = max(1, min(limit, 500))
        v = Version
        conds = []
        if filters.namespace is not None:
            names.check_name_part(filters.namespace, "namespace")
            conds.append(Adapter.namespace == filters.namespace)
        if filters.name is not None:
            conds.append(Adapter.name == filters.name)
        if filters.allowed:
            full = Adapter.namespace + "/" + Adapter.name
            conds.append(or_(*[full.like(_glob_to_like(g), escape="\\") for g in filters.allowed]))
        base_ids = filters.base_ids
        if base_ids is not None:
            all_ids = tuple(base_ids) + tuple(filters.layout_base_ids or ())
            conds.append(v.base_model_id.in_(all_ids or (-1,)))
        if filters.target:
            conds.append(
                v.id.in_(select(VersionTarget.version_id).where(VersionTarget.target == filters.target))
            )
        if filters.min_rank is not None:
            conds.append(v.rank_min >= filters.min_rank)
        if filters.max_rank is not None:
            conds.append(v.rank_max <= filters.max_rank)
        if filters.dora is not None:
            conds.append(v.use_dora.is_(filters.dora))
        if filters.task_type:
            conds.append(v.task_type == filters.task_type)
        if filters.q:
            needle = filters.q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            pattern = f"%{needle.lower()}%"
            conds.append(
                func.lower(Adapter.namespace + "/" + Adapter.name + " " + func.coalesce(v.message, "")).like(
                    pattern, escape="\\"
                )
            )
        bounds = {k: x for k, x in (("metric_min", filters.metric_min), ("metric_max", filters.metric_max)) if x is not None}
        if bounds and not filters.metric:
            raise RequestInvalidError(
                f"{' and '.join(bounds)} bound a metric, but no metric is named",
                detail={"fields": sorted(bounds)},
                hint="name it: ?metric=eval_loss&metric_max=1.0 (loreg ls --sort-by eval_loss)",
            )
        if not all(math.isfinite(x) for x in bounds.values()):
            raise RequestInvalidError("metric_min and metric_max must be finite numbers", detail={"fields": sorted(bounds)})
        metric_value = None
        if filters.metric:
            metric_value = (
                select(Metric.value)
                .where(Metric.version_id == v.id, Metric.key == filters.metric)
                .order_by(Metric.id.desc())
                .limit(1)
                .correlate(v)
                .scalar_subquery()
            )
            # bounds filter; sorting alone does not: versions without the metric come last
            if filters.metric_min is not None:
                conds.append(metric_value >= filters.metric_min)
            if filters.metric_max is not None:
                conds.append(metric_value <= filters.metric_max)

        base_query = select(v.id.label("vid"), v.adapter_id.label("aid"), v.number.label("num")).join(
            Adapter, Adapter.id == v.adapter_id
        )
        if metric_value is not None:
            base_query = base_query.add_columns(metric_value.label("mv"))
        if conds:
            base_query = base_query.where(and_(*conds))
        if filters.latest_only:
            ranked = base_query.add_columns(
                func.row_number().over(partition_by=v.adapter_id, order_by=v.number.desc()).label("rn")
            ).subquery()
            outer = select(ranked).where(ranked.c.rn == 1)
        else:
            ranked = base_query.subquery()
            outer = select(ranked)
        desc = (filters.order or default_order(filters.metric)) != "asc"
        vid = ranked.c.vid

        def after(col: Any, value: Any) -> Any:
            return col < value if desc else col > value

        # Keyset order: (metric NULLS LAST, id), one direction, the same on SQLite and Postgres. The
        # cursor's condition is two plain ranges, over (value, id) and over the rows without a
        # value by id: the shape an index on the sort key serves, wherever the page boundary falls.
        if cursor:
            values = _decode_cursor(cursor, by_metric=metric_value is not None)
            if metric_value is None:
                outer = outer.where(after(vid, values[0]))
            else:
                mv = ranked.c.mv
                has, value, last_id = values
                if has:
                    outer = outer.where(or_(after(mv, value), and_(mv == value, after(vid, last_id)), mv.is_(None)))
                else:
                    outer = outer.where(mv.is_(None), after(vid, last_id))
        keys = [vid.desc() if desc else vid.asc()]
        if metric_value is not None:
            keys.insert(0, (ranked.c.mv.desc() if desc else ranked.c.mv.asc()).nulls_last())
        outer = outer.order_by(*keys).limit(limit + 1)

        with self.registry.sessions.begin() as session:
            rows = session.execute(outer).all()
            more = len(rows) > limit
            rows = rows[:limit]
            ids = [r.vid for r in rows]
            versions = {
                x.id: x
                for x in session.scalars(
                    select(Version)
                    .where(Version.id.in_(ids))
                    .options(selectinload(Version.metrics), selectinload(Version.adapter), selectinload(Version.base_model))
                )
            }
            alias_map = self._alias_map(session, ids)
            validated = set(base_ids or ())
            items = []
            for r in rows:
                ver = versions[r.vid]
                match = None
                if base_ids is not None:
                    match = "validated" if ver.base_model_id in validated else "layout"
                items.append(self._summary(ver, ver.adapter, alias_map.get(ver.id, []), match))
            next_cursor = None
            if more and rows:
                last = rows[-1]
                if metric_value is None:
                    next_cursor = _encode_cursor([last.vid])
                else:
                    next_cursor = _encode_cursor([False, None, last.vid] if last.mv is None else [True, last.mv, last.vid])
            return Page[VersionSummary](items=items, next_cursor=next_cursor)

    # --- aliases, metrics, delete -------------------------------------------------------------

    def _move_alias(self, session: Session, adapter: Adapter, alias: str, version: Version, actor: str | None) -> None:
        row = session.scalar(select(Alias).where(Alias.adapter_id == adapter.id, Alias.name == alias))
        if row is None:
            session.add(Alias(adapter_id=adapter.id, name=alias, version_id=version.id))
        elif row.version_id == version.id:
            return
        else:
            row.version_id = version.id
            row.updated_at = datetime.now(UTC)
        session.add(AliasEvent(adapter_id=adapter.id, alias=alias, version_number=version.number, actor=actor))

    def set_alias(self, namespace: str, name: str, alias: str, tag: str, *, actor: str | None = None) -> AliasPublic:
        names.check_alias(alias)
        with self.registry.sessions.begin() as session:
            adapter = self._adapter(session, namespace, name)
            session.scalar(select(Adapter).where(Adapter.id == adapter.id).with_for_update())
            version = self._resolve(session, namespace, name, tag)
            self._move_alias(session, adapter, alias, version, actor)
            session.flush()
            return self._alias_public(session, adapter, alias)

    def get_alias(self, namespace: str, name: str, alias: str) -> AliasPublic:
        names.check_alias(alias)
        with self.registry.sessions.begin() as session:
            adapter = self._adapter(session, namespace, name)
            out = self._alias_public(session, adapter, alias)
            if out.version is None and not out.history:
                raise AliasNotFoundError(f"{adapter.full_name} has no alias {alias!r}", detail={"alias": alias})
            return out

    def remove_alias(self, namespace: str, name: str, alias: str, *, actor: str | None = None) -> AliasPublic:
        names.check_alias(alias)
        with self.registry.sessions.begin() as session:
            adapter = self._adapter(session, namespace, name)
            row = session.scalar(select(Alias).where(Alias.adapter_id == adapter.id, Alias.name == alias))
            if row is None:
                raise AliasNotFoundError(f"{adapter.full_name} has no alias {alias!r}", detail={"alias": alias})
            session.delete(row)
            session.add(AliasEvent(adapter_id=adapter.id, alias=alias, version_number=None, actor=actor))
            session.flush()
            return self._alias_public(session, adapter, alias)

    def _alias_public(self, session: Session, adapter: Adapter, alias: str) -> AliasPublic:
        row = session.scalar(select(Alias).where(Alias.adapter_id == adapter.id, Alias.name == alias))
        number = session.get_one(Version, row.version_id).number if row is not None else None
        events = session.scalars(
            select(AliasEvent)
            .where(AliasEvent.adapter_id == adapter.id, AliasEvent.alias == alias)
            .order_by(AliasEvent.id.desc())
        ).all()
        return AliasPublic(
            name=adapter.full_name,
            alias=alias,
            version=number,
            history=[AliasEventPublic(version=e.version_number, actor=e.actor, created_at=e.created_at) for e in events],
        )

    def add_metrics(self, namespace: str, name: str, tag: str, metrics: dict[str, float]) -> VersionPublic:
        """Append evaluations; the version itself never changes."""
        with self.registry.sessions.begin() as session:
            version = self._resolve(session, namespace, name, tag)
            session.add_all(Metric(version_id=version.id, key=k, value=val) for k, val in metrics.items())
            session.flush()
            session.expire(version, ["metrics"])
            return self._public(session, version)

    def delete_version(self, namespace: str, name: str, tag: str) -> tuple[str, int]:
        """Delete a version: it stops resolving, its aliases go, its number is never given again."""
        with self.registry.sessions.begin() as session:
            version = self._resolve(session, namespace, name, tag)
            number, full = version.number, f"{namespace}/{name}"
            session.execute(delete(Alias).where(Alias.version_id == version.id))
            session.delete(version)
            return full, number

    def delete_adapter(self, namespace: str, name: str) -> tuple[str, list[int]]:
        """Delete every version of an adapter and its aliases. The adapter's counter stays, so a
        later push under the same name continues the numbering instead of reusing a number.

        Returns the name and the numbers deleted (oldest first).
        """
        with self.registry.sessions.begin() as session:
            adapter = self._adapter(session, namespace, name)
            # the push's lock: a concurrent push waits and then numbers after the deleted ones
            session.scalar(select(Adapter).where(Adapter.id == adapter.id).with_for_update())
            numbers = list(
                session.scalars(select(Version.number).where(Version.adapter_id == adapter.id).order_by(Version.number))
            )
            session.execute(delete(Alias).where(Alias.adapter_id == adapter.id))
            session.execute(delete(Version).where(Version.adapter_id == adapter.id))
            return adapter.full_name, numbers


MAX_CANDIDATES = 10


def digest_matches(column: Any, digest: str) -> Any:
    """A SQL condition: ``column`` is ``digest``, or starts with it when it is a short prefix."""
    if names.DIGEST.fullmatch(digest):
        return column == digest
    # a range rather than LIKE: Postgres uses the btree index for it under any collation; the
    # stored digests are lowercase hex, all below the prefix followed by "g"
    return and_(column >= digest, column < digest + "g")


def one_by_digest(rows: Any, digest: str, describe: Callable[[Any], dict[str, Any]]) -> Any:
    """The one row a (short) digest names, None when none; refuse a prefix that names several."""
    found = list(itertools.islice(rows, MAX_CANDIDATES + 1))
    if len(found) <= 1:
        return found[0] if found else None
    candidates = [describe(r) for r in found[:MAX_CANDIDATES]]
    more = " and more" if len(found) > MAX_CANDIDATES else ""
    raise DigestAmbiguousError(
        f"{digest} is the start of several digests: "
        + ", ".join(c.get("version") or c["digest"] for c in candidates) + more,
        detail={"digest": digest, "candidates": candidates},
        hint="give more hex digits of the digest",
    )


SCAN_CHUNK = 4 << 20


def _read_chunks(stream: Any, n: int) -> Any:
    while n > 0:
        chunk = stream.read(min(SCAN_CHUNK, n))
        if not chunk:
            raise ManifestInvalidError("the stored adapter file is shorter than its header says")
        n -= len(chunk)
        yield chunk


def _skip(stream: Any, n: int) -> None:
    for _ in _read_chunks(stream, n):
        pass


def _not_linked(namespace: str, name: str, path: str | None, digest: str) -> BlobMissingError:
    label = f"{path}: blob" if path else "blob"
    return BlobMissingError(
        f"{label} {digest} was not uploaded for {namespace}/{name}",
        detail={"path": path, "digest": digest, "name": f"{namespace}/{name}"},
        hint=f"upload it for this adapter (PUT /v1/adapters/{namespace}/{name}/blobs/{digest}) "
        "or mount it from an adapter you can read (POST …/blobs:mount); loreg push does this",
    )


def peft_facts(config: peft.AdapterConfig, header: safetensors.Header) -> dict[str, Any]:
    """The derived facts stored with a version (JSON-able)."""
    from loreg.registry.formats import validate

    facts = validate.describe_adapter(config, header).to_dict()
    return with_targets(facts)


def with_targets(facts: dict[str, Any]) -> dict[str, Any]:
    """Add ``targets``: the leaf names of the adapted modules (q_proj, c_attn, …), for lookup."""
    facts["targets"] = peft.leaf_targets(facts.get("modules", []))
    return facts
