"""Adapters and versions: push (commit), resolve, list, aliases, metrics, delete."""

from __future__ import annotations

import base64
import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    Float,
    Integer,
    String,
    and_,
    bindparam,
    case,
    cast,
    delete,
    exists,
    func,
    literal,
    null,
    or_,
    select,
    true,
    union,
    union_all,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, aliased, selectinload

from loreg.registry.db.models import (
    Adapter,
    AdapterBase,
    AdapterBlob,
    Alias,
    AliasEvent,
    BaseName,
    Blob,
    BlobScan,
    Combination,
    Metric,
    MetricLatest,
    UTCDateTime,
    Version,
    VersionFile,
    VersionTarget,
)
from loreg.registry.db.models import BaseModelRow
from loreg.registry.errors import (
    AliasNotFoundError,
    BlobMissingError,
    BlobNotFoundError,
    ConfigTooLargeError,
    FileNotStoredError,
    LoregError,
    ManifestInvalidError,
    NonFiniteValuesError,
    RequestInvalidError,
)
from loreg.registry.db.retry import in_transaction
from loreg.registry.faults import crash_point
from loreg.registry.formats import lora, names, peft, safetensors, values
from loreg.registry.formats.fingerprint import manifest_digest
from loreg.registry.services import resolve
from loreg.registry.services.context import AppContext
from loreg.registry.services.views import (
    AdapterView,
    AliasEventView,
    AliasView,
    BaseRefView,
    Listing,
    MetricView,
    StoredFile,
    ValidationView,
    VersionPushed,
    VersionSummaryView,
    VersionView,
    base_label,
    base_ref,
)




@dataclass(frozen=True)
class LookupFilters:
    namespace: str | None = None
    name: str | None = None
    # a base reference (name, name@revision, weights digest), resolved to base_ids in the lookup's transaction
    base: str | None = None
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


def _glob_to_like(part: str) -> str:
    """One part of a token namespace glob (``team-*``) as a SQL LIKE pattern."""
    escaped = part.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped.replace("*", "%")


def visible(allowed: tuple[str, ...]) -> Any:
    """The SQL condition "this adapter's ``ns/name`` matches one of the token's globs" (lookups, pages).

    Names and namespaces hold no ``/``, so a glob matches part by part: a part without ``*`` is an
    equality (``team-a/*`` is ``namespace = 'team-a'``, which the (namespace, name) index serves), a
    ``*`` part matches anything, and only a part with ``*`` among other characters needs a LIKE."""
    return or_(*[_glob_condition(_glob_parts(g), lambda _part, value: value) for g in allowed])


