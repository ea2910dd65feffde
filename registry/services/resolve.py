"""References to stored rows, resolved in one place for every service: adapters (``ns/name``),
versions (``:N``, ``:alias``, ``latest``, ``@sha256:<12 to 64 hex>``) and base models (``name``,
``name@revision``, ``sha256:<12 to 64 hex>``). Each function reads inside the caller's session and
raises the not-found error (with its hint) a route answers."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy import and_, select
from sqlalchemy.orm import Session, selectinload

from loreg.registry.db.models import Adapter, Alias, BaseName, Version
from loreg.registry.db.models import BaseModelRow
from loreg.registry.errors import (
    AdapterNotFoundError,
    AliasNotFoundError,
    BaseNotFoundError,
    DigestAmbiguousError,
    DigestInvalidError,
    VersionNotFoundError,
)
from loreg.registry.formats import names
from loreg.registry.services.views import base_label

MAX_CANDIDATES = 10


def adapter(session: Session, namespace: str, name: str) -> Adapter:
    names.check_name(namespace, name)
    row = session.scalar(select(Adapter).where(Adapter.namespace == namespace, Adapter.name == name))
    if row is None:
        raise AdapterNotFoundError(
            f"adapter {namespace}/{name} does not exist",
            detail={"name": f"{namespace}/{name}"},
            hint=f"list what exists: loreg ls {namespace}",
        )
    return row


def version(session: Session, namespace: str, name: str, tag: str) -> Version:
    """The version ``tag`` names: ``latest``, a number, an alias or a (short) manifest digest."""
    owner = adapter(session, namespace, name)
    tag = names.check_tag(tag)
    query = select(Version).where(Version.adapter_id == owner.id)
    ref = f"{namespace}/{name}"
    if tag == "latest":
        found = session.scalar(query.order_by(Version.number.desc()).limit(1))
        if found is None:
            raise VersionNotFoundError(f"{ref} has no versions", detail={"name": ref})
        return found
    if tag.startswith("sha256:"):
        found = one_by_digest(
            session.scalars(query.where(digest_matches(Version.manifest_digest, tag)).order_by(Version.number)),
            tag,
            lambda v: {"version": f"{ref}:{v.number}", "digest": v.manifest_digest},
        )
    elif tag.isdigit():
        found = session.scalar(query.where(Version.number == int(tag)))
    else:
        found = session.get(Version, _alias(session, owner, ref, tag).version_id)
    if found is None:
        raise VersionNotFoundError(f"{ref} has no version {tag}", detail={"name": ref, "version": tag})
    return found


def _alias(session: Session, owner: Adapter, ref: str, tag: str) -> Alias:
    row = session.scalar(select(Alias).where(Alias.adapter_id == owner.id, Alias.name == tag))
    if row is None:
        known = sorted(session.scalars(select(Alias.name).where(Alias.adapter_id == owner.id)))
        raise AliasNotFoundError(
            f"{ref} has no alias {tag!r}",
            detail={"name": ref, "alias": tag, "aliases": known},
            hint=f"aliases of {ref}: {', '.join(known)}" if known else f"set one: loreg alias set {ref}:N {tag}",
        )
    return row


def split_base_ref(ref: str) -> tuple[str, str | None]:
    """``name``, ``name@revision`` -> (name, revision); digests are handled by the caller."""
    name, sep, revision = ref.partition("@")
    names.check_base_name(name)
    if sep:
        names.check_base_revision(revision)
        return name, revision
    return name, None


def base(session: Session, ref: str) -> BaseModelRow:
    """The base model ``ref`` names: a (short) weights digest, ``name`` (its newest registration)
    or ``name@revision``."""
    if ref.startswith("sha256:"):
        if names.DIGEST_PREFIX.fullmatch(ref) is None:
            raise DigestInvalidError(f"invalid digest {ref[:80]!r}", hint=names.DIGEST_PREFIX_HINT)
        row = one_by_digest(
            session.scalars(
                select(BaseModelRow)
                .where(digest_matches(BaseModelRow.weights_digest, ref))
                .options(selectinload(BaseModelRow.names))
                .order_by(BaseModelRow.weights_digest)
            ),
            ref,
            lambda r: {"digest": r.weights_digest, "names": [base_label(n.name, n.revision) for n in r.names]},
        )
        if row is None:
            raise BaseNotFoundError(f"no base model with weights digest {ref}", detail={"base": ref})
        return row
    name, revision = split_base_ref(ref)
    query = select(BaseName).where(BaseName.name == name)
    if revision is not None:
        query = query.where(BaseName.revision == revision)
    label = session.scalar(query.order_by(BaseName.id.desc()).limit(1))
    if label is None:
        raise BaseNotFoundError(
            f"base model {ref} is not registered",
            detail={"base": ref},
            hint=f"register it: loreg base register ./checkpoint --name {name}",
        )
    return session.get_one(BaseModelRow, label.base_model_id)


def base_ids(session: Session, ref: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(ids of the bases ``ref`` names: every registration of a name without revision, ids of the
    other bases with the same layout)."""
    if ref.startswith("sha256:"):
        named_q: Any = [base(session, ref).id]
    else:
        name, revision = split_base_ref(ref)
        named_q = select(BaseName.base_model_id).where(BaseName.name == name)
        if revision is not None:
            named_q = named_q.where(BaseName.revision == revision)
    # one statement: every base sharing a layout with a named one, each marked whether it is named
    layouts = select(BaseModelRow.layout_digest).where(BaseModelRow.id.in_(named_q))
    rows = session.execute(
        select(BaseModelRow.id, BaseModelRow.id.in_(named_q).label("named")).where(
            BaseModelRow.layout_digest.in_(layouts)
        )
    ).all()
    if not rows:
        base(session, ref)  # raises the not-registered error with its hint
    named = tuple(sorted(r.id for r in rows if r.named))
    return named, tuple(sorted(r.id for r in rows if not r.named))


def digest_matches(column: Any, digest: str) -> Any:
    """A SQL condition: ``column`` is ``digest``, or starts with it when it is a short prefix."""
    if names.DIGEST.fullmatch(digest):
        return column == digest
    # a range rather than LIKE: Postgres uses the btree index for it under any collation; the
    # stored digests are lowercase hex, all below the prefix followed by "g"
    return and_(column >= digest, column < digest + "g")


def one_by_digest(rows: Iterable[Any], digest: str, describe: Callable[[Any], dict[str, Any]]) -> Any:
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
