"""Server-host entry points used by `loreg serve` and `loreg token create --bootstrap`."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from fastapi import FastAPI

from loreg.registry import credentials
from loreg.registry.admin import open_for_admin
from loreg.registry.errors import UnauthorizedError
from loreg.registry.services.context import AppContext
from loreg.registry.services.tokens import TokenService
from loreg.registry.settings import Settings

log = logging.getLogger("loreg")


def prepare(host: str, port: int, settings: Settings | None = None) -> tuple[FastAPI, str]:
    """Open the registry, migrate an embedded SQLite (Postgres must be current), ensure a token."""
    from loreg.registry.app import create_app

    settings = settings or Settings()
    registry = open_for_admin(settings, schema="migrate")
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    if settings.embedded:
        _ensure_local_token(registry, url)
    return create_app(settings, registry=registry), url


def _ensure_local_token(registry: AppContext, url: str) -> None:
    tokens = TokenService(registry)
    path = registry.settings.home / credentials.FILE_NAME
    existing = credentials.read(path).get(url)
    if existing:
        try:
            tokens.authenticate(existing)
            return
        except UnauthorizedError:
            pass
    _row, plaintext = tokens.create("admin", [], description=f"embedded default: loreg serve at {url}")
    credentials.write(path, url, plaintext)
    log.warning("created an admin token for %s in %s", url, path)


def bootstrap_token(
    scope: str, namespaces: list[str], expires_at: datetime | None, description: str | None
) -> dict[str, Any]:
    """Create a token with direct database access (the first admin token of a Postgres server)."""
    registry = open_for_admin()
    try:
        row, plaintext = TokenService(registry).create(scope, namespaces, expires_at=expires_at, description=description)
    finally:
        registry.close()
    return {"id": row.id, "token": plaintext, "scope": row.scope, "namespaces": row.namespaces,
            "expires_at": row.expires_at.isoformat() if row.expires_at else None}
