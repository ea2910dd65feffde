from __future__ import annotations

import click


@click.group()
def db() -> None:
    """Database migrations (run on the server host, with LOREG_DATABASE_URL)."""


@db.command()
def upgrade() -> None:
    """Migrate the database to the newest schema."""
    from loreg.registry.admin import open_for_admin
    from loreg.registry.db import migrate

    registry = open_for_admin(schema="any")
    try:
        before = migrate.upgrade(registry.engine)  # read under the migration lock
        after = migrate.current_revision(registry.engine)
    finally:
        registry.close()
    click.echo(f"database at {after} (was {before or 'empty'})")


@db.command()
def current() -> None:
    """Print the database's schema revision and the newest one."""
    from loreg.registry.admin import open_for_admin
    from loreg.registry.db import migrate

    registry = open_for_admin(schema="any")
    try:
        click.echo(f"current {migrate.current_revision(registry.engine) or 'empty'}, head {migrate.head_revision()}")
    finally:
        registry.close()
