from __future__ import annotations

import click


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--log-level", default="info", show_default=True)
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 256),
              help="API processes (Postgres only: SQLite and the in-process export workers are one process's).")
def serve(host: str, port: int, log_level: str, workers: int) -> None:
    """Run the registry server.

    With no configuration it keeps SQLite and a blob folder under LOREG_HOME, migrating on first
    start, and writes an admin token for its own URL into the credentials file. LOREG_DATABASE_URL
    and LOREG_STORAGE_URL (with LOREG_S3_ENDPOINT_URL) switch to Postgres and S3.

    Each request is logged on stderr as one JSON object (request id, route, status, duration, token
    id); GET /metrics answers in the Prometheus text format.
    """
    from loreg.cli.serving_process import run_server

    run_server(host, port, log_level, workers)
