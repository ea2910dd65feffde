"""Request ids end to end: `loreg serve` logs one JSON line per request, and the CLI prints the id of
a failed request so that a user can quote it to the operator, who finds it in that log."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.support.server import env_with, loreg, poll_until, serving, token_for

pytestmark = pytest.mark.slow


def access_lines(log: Path) -> list[dict[str, object]]:
    out = []
    for line in log.read_text().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def test_cli_prints_the_request_id_the_server_logged(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with serving(env_with(LOREG_HOME=str(home)), tmp_path) as (url, _proc):
        token = token_for(home, url)
        done = loreg("show", "org/missing:9", env=env_with(LOREG_HOME=str(home), LOREG_URL=url), cwd=tmp_path,
                     check=False)
        assert done.returncode == 1
        quoted = re.search(r"request id: ([0-9a-f]{32})", done.stderr)
        assert quoted, done.stderr
        log = tmp_path / f"serve-{url.rsplit(':', 1)[1]}.log"

        def logged() -> list[dict[str, object]]:
            return [e for e in access_lines(log) if e["request_id"] == quoted.group(1)]

        [entry] = poll_until(logged, "the access log line of the failed request")
    assert entry["status"] == 404 and entry["method"] == "GET"
    assert str(entry["route"]).startswith("/v1/adapters/{namespace}/{name}")
    assert entry["token_id"] == token.split("_")[1]
    assert isinstance(entry["duration_ms"], float | int)
    # the secret is in no log line
    assert token not in log.read_text() and token.split("_")[2][:20] not in log.read_text()


def test_cli_json_error_carries_the_request_id(tmp_path: Path) -> None:
    home = tmp_path / "home"
    with serving(env_with(LOREG_HOME=str(home)), tmp_path) as (url, _proc):
        done = loreg("show", "org/missing:9", "--json", env=env_with(LOREG_HOME=str(home), LOREG_URL=url),
                     cwd=tmp_path, check=False)
    assert done.returncode == 1
    body = json.loads(done.stdout)
    assert body["errors"][0]["code"] in ("ADAPTER_NOT_FOUND", "NOT_FOUND", "VERSION_NOT_FOUND")
    assert re.fullmatch(r"[0-9a-f]{32}", body["request_id"])
