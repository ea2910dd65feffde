from __future__ import annotations

import click


@click.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=int)
@click.option("--log-level", default="info", show_default=True)
def serve(host: str, port: int, log_level: str) -> None:
    """Run the registry server.

    With no configuration it keeps SQLite and a blob folder under LOREG_HOME, migrating on first
    start, and writes an admin token for its own URL into the credentials file. LOREG_DATABASE_URL
    and LOREG_STORAGE_URL (with LOREG_S3_ENDPOINT_URL) switch to Postgres and S3.
    """
    import uvicorn

    from loreg.registry.http import protocol_with_header_deadline
    from loreg.registry.server import prepare

    app, url = prepare(host, port)
    settings = app.state.settings
    click.echo(f"loreg serving at {url}", err=True)
    uvicorn.run(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_keep_alive=5,
        # h11 bounds request headers (h11_max_incomplete_event_size), and our subclass closes
        # connections whose headers do not arrive within LOREG_HEADER_TIMEOUT_S
        http=protocol_with_header_deadline(settings.header_timeout_s),
        limit_concurrency=512,
        # uvicorn would take X-Forwarded-For from any loopback peer; LOREG_TRUSTED_PROXIES decides
        proxy_headers=False,
        h11_max_incomplete_event_size=64 * 1024,
    )
