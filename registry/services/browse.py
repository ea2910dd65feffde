"""Read models the web pages need beyond the API's answers: counts, messages, cards.

Every query applies the caller's namespace globs the way the lookup does (in SQL, through the same
LIKE patterns), so a page never counts or lists what the API would hide.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select

from loreg.registry.db.models import Adapter, Alias, AliasEvent, BaseName, Version
from loreg.registry.db.models import BaseModelRow
from loreg.registry.services.adapters import AdapterService, visible
from loreg.registry.services.context import AppContext
from loreg.registry.services.exports import ExportService
from loreg.registry.services.tokens import Principal
from loreg.registry.services.views import StoredFile

CARD_NAME = "README.md"


@dataclass(frozen=True)
class BaseCount:
    weights_digest: str
    names: list[str]
    model_type: str | None
    adapters: int


@dataclass(frozen=True)
class AliasMove:
    created_at: datetime
    alias: str
    version: int | None  # None: removed
    actor: str | None


@dataclass(frozen=True)
class AdapterStory:
    messages: dict[int, str | None]
    aliases: dict[str, int]
    history: list[AliasMove]


class BrowseService:
    def __init__(self, registry: AppContext, adapters: AdapterService, exports: ExportService):
        self.registry = registry
        self.adapters = adapters
        self.exports = exports

    def base_counts(self, principal: Principal) -> list[BaseCount]:
        """Every base model with the number of adapters (visible to ``principal``) validated against it."""
        with self.registry.sessions.begin() as session:
            counted = (
                select(Version.base_model_id, func.count(func.distinct(Version.adapter_id)).label("n"))
                .join(Adapter, Adapter.id == Version.adapter_id)
                .where(Version.base_model_id.is_not(None))
                .group_by(Version.base_model_id)
            )
            if principal.namespaces:
                counted = counted.where(visible(principal.namespaces))
            counts = {base_id: n for base_id, n in session.execute(counted)}
            names: dict[int, list[str]] = {}
            for base_id, name, revision in session.execute(
                select(BaseName.base_model_id, BaseName.name, BaseName.revision).order_by(BaseName.name)
            ):
                names.setdefault(base_id, []).append(f"{name}@{revision}" if revision else name)
            rows = session.execute(select(BaseModelRow.id, BaseModelRow.weights_digest, BaseModelRow.model_type)).all()
            out = [BaseCount(digest, names.get(i, []), mtype, counts.get(i, 0)) for i, digest, mtype in rows]
        return sorted(out, key=lambda b: (-b.adapters, b.names[0] if b.names else b.weights_digest))

    def adapter_story(self, namespace: str, name: str, numbers: list[int]) -> AdapterStory:
        """What the adapter page adds to the API's version list, in one transaction: the commit
        messages of versions ``numbers``, where each alias points now, and every alias move."""
        with self.registry.sessions.begin() as session:
            adapter_id = session.scalar(select(Adapter.id).where(Adapter.namespace == namespace, Adapter.name == name))
            if adapter_id is None:
                return AdapterStory({}, {}, [])
            messages = {n: m for n, m in session.execute(
                select(Version.number, Version.message).where(Version.adapter_id == adapter_id, Version.number.in_(numbers))
            )} if numbers else {}
            aliases = {a: n for a, n in session.execute(
                select(Alias.name, Version.number).join(Version, Version.id == Alias.version_id)
                .where(Alias.adapter_id == adapter_id).order_by(Alias.name)
            )}
            history = [
                AliasMove(e.created_at, e.alias, e.version_number, e.actor)
                for e in session.scalars(
                    select(AliasEvent).where(AliasEvent.adapter_id == adapter_id).order_by(AliasEvent.id.desc()).limit(500)
                )
            ]
        return AdapterStory(messages, aliases, history)

    def card(self, files: list[StoredFile], max_bytes: int) -> tuple[str | None, bool]:
        """The README.md among a version's ``files`` as text cut at ``max_bytes``: (text, cut); None without one."""
        entry = next((f for f in files if f.path == CARD_NAME), None)
        if entry is None:
            return None, False
        end = min(entry.size, max_bytes)
        raw = self.registry.store.read_range(entry.digest, 0, end) if end else b""
        return raw.decode("utf-8", errors="replace"), entry.size > max_bytes
