"""Alembic, configured in code: the migration scripts ship inside the loreg.migrations package."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, text

import loreg.migrations

# pg_advisory_lock key of migrations ("loreg" in ASCII): every loreg process that migrates takes it
MIGRATION_LOCK_KEY = 0x6C6F726567
FILE_TEMPLATE = "%%(year)d_%%(month).2d_%%(day).2d_%%(hour).2d%%(minute).2d-%%(rev)s_%%(slug)s"


def alembic_config(engine: Engine | None = None, connection: Connection | None = None) -> Config:
    here = Path(loreg.migrations.__file__).parent
    cfg = Config()
    cfg.set_main_option("script_location", str(here))
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("version_locations", str(here / "versions"))
    cfg.set_main_option("file_template", FILE_TEMPLATE)
    cfg.attributes["engine"] = engine
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"migrations have {len(heads)} heads: {heads}")
    return heads[0]


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def is_up_to_date(engine: Engine) -> bool:
    return current_revision(engine) == head_revision()


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Migrate to ``revision``; returns the revision found under the lock (None: empty)."""
    with migration_lock(engine) as connection:
        if connection is None:
            before = current_revision(engine)
        else:
            before = MigrationContext.configure(connection).get_current_revision()
            connection.commit()
        command.upgrade(alembic_config(engine, connection), revision)
    return before


def downgrade(engine: Engine, revision: str) -> None:
    with migration_lock(engine) as connection:
        command.downgrade(alembic_config(engine, connection), revision)


@contextmanager
def migration_lock(engine: Engine) -> Iterator[Connection | None]:
    """On Postgres, a connection holding the migration advisory lock (the migration runs on it).

    Two `loreg db upgrade` started together (a deploy on several hosts) would both read the old
    revision and both run the same DDL; with the lock the second waits, then finds the schema at
    head and does nothing. SQLite is one host's file: its writers are serialised by the file lock.
    """
    if engine.dialect.name != "postgresql":
        yield None
        return
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        connection.commit()
        try:
            yield connection
        finally:
            connection.rollback()
            connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": MIGRATION_LOCK_KEY})
            connection.commit()
