"""Server-host entry points used by `loreg serve` and `loreg token create --bootstrap`."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from fastapi import FastAPI

from loreg.registry.db import migrate
from loreg.registry.errors import DbUnavailableError, UnauthorizedError
from loreg.registry.services.context import open_registry
from loreg.registry.services.tokens import TokenService
from loreg.registry.settings import Settings

log = logging.getLogger("loreg")


def prepare(host: str, port: int, settings: Settings | None = None) -> tuple[FastAPI, str]:
    """Open the registry, migrate an embedded SQLite (Postgres must be current), ensure a token."""
    from loreg.cli import config
    from loreg.registry.app import create_app

    settings = settings or Settings()
    registry = open_registry(settings)
    if settings.embedded:
        settings.home.mkdir(parents=True, exist_ok=True)
        migrate.upgrade(registry.engine)
    else:
        try:
            current, head = migrate.current_revision(registry.engine), migrate.head_revision()
        except Exception as exc:
            raise DbUnavailableError(f"cannot reach the database: {type(exc).__name__}: {str(exc)[:200]}") from exc
        if current != head:
            raise DbUnavailableError(
                f"the database schema is at {current or 'empty'}, this loreg needs {head}",
                hint="run `loreg db upgrade` with the same LOREG_DATABASE_URL, then start again",
            )
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    if settings.embedded:
        _ensure_local_token(registry, url, config)
    return create_app(settings, registry=registry), url


def _ensure_local_token(registry: Any, url: str, config: Any) -> None:
    tokens = TokenService(registry)
    existing = config.read_credentials().get(url)
    if existing:
        try:
            tokens.authenticate(existing)
            return
        except UnauthorizedError:
            pass
    _row, plaintext = tokens.create("admin", [], description=f"embedded default: loreg serve at {url}")
    path = config.write_credential(url, plaintext)
    log.warning("created an admin token for %s in %s", url, path)


def bootstrap_token(
    scope: str, namespaces: list[str], expires_at: datetime | None, description: str | None
) -> dict[str, Any]:
    """Create a token with direct database access (the first admin token of a Postgres server)."""
    settings = Settings()
    registry = open_registry(settings)
    try:
        if not migrate.is_up_to_date(registry.engine):
            raise DbUnavailableError("the database schema is not current", hint="run `loreg db upgrade` first")
        row, plaintext = TokenService(registry).create(scope, namespaces, expires_at=expires_at, description=description)
    finally:
        registry.close()
    return {"id": row.id, "token": plaintext, "scope": row.scope, "namespaces": row.namespaces,
            "expires_at": row.expires_at.isoformat() if row.expires_at else None}
