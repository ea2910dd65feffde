"""What the services answer: plain dataclasses, mapped to wire models (api/schemas.py) by the routes.

Field names match the wire models', so a route maps with ``Model.model_validate(view)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

from loreg.registry.db.models import BaseModelRow

T = TypeVar("T")


@dataclass(frozen=True)
class StoredFile:
    path: str
    size: int
    digest: str


@dataclass(frozen=True)
class MetricView:
    key: str
    value: float
    created_at: datetime


@dataclass(frozen=True)
class BaseRefView:
    weights_digest: str
    layout_digest: str
    names: list[str] = field(default_factory=list)


def base_label(name: str, revision: str | None) -> str:
    return f"{name}@{revision}" if revision else name


def base_ref(base: BaseModelRow | None) -> BaseRefView | None:
    if base is None:
        return None
    labels = [base_label(n.name, n.revision) for n in base.names]
    return BaseRefView(weights_digest=base.weights_digest, layout_digest=base.layout_digest, names=labels)


@dataclass(frozen=True)
class VersionView:
    name: str
    version: int
    digest: str
    size: int
    message: str | None
    created_at: datetime
    files: list[StoredFile]
    config: dict[str, Any]
    facts: dict[str, Any]
    warnings: list[dict[str, Any]]
    metrics: dict[str, float]
    metrics_history: list[MetricView]
    aliases: list[str]
    base: BaseRefView | None
    made_by: dict[str, Any] | None = None  # lineage of a version a job made (services/combinations.py)


@dataclass(frozen=True)
class VersionPushed:
    """A commit's answer: the version, and whether this commit created it (else the same files were stored)."""

    version: VersionView
    created: bool


@dataclass(frozen=True)
class VersionSummaryView:
    name: str
    version: int
    digest: str
    size: int
    created_at: datetime
    rank: int
    lora_alpha: float | None
    target_modules: list[str]
    task_type: str | None
    use_dora: bool
    base: BaseRefView | None
    metrics: dict[str, float]
    aliases: list[str]
    warnings: list[dict[str, Any]]
    match: str | None = None  # "validated" or "layout" when listed for a base


@dataclass(frozen=True)
class Listing(Generic[T]):
    """One page of a list, and the cursor of the next (None on the last)."""

    items: list[T]
    next_cursor: str | None = None


@dataclass(frozen=True)
class AdapterView:
    name: str
    created_at: datetime
    latest: int | None
    aliases: dict[str, int]
    versions: list[VersionSummaryView]


@dataclass(frozen=True)
class AliasEventView:
    version: int | None
    actor: str | None
    created_at: datetime


@dataclass(frozen=True)
class AliasView:
    name: str
    alias: str
    version: int | None
    history: list[AliasEventView]


@dataclass(frozen=True)
class ValidationView:
    """A preflight's verdict: what the commit would find from these headers (no value checks)."""

    base: BaseRefView | None
    facts: dict[str, Any]
    warnings: list[Any]


@dataclass(frozen=True)
class BaseView:
    weights_digest: str
    layout_digest: str
    names: list[str]
    model_type: str | None
    architectures: list[str]
    tensor_count: int
    parameter_count: int
    weights_uploaded: bool
    files: list[dict[str, Any]]
    created_at: datetime


@dataclass(frozen=True)
class BaseRegistered:
    """A registration's answer: the base, and whether this call created its record."""

    base: BaseView
    created: bool


@dataclass(frozen=True)
class BaseLayoutView:
    weights_digest: str
    layout_digest: str
    model_type: str | None
    architectures: list[str]
    config: dict[str, Any]
    tensors: list[list[Any]]
