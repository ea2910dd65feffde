from __future__ import annotations

import click


@click.command()
@click.option("--once", is_flag=True, help="Run at most one job, then exit.")
@click.option("--device", default=None, help="auto (default), cpu or cuda[:N].")
def worker(once: bool, device: str | None) -> None:
    """Run a standalone export worker (Postgres): claims merge jobs under a renewed lease."""
    import signal
    import threading

    from loreg.registry.db import migrate
    from loreg.registry.errors import DbUnavailableError
    from loreg.registry.merge.worker import ExportWorker
    from loreg.registry.services.context import open_registry
    from loreg.registry.settings import Settings

    settings = Settings()
    if settings.embedded:
        raise DbUnavailableError(
            "standalone workers need Postgres (LOREG_DATABASE_URL)",
            hint="on the embedded default, `loreg serve` runs the export worker itself",
        )
    registry = open_registry(settings)
    try:
        if not migrate.is_up_to_date(registry.engine):
            raise DbUnavailableError("the database schema is not current", hint="run `loreg db upgrade`")
        w = ExportWorker(registry, device=device)
        click.echo(f"export worker {w.owner} started", err=True)
        if once:
            ran = w.run_once()
            click.echo(f"ran {ran}" if ran else "no job", err=True)
            return
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        w.run_forever(stop)
    finally:
        registry.close()
