"""Bounded requests: body limits answered with their own status before the body is read (I7, L5 part).

The ASGI driver below feeds the body chunk by chunk and counts what the app pulled, so "before the
body is read" is asserted, not assumed; the live-server tests do the same over a real socket.
"""

from __future__ import annotations

import asyncio
import http.client
import json
from collections.abc import Iterable
from typing import Any

import pytest

from loreg.registry.api.limits import BASE_BODY_FACTOR
from loreg.registry.app import create_app
from tests.security.conftest import (
    SQLITE_ONLY,
    assert_blob_absent,
    assert_known_refusal,
    assert_nothing_stored,
    error_of,
    sha256,
    snapshot,
)

MiB = 1024 * 1024


class Driven:
    def __init__(self, status: int, body: bytes, pulled: int, offered: int):
        self.status, self.body, self.pulled, self.offered = status, body, pulled, offered

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    @property
    def status_code(self) -> int:
        return self.status


def drive(app: Any, method: str, path: str, headers: dict[str, str], chunks: Iterable[bytes]) -> Driven:
    """One request through the ASGI app; counts the body chunks the app asked for."""
    pending = list(chunks)
    state = {"pulled": 0, "status": 0}
    out: list[bytes] = []

    async def run() -> None:
        done = asyncio.Event()

        async def receive() -> dict[str, Any]:
            if state["pulled"] < len(pending):
                chunk = pending[state["pulled"]]
                state["pulled"] += 1
                return {"type": "http.request", "body": chunk, "more_body": state["pulled"] < len(pending)}
            if not pending and state["pulled"] == 0:
                state["pulled"] = -1  # an empty body, delivered once
                return {"type": "http.request", "body": b"", "more_body": False}
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            elif message["type"] == "http.response.body":
                out.append(message.get("body", b""))
                if not message.get("more_body"):
                    done.set()

        scope = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.4"}, "http_version": "1.1",
            "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
            "root_path": "", "client": ("127.0.0.1", 50000), "server": ("testserver", 80),
            "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        }
        await app(scope, receive, send)

    asyncio.run(run())
    return Driven(state["status"], b"".join(out), max(state["pulled"], 0), len(pending))


@pytest.fixture
def small_limits(registry: Any, admin_token: str) -> tuple[Any, dict[str, str]]:
    """An app with max_file_size 9 MiB (over one S3 part) and max_json_body 64 KiB."""
    registry.settings.max_file_size = 9 * MiB
    registry.settings.max_json_body = 64 * 1024
    return create_app(registry=registry), {"Authorization": f"Bearer {admin_token}"}


def test_declared_upload_over_the_limit_is_refused_before_the_body_is_read(
    small_limits: tuple[Any, dict[str, str]], registry: Any
) -> None:
    app, auth = small_limits
    digest = "sha256:" + "ab" * 32
    before = snapshot(registry)
    resp = drive(app, "PUT", f"/v1/adapters/org/x/blobs/{digest}", {**auth, "Content-Length": str(9 * MiB + 1)}, [b"x" * MiB] * 10)
    err = error_of(resp, 413, "TOO_LARGE")
    assert err["detail"]["limit"] == 9 * MiB
    assert resp.pulled == 0
    assert_blob_absent(registry, digest)
    assert_nothing_stored(registry, before)


def test_chunked_upload_over_the_limit_is_refused_early(small_limits: tuple[Any, dict[str, str]], registry: Any) -> None:
    app, auth = small_limits
    chunk = bytes(range(256)) * 256  # 64 KiB
    chunks = [chunk] * 512  # 32 MiB offered, no Content-Length
    digest = sha256(b"".join(chunks))
    before = snapshot(registry)
    resp = drive(app, "PUT", f"/v1/adapters/org/x/blobs/{digest}", auth, chunks)
    error_of(resp, 413, "TOO_LARGE")
    # the limit plus what the bounded queue and read buffers hold, never the whole body
    assert resp.pulled * len(chunk) <= 9 * MiB + 4 * MiB, resp.pulled
    assert_blob_absent(registry, digest)
    assert_nothing_stored(registry, before)


@SQLITE_ONLY
def test_upload_at_the_limit_is_accepted(small_limits: tuple[Any, dict[str, str]], registry: Any) -> None:
    app, auth = small_limits
    data = bytes(range(256)) * (9 * 4096)
    resp = drive(app, "PUT", f"/v1/adapters/org/x/blobs/{sha256(data)}", auth, [data[i:i + MiB] for i in range(0, len(data), MiB)])
    assert resp.status == 201, resp.text
    assert registry.store.exists(sha256(data))


@SQLITE_ONLY
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_json_body_over_the_limit_is_413(small_limits: tuple[Any, dict[str, str]], registry: Any, declared: bool) -> None:
    app, auth = small_limits
    body = json.dumps({"files": [], "message": "x" * (128 * 1024)}).encode()
    chunks = [body[i:i + 4096] for i in range(0, len(body), 4096)]
    headers = {**auth, "Content-Type": "application/json"}
    if declared:
        headers["Content-Length"] = str(len(body))
    before = snapshot(registry)
    for path in ("/v1/adapters/org/x/versions", "/v1/adapters/org/x/blobs:check", "/v1/tokens", "/v1/exports"):
        resp = drive(app, "POST", path, headers, chunks)
        err = error_of(resp, 413, "TOO_LARGE")
        assert "64" in err["message"] or err["detail"].get("limit") == 64 * 1024
        if declared:
            assert resp.pulled == 0
        else:
            assert resp.pulled * 4096 <= 64 * 1024 + 4096
    assert_nothing_stored(registry, before)


