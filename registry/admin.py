"""Opening the registry for a command run on the server host: serve, worker, gc, fsck, db and
`token create --bootstrap`. One place decides whether the database schema fits this loreg, so
every command refuses a stale schema with the same message."""

from __future__ import annotations

from typing import Literal

from loreg.registry.db import migrate
from loreg.registry.errors import DbUnavailableError
from loreg.registry.services.context import AppContext, open_registry
from loreg.registry.settings import Settings

# "current": refuse a schema that is not the newest; "migrate": upgrade the embedded SQLite (one
# user: `loreg serve` migrates it on start), refuse a stale shared database; "any": no check (db)
Schema = Literal["current", "migrate", "any"]


def open_for_admin(settings: Settings | None = None, *, schema: Schema = "current") -> AppContext:
    """The registry for an admin command, its schema checked as ``schema`` says.

    Raises:
        DbUnavailableError: the database cannot be reached, or its schema is not this loreg's.
        SettingsInvalidError: a storage URL that names no store.
    """
    settings = settings or Settings()
    registry = open_registry(settings)
    try:
        if schema == "migrate" and settings.embedded:
            settings.home.mkdir(parents=True, exist_ok=True)
            migrate.upgrade(registry.engine)
        elif schema != "any":
            check_schema(registry)
    except BaseException:
        registry.close()
        raise
    return registry


def check_schema(registry: AppContext) -> None:
    try:
        current, head = migrate.current_revision(registry.engine), migrate.head_revision()
    except Exception as exc:
        raise DbUnavailableError(f"cannot reach the database: {type(exc).__name__}: {str(exc)[:200]}") from exc
    if current != head:
        raise DbUnavailableError(
            f"the database schema is at {current or 'empty'}, this loreg needs {head}",
            detail={"current": current, "head": head},
            hint="run `loreg db upgrade` with the same LOREG_DATABASE_URL, then run this command again",
        )
