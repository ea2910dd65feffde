"""Alembic environment: the engine comes from loreg.registry.db.migrate, never from an ini file."""

from __future__ import annotations

from alembic import context

from loreg.registry.db import models  # noqa: F401  (fills the metadata for autogenerate and check)
from loreg.registry.db.base import Base

config = context.config


def run_migrations_online() -> None:
    engine = config.attributes.get("engine")
    if engine is None:
        raise RuntimeError("loreg migrations run through loreg.registry.db.migrate (loreg db upgrade)")
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=connection.dialect.name == "sqlite",
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


if context.is_offline_mode():
    raise RuntimeError("offline (SQL script) migrations are not supported")
run_migrations_online()
