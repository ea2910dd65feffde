"""`loreg serve`: one uvicorn process, or N worker processes sharing metrics through a folder."""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

import click

from loreg.registry.errors import SettingsInvalidError

ACCESS_LOG = "loreg.access"


def log_config(level: str) -> dict[str, Any]:
    """uvicorn's own logs as usual; its access log replaced by loreg's JSON lines (request id, token id)."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {
            "plain": {"format": "%(levelname)s %(name)s: %(message)s"},
            "json_line": {"format": "%(message)s"},
        },
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "plain", "stream": "ext://sys.stderr"},
            "access": {"class": "logging.StreamHandler", "formatter": "json_line", "stream": "ext://sys.stderr"},
        },
        "loggers": {
            "uvicorn": {"handlers": ["stderr"], "level": level.upper(), "propagate": False},
            "loreg": {"handlers": ["stderr"], "level": level.upper(), "propagate": False},
            # every request, whatever --log-level: an operator greps these by request id
            ACCESS_LOG: {"handlers": ["access"], "level": "INFO", "propagate": False},
        },
    }


def run_server(host: str, port: int, log_level: str, workers: int) -> None:
    import uvicorn

    from loreg.registry.allocator import tune_for_streaming
    from loreg.registry.http import protocol_with_header_deadline
    from loreg.registry.settings import Settings

    settings = Settings()
    if workers > 1 and settings.embedded:
        # SQLite takes one writer at a time and the embedded default runs its export workers as
        # threads of the one process: N processes would fight over the file and each merge
        raise SettingsInvalidError(
            "--workers > 1 needs Postgres", hint="set LOREG_DATABASE_URL to a Postgres URL, or run one process"
        )
    metrics_dir = share_metrics(workers)
    try:
        from loreg.registry.server import prepare

        app, url = prepare(host, port, settings)
        click.echo(f"loreg serving at {url}" + (f" with {workers} processes" if workers > 1 else ""), err=True)
        options: dict[str, Any] = dict(
            host=host, port=port, log_level=log_level, log_config=log_config(log_level), access_log=False,
            timeout_keep_alive=5,
            # h11 bounds request headers (h11_max_incomplete_event_size), and our subclass closes
            # connections whose headers do not arrive within LOREG_HEADER_TIMEOUT_S
            http=protocol_with_header_deadline(settings.header_timeout_s),
            limit_concurrency=512,
            # uvicorn would take X-Forwarded-For from any loopback peer; LOREG_TRUSTED_PROXIES decides
            proxy_headers=False,
            h11_max_incomplete_event_size=64 * 1024,
        )
        if workers == 1:
            tune_for_streaming()
            uvicorn.run(app, **options)
        else:
            # each worker process builds its own app from the environment (loreg.registry.asgi)
            app.state.registry.close()
            options["http"] = "loreg.registry.http:SettingsHeaderDeadlineProtocol"
            uvicorn.run("loreg.registry.asgi:app", workers=workers, **options)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def share_metrics(workers: int) -> str | None:
    """Put prometheus-client in multiprocess mode when values must be summed across processes;
    returns a temporary folder to remove at exit. Set before prometheus_client is first imported.

    LOREG_METRICS_DIR names a folder kept across runs that `loreg serve` and `loreg gc` / `fsck`
    share (their results then show in /metrics); else N API processes share a temporary one.
    """
    shared = os.environ.get("LOREG_METRICS_DIR")
    if shared:
        os.makedirs(shared, exist_ok=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = shared
        return None
    if workers == 1 or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    folder = tempfile.mkdtemp(prefix="loreg-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    return folder
