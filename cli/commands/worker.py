from __future__ import annotations

import click


@click.command()
@click.option("--once", is_flag=True, help="Run at most one job, then exit.")
@click.option("--device", default=None, help="auto (default), cpu or cuda[:N].")
def worker(once: bool, device: str | None) -> None:
    """Run a standalone job worker (Postgres): claims export and combination jobs under a renewed lease."""
    import signal
    import threading

    from loreg.registry.admin import open_for_admin
    from loreg.registry.errors import SettingsInvalidError
    from loreg.registry.merge.worker import JobWorker
    from loreg.registry.settings import Settings

    settings = Settings()
    if settings.embedded:
        raise SettingsInvalidError(
            "standalone workers need Postgres (LOREG_DATABASE_URL)",
            hint="on the embedded default, `loreg serve` runs the export worker itself",
        )
    registry = open_for_admin(settings)
    try:
        w = JobWorker(registry, device=device)
        click.echo(f"job worker {w.owner} started (exports, combinations)", err=True)
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
