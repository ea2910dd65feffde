"""Alembic environment: the engine comes from loreg.registry.db.migrate, never from an ini file."""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import Connection

from loreg.registry.db import models  # noqa: F401  (fills the metadata for autogenerate and check)
from loreg.registry.db.orm import OrmBase

config = context.config


def _for_this_dialect(dialect: str) -> Any:
    """Autogenerate's filter: a model index made for one dialect only (``Index(...).ddl_if(dialect=…)``,
    the trigram index on Postgres) is no difference on another."""

    def include(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
        ddl_if = getattr(obj, "_ddl_if", None)
        return not (type_ == "index" and not reflected and ddl_if is not None and ddl_if.dialect not in (None, dialect))

    return include


def run_migrations_online() -> None:
    engine = config.attributes.get("engine")
    if engine is None:
        raise RuntimeError("loreg migrations run through loreg.registry.db.migrate (loreg db upgrade)")
    # on Postgres migrate.py hands over the connection that holds the migration advisory lock
    locked = config.attributes.get("connection")
    if locked is not None:
        run_on(locked)
        return
    with engine.connect() as connection:
        run_on(connection)


def run_on(connection: Connection) -> None:
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        # batch operations rebuild a table by copy, drop and rename; with foreign keys on, the drop
        # cascades into the tables that reference it (every export_inputs row gone with exports).
        # The pragma is a no-op inside a transaction, so it goes to the driver before ours begins.
        connection.connection.driver_connection.execute("PRAGMA foreign_keys=OFF")
    try:
        context.configure(
            connection=connection,
            target_metadata=OrmBase.metadata,
            render_as_batch=sqlite,
            compare_type=True,
            include_object=_for_this_dialect(connection.dialect.name),
        )
        with context.begin_transaction():
            context.run_migrations()
            if sqlite:
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise RuntimeError(f"migration left rows whose foreign keys point nowhere: {broken[:5]}")
        connection.commit()
    finally:
        if sqlite:
            connection.connection.driver_connection.execute("PRAGMA foreign_keys=ON")


if context.is_offline_mode():
    raise RuntimeError("offline (SQL script) migrations are not supported")
run_migrations_online()