@SQLITE_ONLY
def test_unauthenticated_oversized_body_is_refused_without_reading_it(small_limits: tuple[Any, dict[str, str]]) -> None:
    app, _ = small_limits
    resp = drive(app, "POST", "/v1/adapters/org/x/versions", {"Content-Length": str(10 * MiB)}, [b"{"] * 4)
    assert resp.status in (401, 413) and resp.pulled == 0


@SQLITE_ONLY
def test_base_registration_may_be_larger_than_other_json(small_limits: tuple[Any, dict[str, str]], registry: Any) -> None:
    """A base's tensor list is the one big JSON body: it gets BASE_BODY_FACTOR x max_json_body."""
    app, auth = small_limits
    tensors = [{"name": f"model.layers.{i}.weight", "dtype": "F32", "shape": [4, 4], "file": "model.safetensors",
                "digest": "sha256:" + "1" * 64} for i in range(2000)]  # ~250 KiB, over max_json_body
    body = json.dumps({"name": "Org/Model", "tensors": tensors, "files": [
        {"path": "model.safetensors", "size": 4, "digest": "sha256:" + "1" * 64}]}).encode()
    headers = {**auth, "Content-Type": "application/json", "Content-Length": str(len(body))}
    resp = drive(app, "POST", "/v1/base-models", headers, [body])
    assert resp.status == 201, resp.text
    over = BASE_BODY_FACTOR * 64 * 1024 + 1
    resp = drive(app, "POST", "/v1/base-models", {**headers, "Content-Length": str(over)}, [body])
    error_of(resp, 413, "TOO_LARGE")
    assert resp.pulled == 0


NASTY_JSON = {
    "deeply nested": b"[" * 50_000 + b"]" * 50_000,
    "deeply nested object": b'{"files":' + b'{"a":' * 20_000 + b"1" + b"}" * 20_001,
    "many files": json.dumps({"files": [{"path": f"f{i}", "size": 1, "digest": "sha256:" + "0" * 64}
                                        for i in range(300)]}).encode(),
    "many metrics": json.dumps({"files": [], "metrics": {f"m{i}": 1.0 for i in range(2000)}}).encode(),
    "huge integer": b'{"files": [{"path": "a", "size": ' + b"9" * 5000 + b', "digest": "x"}]}',
    "NaN metric": b'{"files": [], "metrics": {"loss": NaN}}',
    "not JSON": b"\xff\xfe{",
    "wrong content type": b"files=1",
}


@SQLITE_ONLY
@pytest.mark.parametrize("case", sorted(NASTY_JSON))
def test_nasty_json_bodies_get_a_4xx(api: Any, registry: Any, case: str) -> None:
    body = NASTY_JSON[case]
    content_type = "application/x-www-form-urlencoded" if case == "wrong content type" else "application/json"
    before = snapshot(registry)
    for path in ("/v1/adapters/org/x/versions", "/v1/base-models", "/v1/adapters/org/x/blobs:check", "/v1/exports"):
        resp = api.post(path, content=body, headers={"Content-Type": content_type})
        assert 400 <= resp.status_code < 500, (path, resp.status_code, resp.text[:300])
        assert_known_refusal(resp)
    assert_nothing_stored(registry, before)


# --- over a real socket (uvicorn) ----------------------------------------------------------------


def _send_headers_only(base: str, method: str, path: str, headers: dict[str, str]) -> tuple[int, Any]:
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.putrequest(method, path)
        for k, v in headers.items():
            conn.putheader(k, v)
        conn.endheaders(b"{")  # one byte of a body announced as gigabytes
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


@SQLITE_ONLY
@pytest.mark.parametrize("path", ["/v1/adapters/org/x/blobs/sha256:" + "cd" * 32, "/v1/adapters/org/x/versions"])
def test_live_server_answers_413_without_waiting_for_the_body(live_server: str, admin_token: str, path: str) -> None:
    method = "PUT" if "/blobs/" in path else "POST"
    status, body = _send_headers_only(live_server, method, path, {
        "Authorization": f"Bearer {admin_token}", "Content-Type": "application/json", "Content-Length": str(5 * 1024**4),
    })
    assert status == 413 and body["errors"][0]["code"] == "TOO_LARGE"


def test_serve_bounds_request_header_size(monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn
    from click.testing import CliRunner

    from loreg.cli.commands.serve import serve
    from loreg.registry import server

    from types import SimpleNamespace

    from uvicorn.protocols.http.h11_impl import H11Protocol

    from loreg.registry.settings import Settings

    captured: dict[str, Any] = {}
    fake_app = SimpleNamespace(state=SimpleNamespace(settings=Settings()))
    monkeypatch.setattr(server, "prepare", lambda host, port, settings=None: (fake_app, f"http://{host}:{port}"))
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: captured.update(kw))
    result = CliRunner().invoke(serve, [])
    assert result.exit_code == 0, result.output
    assert captured.get("h11_max_incomplete_event_size")
    # h11 is the only implementation that enforces that limit (here with a header deadline on top)
    assert isinstance(captured.get("http"), type) and issubclass(captured["http"], H11Protocol)
    # uvicorn would believe X-Forwarded-For from any loopback peer; LOREG_TRUSTED_PROXIES decides
    assert captured.get("proxy_headers") is False