def _glob_parts(glob: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """A glob's namespace and name parts, each (kind, value): ("any", ""), ("eq", the part) or
    ("like", its LIKE pattern)."""
    if "/" not in glob:
        glob = f"{glob}/*"
    parts = []
    for part in glob.split("/", 1):
        if part == "*":
            parts.append(("any", ""))
        elif "*" not in part:
            parts.append(("eq", part))
        else:
            parts.append(("like", _glob_to_like(part)))
    return parts[0], parts[1]


def _glob_condition(parts: Any, value: Callable[[int, str], Any]) -> Any:
    """One glob's condition; ``value(i, v)`` gives part i's value in SQL (itself, or a bound parameter)."""
    conds = []
    for i, (column, (kind, part)) in enumerate(zip((Adapter.namespace, Adapter.name), parts, strict=True)):
        if kind == "eq":
            conds.append(column == value(i, part))
        elif kind == "like":
            conds.append(column.like(value(i, part), escape="\\"))
    return and_(true(), *conds)


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


@dataclass(frozen=True)
class _Shape:
    """What a lookup statement's structure depends on: which filters are set, and how, never their
    values, which are bound parameters (``_shape_and_params``). A statement is built once per shape:
    building one cost as much as running it."""

    namespace: bool
    name: bool
    globs: tuple[Any, ...]  # each token glob's parts' kinds (_glob_parts)
    base: bool
    target: bool
    min_rank: bool
    max_rank: bool
    dora: bool
    task_type: bool
    metric: bool
    metric_min: bool
    metric_max: bool
    q: bool
    latest_only: bool
    desc: bool
    cursor: str  # "" the first page; "id"; by a metric "value" (after a row with it) or "null"


def _shape_and_params(filters: LookupFilters, cursor: str | None, limit: int) -> tuple[_Shape, dict[str, Any]]:
    """The lookup's shape and its parameters' values; raises the filters' and the cursor's errors."""
    if filters.namespace is not None:
        names.check_name_part(filters.namespace, "namespace")
    _check_metric_bounds(filters)
    globs = [_glob_parts(g) for g in filters.allowed or ()]
    values: dict[str, Any] = {
        "namespace": filters.namespace, "name": filters.name, "target": filters.target or None,
        "min_rank": filters.min_rank, "max_rank": filters.max_rank, "dora": filters.dora,
        "task_type": filters.task_type or None, "metric": filters.metric or None,
        "metric_min": filters.metric_min, "metric_max": filters.metric_max,
        "q": _search_pattern(filters.q) if filters.q else None,
    }
    params = {k: v for k, v in values.items() if v is not None}
    params["limit"] = limit + 1
    if filters.base_ids is not None:
        params["base_ids"] = list(_all_base_ids(filters))
    for g, parts in enumerate(globs):
        for i, (kind, part) in enumerate(parts):
            if kind != "any":
                params[f"glob{g}_{i}"] = part
    by_metric = "metric" in params
    kind = ""
    if cursor:
        after = _decode_cursor(cursor, by_metric=by_metric)
        params["after_id"] = after[-1]
        kind = "id"
        if by_metric:
            kind = "value" if after[0] else "null"
            if after[0]:
                params["after_value"] = after[1]
    shape = _Shape(
        **{k: k in params for k in ("namespace", "name", "target", "min_rank", "max_rank", "dora", "task_type",
                                    "metric", "metric_min", "metric_max", "q")},
        globs=tuple(tuple(k for k, _v in parts) for parts in globs),
        base=filters.base_ids is not None,
        latest_only=filters.latest_only,
        desc=(filters.order or default_order(filters.metric)) != "asc",
        cursor=kind,
    )
    return shape, params


def _bound(name: str, type_: Any) -> Any:
    return bindparam(name, type_=type_)


def _filter_conditions(shape: _Shape) -> list[Any]:
    """The SQL conditions of every filter but the metric bounds and the text."""
    v = Version
    conds = _adapter_conditions(shape)
    if shape.base:
        conds.append(v.base_model_id.in_(bindparam("base_ids", expanding=True)))
    if shape.target:
        conds.append(v.id.in_(select(VersionTarget.version_id).where(VersionTarget.target == _bound("target", String))))
    if shape.min_rank:
        conds.append(v.rank_min >= _bound("min_rank", Integer))
    if shape.max_rank:
        conds.append(v.rank_max <= _bound("max_rank", Integer))
    if shape.dora:
        conds.append(v.use_dora == _bound("dora", Boolean))
    if shape.task_type:
        conds.append(v.task_type == _bound("task_type", String))
    return conds


# a search's own views of adapters and versions, beside the lookup's (made once: an alias of a
# mapped class proxies every column, which cost more than the rest of the statement)
_NAMED, _SAID = aliased(Adapter, name="named"), aliased(Version, name="said")


def _search_pattern(q: str) -> str:
    """``?q=`` as a LIKE pattern: the text anywhere, its wildcards taken literally, lowercased (names
    are lowercase and ``search_text`` is the lowercased message)."""
    needle = q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{needle.lower()}%"


def _search_condition() -> Any:
    """The versions ``?q=`` finds, for a lookup over all versions: those of adapters whose name holds
    the text, and those whose message does. Two sets of ids, each from its own table and index (a
    name is one row of adapters, not one per version), so neither side scans the other's table."""
    q = _bound("q", String)
    return Version.id.in_(
        union(
            select(_SAID.id).join(_NAMED, _NAMED.id == _SAID.adapter_id).where(_NAMED.search_name.like(q, escape="\\")),
            select(_SAID.id).where(_SAID.search_text.like(q, escape="\\")),
        )
    )


def _adapter_conditions(shape: _Shape) -> list[Any]:
    """The filters on the adapter alone (namespace, name, the token's globs)."""
    conds: list[Any] = []
    if shape.namespace:
        conds.append(Adapter.namespace == _bound("namespace", String))
    if shape.name:
        conds.append(Adapter.name == _bound("name", String))
    if shape.globs:
        conds.append(or_(*[
            _glob_condition(tuple((k, "") for k in kinds), lambda i, _v, g=g: _bound(f"glob{g}_{i}", String))
            for g, kinds in enumerate(shape.globs)
        ]))
    return conds


def _check_metric_bounds(filters: LookupFilters) -> None:
    bounds = {k: x for k, x in (("metric_min", filters.metric_min), ("metric_max", filters.metric_max)) if x is not None}
    if bounds and not filters.metric:
        raise RequestInvalidError(
            f"{' and '.join(bounds)} bound a metric, but no metric is named",
            detail={"fields": sorted(bounds)},
            hint="name it: ?metric=eval_loss&metric_max=1.0 (loreg ls --sort-by eval_loss)",
        )
    if not all(math.isfinite(x) for x in bounds.values()):
        raise RequestInvalidError("metric_min and metric_max must be finite numbers", detail={"fields": sorted(bounds)})


def _metric_value(shape: _Shape, conds: list[Any]) -> Any:
    """The named metric's latest value per version (from ``version_metrics_latest``), None without a metric;
    its bounds are appended to ``conds``. Sorting alone does not filter: versions without it come last."""
    if not shape.metric:
        return None
    # a probe of the (version_id, key) primary key per candidate: a join would let the planner hash
    # the key's whole column when the other filters are selective only together
    value = (
        select(MetricLatest.value)
        .where(MetricLatest.version_id == Version.id, MetricLatest.key == _bound("metric", String))
        .correlate(Version)
        .scalar_subquery()
    )
    if shape.metric_min:
        conds.append(value >= _bound("metric_min", Float))
    if shape.metric_max:
        conds.append(value <= _bound("metric_max", Float))
    return value


def _after_cursor(ranked: Any, kind: str, desc: bool) -> Any:
    """The rows after a cursor. Keyset order: (metric NULLS LAST, id), one direction, the same on
    SQLite and Postgres. The condition is two plain ranges, over (value, id) and over the rows
    without a value by id: the shape an index on the sort key serves, wherever the boundary falls."""

    def after(col: Any, value: Any) -> Any:
        return col < value if desc else col > value

    vid, last_id = ranked.c.vid, _bound("after_id", Integer)
    if kind == "id":
        return after(vid, last_id)
    mv = ranked.c.mv
    if kind == "value":
        value = _bound("after_value", Float)
        return or_(after(mv, value), and_(mv == value, after(vid, last_id)), mv.is_(None))
    return and_(mv.is_(None), after(vid, last_id))


def _add_metrics(session: Session, version_id: int, metrics: dict[str, float]) -> None:
    """Append evaluations and keep ``version_metrics_latest`` on each key's latest row (by id)."""
    rows = [Metric(version_id=version_id, key=k, value=val) for k, val in metrics.items()]
    if not rows:
        return
    session.add_all(rows)
    session.flush()
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    stmt = insert(MetricLatest).values(
        [{"version_id": version_id, "key": m.key, "value": m.value, "metric_id": m.id} for m in rows]
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=[MetricLatest.version_id, MetricLatest.key],
        set_={"value": stmt.excluded.value, "metric_id": stmt.excluded.metric_id},
        where=MetricLatest.metric_id < stmt.excluded.metric_id,
    )
    session.execute(stmt)


def _note_base(session: Session, base_id: int, adapter_id: int) -> None:
    """Record that the adapter has a version on this base (adapter_bases), once."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    session.execute(insert(AdapterBase).values(base_model_id=base_id, adapter_id=adapter_id).on_conflict_do_nothing())


def default_order(metric: str | None) -> str:
    """The order when none is asked for (the CLI's too): by a metric whose name contains ``loss``,
    ascending (lower is better); by any other metric, and newest first without one, descending."""
    return "asc" if metric and "loss" in metric.lower() else "desc"


def latest_metrics(version: Version) -> dict[str, float]:
    out: dict[str, float] = {}
    for m in version.metrics:  # ordered by id: later evaluations win
        out[m.key] = m.value
    return out


@functools.lru_cache(maxsize=512)
def _lookup_statement(shape: _Shape) -> Any:
    """One statement for a lookup page: the keyset page of version ids (newest matching version per
    adapter), joined afterwards with the columns a summary shows."""
    conds = _filter_conditions(shape)
    metric_value = _metric_value(shape, conds)
    if shape.latest_only and (shape.base or shape.q):
        ranked, outer = _newest_per_adapter(shape, conds)
    else:
        if shape.q:
            conds.append(_search_condition())
        ranked, outer = _ranked(shape, conds, metric_value)
    desc, by_metric = shape.desc, shape.metric
    if shape.cursor:
        outer = outer.where(_after_cursor(ranked, shape.cursor, desc))

    def keys(t: Any) -> list[Any]:
        out = [t.c.vid.desc() if desc else t.c.vid.asc()]
        if by_metric:
            out.insert(0, (t.c.mv.desc() if desc else t.c.mv.asc()).nulls_last())
        return out

    # the limit stays inside: only the page's rows are joined to the wide columns
    page = outer.order_by(*keys(ranked)).limit(_bound("limit", Integer)).subquery()
    joined = _head(full=False).join(page, page.c.vid == Version.id)
    if by_metric:
        joined = joined.add_columns(page.c.mv)
    return joined.order_by(*keys(page))


def _ranked(shape: _Shape, conds: list[Any], metric_value: Any) -> tuple[Any, Any]:
    """Every matching version, ranked by number within its adapter (a window) when only the newest
    counts: (the subquery with vid and, by a metric, mv; the select of the rows that count)."""
    query = select(Version.id.label("vid"), Version.adapter_id.label("aid"), Version.number.label("num")).join(
        Adapter, Adapter.id == Version.adapter_id
    )
    if metric_value is not None:
        query = query.add_columns(metric_value.label("mv"))
    if conds:
        query = query.where(and_(*conds))
    if not shape.latest_only:
        ranked = query.subquery()
        return ranked, select(ranked)
    ranked = query.add_columns(
        func.row_number().over(partition_by=Version.adapter_id, order_by=Version.number.desc()).label("rn")
    ).subquery()
    return ranked, select(ranked).where(ranked.c.rn == 1)


def _newest_per_adapter(shape: _Shape, conds: list[Any]) -> tuple[Any, Any]:
    """By base or by text: each candidate adapter names its newest matching version, one probe down
    its (adapter_id, number) index until a version matches. Candidates are the adapters with versions
    on the bases (adapter_bases) and, with ``q``, those whose name holds the text or that have a
    version whose message does. The work follows the candidate adapters, not all of their versions,
    and the answer is the window's."""

    def newest(*more: Any) -> Any:
        return (
            select(Version.id)
            .where(Version.adapter_id == Adapter.id, *conds, *more)
            .order_by(Version.number.desc())
            .limit(1)
            .correlate(Adapter)
            .scalar_subquery()
        )

    candidates = []
    if shape.base:
        on_base = select(AdapterBase.adapter_id).where(AdapterBase.base_model_id.in_(bindparam("base_ids", expanding=True)))
        candidates.append(Adapter.id.in_(on_base))
    vid = newest()
    if shape.q:
        q = _bound("q", String)
        candidates.append(Adapter.id.in_(union(
            select(_NAMED.id).where(_NAMED.search_name.like(q, escape="\\")),
            select(_SAID.adapter_id).where(_SAID.search_text.like(q, escape="\\")),
        )))
        # an adapter whose name matches answers its newest version as by base (every version
        # matches: the walk stops at the first); any other, its newest whose message matches
        vid = case((Adapter.search_name.like(q, escape="\\"), vid), else_=newest(Version.search_text.like(q, escape="\\")))
    # OFFSET 0 keeps the planner from inlining the subquery: each adapter's probe runs once, not once
    # per reference to its result (the filter, the metric, the sort)
    picked = select(vid.label("vid")).where(*candidates, *_adapter_conditions(shape)).offset(0).subquery()
    columns = [picked.c.vid]
    if shape.metric:
        columns.append(
            select(MetricLatest.value)
            .where(MetricLatest.version_id == picked.c.vid, MetricLatest.key == _bound("metric", String))
            .scalar_subquery()
            .label("mv")
        )
    ranked = select(*columns).where(picked.c.vid.is_not(None)).subquery()
    return ranked, select(ranked)


def _all_base_ids(filters: LookupFilters) -> tuple[int, ...]:
    return (tuple(filters.base_ids or ()) + tuple(filters.layout_base_ids or ())) or (-1,)


@functools.cache
def _head(*, full: bool) -> Any:
    """A version's own columns with its adapter's name and its base's digests (a summary's, or with
    ``full`` a whole version's); the base may be absent. Built once (statements are immutable):
    building it cost more than running it."""
    columns = [
        Version.id, Version.number, Version.manifest_digest, Version.size, Version.created_at, Version.rank_max,
        Version.facts, Version.task_type, Version.use_dora, Version.warnings, Version.base_model_id,
        Adapter.namespace, Adapter.name, BaseModelRow.weights_digest, BaseModelRow.layout_digest,
    ]
    if full:
        made = exists().where(Combination.version_id == Version.id).label("made")
        columns += [Version.message, Version.config, made]
    return (
        select(*columns)
        .join(Adapter, Adapter.id == Version.adapter_id)
        .outerjoin(BaseModelRow, BaseModelRow.id == Version.base_model_id)
    )


@functools.cache
def _version_query(kind: str) -> Any:
    """A whole version's row by ``ns``/``name`` and ``tag`` (``kind``: latest, number, digest, alias),
    built once per kind."""
    query = _head(full=True).where(Adapter.namespace == bindparam("ns"), Adapter.name == bindparam("name"))
    if kind == "latest":
        return query.order_by(Version.number.desc()).limit(1)
    if kind == "number":
        return query.where(Version.number == bindparam("tag", type_=Integer))
    if kind == "digest":
        return query.where(Version.manifest_digest == bindparam("tag", type_=String))
    on_alias = and_(Alias.adapter_id == Adapter.id, Alias.version_id == Version.id)
    return query.join(Alias, on_alias).where(Alias.name == bindparam("tag", type_=String))


@functools.cache
def _extras_query(*, bases: bool, files: bool) -> Any:
    """The one statement of ``_Extras.load`` (versions' ids in ``ids``, bases' in ``base_ids``), built
    once per shape. One column set for every kind: k the name, s its sort key (by the database's
    collation, as separate ORDER BYs would), n a number (metric row id, file size, base name id), d a
    string."""
    ids = bindparam("ids", expanding=True)
    no_value, no_time = cast(null(), Float), cast(null(), UTCDateTime())
    parts = [
        select(literal("m").label("kind"), Metric.version_id.label("owner"), Metric.key.label("k"),
               literal("").label("s"), Metric.id.label("n"), Metric.value.label("x"), Metric.created_at.label("at"),
               literal("").label("d"))
        .where(Metric.version_id.in_(ids)),
        select(literal("a"), Alias.version_id, Alias.name, Alias.name, literal(0), no_value, no_time, literal(""))
        .where(Alias.version_id.in_(ids)),
    ]
    if bases:
        parts.append(
            select(literal("b"), BaseName.base_model_id, BaseName.name, literal(""), BaseName.id, no_value,
                   no_time, BaseName.revision).where(BaseName.base_model_id.in_(bindparam("base_ids", expanding=True)))
        )
    if files:
        parts.append(
            select(literal("f"), VersionFile.version_id, VersionFile.path, VersionFile.path, VersionFile.size,
                   no_value, no_time, VersionFile.digest).where(VersionFile.version_id.in_(ids))
        )
    query = union_all(*parts)
    c = query.selected_columns
    return query.order_by(c.kind, c.owner, c.s, c.n)


@dataclass
class _Extras:
    """The rows a page of versions shows beside their own columns, read in one statement: files,
    metrics (in order: later evaluations win), aliases and the names of their bases."""

    files: dict[int, list[StoredFile]] = field(default_factory=dict)
    metrics: dict[int, list[MetricView]] = field(default_factory=dict)
    aliases: dict[int, list[str]] = field(default_factory=dict)
    base_names: dict[int, list[str]] = field(default_factory=dict)

    @classmethod
    def load(cls, session: Session, version_ids: list[int], base_ids: list[int], *, files: bool = False) -> _Extras:
        out = cls()
        if not version_ids:
            return out
        query = _extras_query(bases=bool(base_ids), files=files)
        params = {"ids": version_ids, "base_ids": base_ids} if base_ids else {"ids": version_ids}
        for r in session.execute(query, params):
            if r.kind == "m":
                out.metrics.setdefault(r.owner, []).append(MetricView(key=r.k, value=r.x, created_at=r.at))
            elif r.kind == "a":
                out.aliases.setdefault(r.owner, []).append(r.k)
            elif r.kind == "b":
                out.base_names.setdefault(r.owner, []).append(base_label(r.k, r.d))
            else:
                out.files.setdefault(r.owner, []).append(StoredFile(path=r.k, size=r.n, digest=r.d))
        return out

    def base(self, row: Any) -> BaseRefView | None:
        if row.base_model_id is None:
            return None
        return BaseRefView(row.weights_digest, row.layout_digest, self.base_names.get(row.base_model_id, []))


@dataclass(frozen=True)
class PushRequest:
    """A version to commit from blobs already uploaded for the adapter."""

    files: list[StoredFile]
    message: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)
    base: str | None = None  # a base reference; None: the config's base_model_name_or_path
    # how the client chose ``base``: "explicit", or "weights"/"layout" (matched by content)
    base_source: str | None = None


@dataclass(frozen=True)
class _Checked:
    """A push after every check that needs no transaction: what the commit writes."""

    files: dict[str, StoredFile]
    digest: str
    aliases: list[str]
    config: dict[str, Any]
    facts: dict[str, Any]
    warnings: list[dict[str, Any]]
    base_id: int | None
    base_mapping: dict[str, Any] | None


class AdapterService:
    """Use cases on adapters and their immutable versions. Each method owns its transaction."""

    def __init__(self, registry: AppContext, *, validator: Callable[..., Any] | None = None):
        self.registry = registry
        # base-model validation hook: (session, config, header, facts, requested_base) -> (base_row, report)
        self.validator = validator

    # --- push ---------------------------------------------------------------------------------

    def push(self, namespace: str, name: str, request: PushRequest, *, actor: str | None = None) -> VersionPushed:
        """Commit a version from already uploaded blobs.

        Identical files (same manifest digest) return the existing version (``created`` False).

        Raises:
            NameInvalidError, ManifestInvalidError, BlobMissingError, CONFIG_* / header / shape errors.
        """
        names.check_name(namespace, name)
        files = self._check_files(request.files)
        aliases = [names.check_alias(a) for a in dict.fromkeys(request.aliases)]
        digest = manifest_digest((f.path, f.size, f.digest) for f in files.values())
        existing = self._existing(namespace, name, digest, aliases, actor)
        if existing is not None:
            return VersionPushed(existing, created=False)
        checked = self._check_contents(namespace, name, request, files, digest, aliases)
        version_id, created = in_transaction(
            self.registry.sessions,
            lambda session: self._commit(session, namespace, name, checked, request, actor),
            what=f"push {namespace}/{name}",
        )
        crash_point("after_commit")  # testing hook (registry/faults.py)
        with self.registry.sessions.begin() as session:
            return VersionPushed(self._public(session, session.get_one(Version, version_id)), created)

    def _check_contents(
        self,
        namespace: str,
        name: str,
        request: PushRequest,
        files: dict[str, StoredFile],
        digest: str,
        aliases: list[str],
    ) -> _Checked:
        """Every check of a new version's blobs that needs no transaction: links and sizes, the
        config, the safetensors header and values, and the validation against the base."""
        settings, store = self.registry.settings, self.registry.store
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
        base_id: int | None = None
        mapping: dict[str, Any] | None = None
        if self.validator is not None:
            base_id, report = self.validator(config, header, facts, request.base, request.base_source)
            facts = report.get("facts", facts)
            warnings.extend(report.get("warnings", []))
            mapping = report.get("mapping")
        return _Checked(files, digest, aliases, config.raw, facts, warnings, base_id, mapping)

    def _commit(
        self, session: Session, namespace: str, name: str, checked: _Checked, request: PushRequest, actor: str | None
    ) -> tuple[int, bool]:
        """Insert the version under the adapter's row lock, or find the same files stored meanwhile
        (aliases move either way). Returns (version id, created). The loser of an insert race (same
        adapter created, same manifest pushed) raises IntegrityError here; run again (db/retry.py), it
        sees the winner's row."""
        adapter = self._lock_adapter(session, namespace, name)
        existing = session.scalar(
            select(Version).where(Version.adapter_id == adapter.id, Version.manifest_digest == checked.digest)
        )
        if existing is not None:
            for alias in checked.aliases:
                self._move_alias(session, adapter, alias, existing, actor)
            return existing.id, False
        files, facts = checked.files.values(), checked.facts
        self._touch_blobs(session, [f.digest for f in files], link=(namespace, name))
        adapter.last_number += 1
        version = Version(
            adapter_id=adapter.id,
            number=adapter.last_number,
            manifest_digest=checked.digest,
            message=request.message,
            size=sum(f.size for f in files),
            config=checked.config,
            facts=facts,
            warnings=checked.warnings,
            rank_min=min(facts["ranks"]) if facts["ranks"] else 0,
            rank_max=max(facts["ranks"]) if facts["ranks"] else 0,
            use_dora=bool(facts.get("use_dora")),
            task_type=facts.get("task_type"),
            base_model_id=checked.base_id,
            base_mapping=checked.base_mapping,
            search_text=(request.message or "").lower(),
        )
        session.add(version)
        session.flush()
        if checked.base_id is not None:
            _note_base(session, checked.base_id, adapter.id)
        session.add_all(VersionFile(version_id=version.id, path=f.path, size=f.size, digest=f.digest) for f in files)
        session.add_all(VersionTarget(version_id=version.id, target=t) for t in sorted(set(facts["targets"])))
        _add_metrics(session, version.id, request.metrics)
        session.flush()
        for alias in checked.aliases:
            self._move_alias(session, adapter, alias, version, actor)
        return version.id, True

    def validate(
        self, namespace: str, name: str, config_bytes: bytes, header_prefix: bytes, file_size: int, base: str | None
    ) -> ValidationView:
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
        base_out: BaseRefView | None = None
        if self.validator is not None:
            base_row_id, report = self.validator(config, header, facts, base)
            facts = report.get("facts", facts)
            warnings.extend(report.get("warnings", []))
            with self.registry.sessions.begin() as session:
                row = session.get(BaseModelRow, base_row_id, options=[selectinload(BaseModelRow.names)])
                base_out = base_ref(row)
        return ValidationView(base=base_out, facts=facts, warnings=warnings)

    def _existing(
        self, namespace: str, name: str, digest: str, aliases: list[str], actor: str | None
    ) -> VersionView | None:
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
            return self._public(session, version)

    def _check_files(self, listed: list[StoredFile]) -> dict[str, StoredFile]:
        limit = self.registry.settings.max_files_per_version
        if len(listed) > limit:
            raise ManifestInvalidError(f"a version holds at most {limit} files", detail={"limit": limit})
        files: dict[str, StoredFile] = {}
        for f in listed:
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
            zero_b = [k for k in facts[2] if lora.is_b_factor(k)]
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
                stats = values.scan_values(_read_chunks(stream, tensor.end - tensor.start), tensor.dtype)
                position = tensor.end
                if stats.nonfinite:
                    bad.append({"key": tensor.name, "nonfinite": stats.nonfinite})
                elif stats.all_zero and lora.is_b_factor(tensor.name):
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
        if zero_b and len(zero_b) == sum(1 for t in header.tensors if lora.is_b_factor(t)):
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
            adapter = Adapter(namespace=namespace, name=name, last_number=0, search_name=f"{namespace}/{name}")
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

    def get(self, namespace: str, name: str, tag: str = "latest") -> VersionView:
        with self.registry.reading() as session:
            return self._resolved_view(session, namespace, name, tag)

    def get_many(self, refs: list[names.Reference]) -> list[VersionView | LoregError]:
        """Each reference's version, or the error a lookup of it alone raises (one session for the
        batch; an alias moved meanwhile changes the ETag of the next batch, so the follower sees it then)."""
        out: list[VersionView | LoregError] = []
        with self.registry.reading() as session:
            for r in refs:
                try:
                    out.append(self._resolved_view(session, r.namespace, r.name, r.tag))
                except LoregError as exc:
                    out.append(exc)
        return out

    def _resolved_view(self, session: Session, namespace: str, name: str, tag: str) -> VersionView:
        """The version ``tag`` names, in two statements: the version with its adapter and base, then
        its files, metrics, aliases and base names. Whatever the one-row statement cannot settle (a
        short digest, a missing name) goes through ``resolve.version``, which raises the precise error."""
        names.check_name(namespace, name)
        tag = names.check_tag(tag)
        if tag == "latest":
            kind, value = "latest", None
        elif tag.isdigit():
            kind, value = "number", int(tag)
        elif tag.startswith("sha256:"):
            kind, value = ("digest", tag) if names.DIGEST.fullmatch(tag) else (None, None)
        else:
            kind, value = "alias", tag
        params = {"ns": namespace, "name": name} if value is None else {"ns": namespace, "name": name, "tag": value}
        rows = session.execute(_version_query(kind), params).all() if kind is not None else []
        if len(rows) != 1:
            found = resolve.version(session, namespace, name, tag)
            rows = session.execute(_head(full=True).where(Version.id == found.id)).all()
        return self._view(session, rows[0])

    def _public(self, session: Session, v: Version) -> VersionView:
        session.flush()
        return self._view(session, session.execute(_head(full=True).where(Version.id == v.id)).one())

    def _view(self, session: Session, row: Any) -> VersionView:
        extras = _Extras.load(session, [row.id], [row.base_model_id] if row.base_model_id is not None else [], files=True)
        metrics = extras.metrics.get(row.id, [])
        return VersionView(
            name=f"{row.namespace}/{row.name}",
            version=row.number,
            digest=row.manifest_digest,
            size=row.size,
            message=row.message,
            created_at=row.created_at,
            files=extras.files.get(row.id, []),
            config=row.config,
            facts=row.facts,
            warnings=row.warnings,
            metrics={m.key: m.value for m in metrics},
            metrics_history=metrics,
            aliases=extras.aliases.get(row.id, []),
            base=extras.base(row),
            made_by=_made_by(session, row.id) if row.made else None,
        )

    def file_entry(self, namespace: str, name: str, tag: str, path: str) -> StoredFile:
        names.check_file_name(path)
        with self.registry.sessions.begin() as session:
            version = resolve.version(session, namespace, name, tag)
            row = session.get(VersionFile, (version.id, path))
            if row is None:
                raise FileNotStoredError(
                    f"{namespace}/{name}:{version.number} has no file {path}",
                    detail={"path": path},
                    hint=f"its files: loreg show {namespace}/{name}:{version.number}",
                )
            return StoredFile(path=row.path, size=row.size, digest=row.digest)

    def adapter(self, namespace: str, name: str) -> AdapterView:
        with self.registry.sessions.begin() as session:
            adapter = resolve.adapter(session, namespace, name)
            versions = session.scalars(
                select(Version)
                .where(Version.adapter_id == adapter.id)
                .order_by(Version.number.desc())
                .options(selectinload(Version.metrics), selectinload(Version.base_model))
            ).all()
            alias_map = self._alias_map(session, [v.id for v in versions])
            return AdapterView(
                name=adapter.full_name,
                created_at=adapter.created_at,
                latest=versions[0].number if versions else None,
                aliases={a: v.number for v in versions for a in alias_map.get(v.id, [])},
                versions=[self._summary(v, adapter, alias_map.get(v.id, [])) for v in versions],
            )

    def versions(self, namespace: str, name: str, *, cursor: str | None = None, limit: int = 50) -> Listing[VersionSummaryView]:
        """An adapter's versions, newest first, a page at a time (the cursor is the last number)."""
        limit = max(1, min(limit, 500))
        with self.registry.sessions.begin() as session:
            adapter = resolve.adapter(session, namespace, name)
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
            return Listing(
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

    def _summary(self, v: Version, adapter: Adapter, aliases: list[str], match: str | None = None) -> VersionSummaryView:
        return _summary_view(v, adapter.full_name, base_ref(v.base_model), latest_metrics(v), aliases, match)

    # --- lookup -------------------------------------------------------------------------------

    def lookup(
        self, filters: LookupFilters, *, cursor: str | None = None, limit: int = 50
    ) -> Listing[VersionSummaryView]:
        """Versions matching every filter, newest first (or by a metric's latest value), paginated.

        With ``latest_only`` each adapter contributes only its newest matching version.
        """
        limit = max(1, min(limit, 500))
        with self.registry.reading() as session:
            if filters.base is not None:
                base_ids, layout_ids = resolve.base_ids(session, filters.base)
                filters = replace(filters, base=None, base_ids=base_ids, layout_base_ids=layout_ids)
            shape, params = _shape_and_params(filters, cursor, limit)
            rows = session.execute(_lookup_statement(shape), params).all()
            return self._lookup_page(session, rows, limit, filters.base_ids, shape.metric)

    def _lookup_page(
        self, session: Session, rows: list[Any], limit: int, base_ids: tuple[int, ...] | None, by_metric: bool
    ) -> Listing[VersionSummaryView]:
        more = len(rows) > limit
        rows = rows[:limit]
        extras = _Extras.load(session, [r.id for r in rows], sorted({r.base_model_id for r in rows} - {None}))
        validated = set(base_ids or ())
        items = []
        for r in rows:
            match = None
            if base_ids is not None:
                match = "validated" if r.base_model_id in validated else "layout"
            items.append(self._summary_of(r, extras, match))
        next_cursor = None
        if more:
            last = rows[-1]
            if not by_metric:
                next_cursor = _encode_cursor([last.id])
            else:
                next_cursor = _encode_cursor([False, None, last.id] if last.mv is None else [True, last.mv, last.id])
        return Listing(items=items, next_cursor=next_cursor)

    def _summary_of(self, r: Any, extras: _Extras, match: str | None) -> VersionSummaryView:
        metrics = {m.key: m.value for m in extras.metrics.get(r.id, [])}
        return _summary_view(r, f"{r.namespace}/{r.name}", extras.base(r), metrics, extras.aliases.get(r.id, []), match)

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

    def set_alias(self, namespace: str, name: str, alias: str, tag: str, *, actor: str | None = None) -> AliasView:
        names.check_alias(alias)
        with self.registry.sessions.begin() as session:
            adapter = resolve.adapter(session, namespace, name)
            session.scalar(select(Adapter).where(Adapter.id == adapter.id).with_for_update())
            version = resolve.version(session, namespace, name, tag)
            self._move_alias(session, adapter, alias, version, actor)
            session.flush()
            return self._alias_view(session, adapter, alias)

    def get_alias(self, namespace: str, name: str, alias: str) -> AliasView:
        names.check_alias(alias)
        with self.registry.sessions.begin() as session:
            adapter = resolve.adapter(session, namespace, name)
            out = self._alias_view(session, adapter, alias)
            if out.version is None and not out.history:
                raise AliasNotFoundError(f"{adapter.full_name} has no alias {alias!r}", detail={"alias": alias})
            return out

    def remove_alias(self, namespace: str, name: str, alias: str, *, actor: str | None = None) -> AliasView:
        names.check_alias(alias)
        with self.registry.sessions.begin() as session:
            adapter = resolve.adapter(session, namespace, name)
            row = session.scalar(select(Alias).where(Alias.adapter_id == adapter.id, Alias.name == alias))
            if row is None:
                raise AliasNotFoundError(f"{adapter.full_name} has no alias {alias!r}", detail={"alias": alias})
            session.delete(row)
            session.add(AliasEvent(adapter_id=adapter.id, alias=alias, version_number=None, actor=actor))
            session.flush()
            return self._alias_view(session, adapter, alias)

    def _alias_view(self, session: Session, adapter: Adapter, alias: str) -> AliasView:
        row = session.scalar(select(Alias).where(Alias.adapter_id == adapter.id, Alias.name == alias))
        number = session.get_one(Version, row.version_id).number if row is not None else None
        events = session.scalars(
            select(AliasEvent)
            .where(AliasEvent.adapter_id == adapter.id, AliasEvent.alias == alias)
            .order_by(AliasEvent.id.desc())
        ).all()
        return AliasView(
            name=adapter.full_name,
            alias=alias,
            version=number,
            history=[AliasEventView(version=e.version_number, actor=e.actor, created_at=e.created_at) for e in events],
        )

    def add_metrics(self, namespace: str, name: str, tag: str, metrics: dict[str, float]) -> VersionView:
        """Append evaluations; the version itself never changes."""
        with self.registry.sessions.begin() as session:
            version = resolve.version(session, namespace, name, tag)
            _add_metrics(session, version.id, metrics)
            session.flush()
            session.expire(version, ["metrics"])
            return self._public(session, version)

    def delete_version(self, namespace: str, name: str, tag: str) -> tuple[str, int]:
        """Delete a version: it stops resolving, its aliases go, its number is never given again."""
        with self.registry.sessions.begin() as session:
            version = resolve.version(session, namespace, name, tag)
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
            adapter = resolve.adapter(session, namespace, name)
            # the push's lock: a concurrent push waits and then numbers after the deleted ones
            session.scalar(select(Adapter).where(Adapter.id == adapter.id).with_for_update())
            numbers = list(
                session.scalars(select(Version.number).where(Version.adapter_id == adapter.id).order_by(Version.number))
            )
            session.execute(delete(Alias).where(Alias.adapter_id == adapter.id))
            session.execute(delete(Version).where(Version.adapter_id == adapter.id))
            return adapter.full_name, numbers


SCAN_CHUNK = 4 << 20


def _made_by(session: Session, version_id: int) -> dict[str, Any] | None:
    """The lineage of a version a combination pushed (the first one, if identical requests met)."""
    from loreg.registry.services.combinations import lineage

    row = session.scalar(
        select(Combination).where(Combination.version_id == version_id).order_by(Combination.finished_at).limit(1)
    )
    return lineage(row) if row is not None else None


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

    return validate.describe_adapter(config, header).to_dict()


def _summary_view(
    v: Any, name: str, base: Any, metrics: dict[str, float], aliases: list[str], match: str | None
) -> VersionSummaryView:
    """A version's summary from a Version row or a lookup row (the same column names)."""
    facts = v.facts
    return VersionSummaryView(
        name=name,
        version=v.number,
        digest=v.manifest_digest,
        size=v.size,
        created_at=v.created_at,
        rank=v.rank_max,
        lora_alpha=facts.get("lora_alpha"),
        target_modules=sorted(facts.get("targets", [])),
        task_type=v.task_type,
        use_dora=v.use_dora,
        base=base,
        metrics=metrics,
        aliases=aliases,
        warnings=v.warnings,
        match=match,
    )
