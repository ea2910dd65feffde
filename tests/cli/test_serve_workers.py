"""`loreg serve --workers N`: N API processes on Postgres whose /metrics add up across processes;
refused on the embedded SQLite default."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.moto import free_port
from tests.support.server import LOREG, env_with, loreg, serving, token_for

pytestmark = pytest.mark.slow
ROUTE = "/v1/adapters/{namespace}/{name}"


def misses(url: str, headers: dict[str, str]) -> float:
    resp = httpx.get(f"{url}/metrics", headers=headers, timeout=10)
    assert resp.status_code == 200, resp.text
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            if s.name == "loreg_http_requests_total" and s.labels == {"method": "GET", "route": ROUTE, "status": "404"}:
                return s.value
    return 0.0


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_metrics_add_up_across_worker_processes(tmp_path: Path, settings: Any, make_token: Any) -> None:
    env = env_with(LOREG_HOME=str(tmp_path / "home"), LOREG_DATABASE_URL=settings.database_url,
                   LOREG_STORAGE_URL=settings.storage_url, LOREG_S3_ENDPOINT_URL=settings.s3_endpoint_url,
                   LOREG_S3_REGION=settings.s3_region, LOREG_EXPORT_WORKER="external")
    headers = {"Authorization": f"Bearer {make_token('admin')}"}
    with serving(env, tmp_path, "--workers", "2") as (url, _proc):
        for i in range(30):
            # a new connection each time, so that both processes take some
            with httpx.Client(headers=headers, timeout=10) as http:
                resp = http.get(f"{url}/v1/adapters/org/missing-{i}")
            assert resp.status_code == 404
        # every scrape, whichever process answers it, sees all thirty
        assert [misses(url, headers) for _ in range(6)] == [30.0] * 6


def test_workers_are_refused_on_sqlite(tmp_path: Path) -> None:
    env = env_with(LOREG_HOME=str(tmp_path / "home"))
    done = subprocess.run([LOREG, "serve", "--port", str(free_port()), "--workers", "2"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "--workers > 1 needs Postgres" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "home" / "loreg.db").exists()


def test_fsck_from_the_cli_shows_in_metrics_through_the_shared_folder(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = env_with(LOREG_HOME=str(home), LOREG_METRICS_DIR=str(tmp_path / "metrics"))
    with serving(env, tmp_path) as (url, _proc):
        headers = {"Authorization": f"Bearer {token_for(home, url)}"}
        loreg("fsck", env=env, cwd=tmp_path)
        text = httpx.get(f"{url}/metrics", headers=headers, timeout=10).text
    samples = {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples["loreg_fsck_checked_blobs"] == 0
    assert samples["loreg_fsck_last_run_timestamp_seconds"] > 0
