from __future__ import annotations

import click


@click.group()
def db() -> None:
    """Database migrations (run on the server host, with LOREG_DATABASE_URL)."""


@db.command()
def upgrade() -> None:
    """Migrate the database to the newest schema."""
    from loreg.registry.db import migrate
    from loreg.registry.db.session import make_engine
    from loreg.registry.settings import Settings

    settings = Settings()
    engine = make_engine(settings.effective_database_url)
    try:
        before = migrate.current_revision(engine)
        migrate.upgrade(engine)
        after = migrate.current_revision(engine)
    finally:
        engine.dispose()
    click.echo(f"database at {after} (was {before or 'empty'})")


@db.command()
def current() -> None:
    """Print the database's schema revision and the newest one."""
    from loreg.registry.db import migrate
    from loreg.registry.db.session import make_engine
    from loreg.registry.settings import Settings

    engine = make_engine(Settings().effective_database_url)
    try:
        click.echo(f"current {migrate.current_revision(engine) or 'empty'}, head {migrate.head_revision()}")
    finally:
        engine.dispose()
