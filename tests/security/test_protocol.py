"""HTTP details (TESTPLAN B20 and friends): duplicate JSON keys are refused on every JSON route,
Range follows RFC 9110 (suffix ranges served; unknown units, invalid and multiple ranges ignored),
no redirect is built from the Host header, and the API description pages load nothing from
another host."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from tests.security.conftest import SQLITE_ONLY, Pusher, assert_nothing_stored, error_of, snapshot
from tests.security.test_auth import concrete_path, operations


def _token_count(registry: Any) -> int:
    with registry.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM tokens")).scalar() or 0)


# --- duplicate keys ------------------------------------------------------------------------------


@SQLITE_ONLY
def test_every_json_route_refuses_a_repeated_key(app: Any, api: TestClient, registry: Any) -> None:
    before = snapshot(registry)
    checked = 0
    for method, path, route in operations(app):
        if route.body_field is None:
            continue
        resp = api.request(method, concrete_path(route), content=b'{"dup": 1, "dup": 2}',
                           headers={"Content-Type": "application/json"})
        err = error_of(resp, 400, "DUPLICATE_KEY")
        assert err["detail"]["key"] == "dup" and "dup" in err["message"], (method, path)
        checked += 1
    assert checked >= 6  # the walk reaches the JSON routes
    assert_nothing_stored(registry, before)


@SQLITE_ONLY
def test_a_repeated_key_cannot_change_what_a_request_means(api: TestClient, registry: Any) -> None:
    count = _token_count(registry)
    for body, headers in (
        (b'{"scope": "read", "scope": "admin"}', {"Content-Type": "application/json"}),
        (b'{"scope": "read", "namespaces": ["a"], "description": "x", "scope": "admin"}', {}),  # no Content-Type
        (b'{"scope": "read", "expires_at": null, "\\u0073cope": "admin"}', {"Content-Type": "application/json"}),
    ):
        err = error_of(api.post("/v1/tokens", content=body, headers=headers), 400, "DUPLICATE_KEY")
        assert err["detail"]["key"] == "scope"
    # nested objects, and a chunked body
    nested = b'{"digests": ["sha256:' + b"0" * 64 + b'"], "x": {"k": 1, "k": 2}}'
    error_of(api.post("/v1/adapters/org/x/blobs:check", content=iter([nested[:10], nested[10:]]),
                      headers={"Content-Type": "application/json"}), 400, "DUPLICATE_KEY")
    assert _token_count(registry) == count
    # the same requests without the repeat still work
    assert api.post("/v1/tokens", json={"scope": "read"}).status_code == 201


# --- Range ---------------------------------------------------------------------------------------


@pytest.fixture
def stored_file(pusher: Pusher) -> tuple[TestClient, str, bytes]:
    assert pusher.push("org/x").status_code == 201
    data = pusher.weights
    return pusher.http, "/v1/adapters/org/x/versions/1/files/adapter_model.safetensors", data


def test_suffix_ranges_are_served(stored_file: tuple[TestClient, str, bytes]) -> None:
    http, url, data = stored_file
    n = len(data)
    resp = http.get(url, headers={"Range": "bytes=-5"})
    assert resp.status_code == 206 and resp.content == data[-5:]
    assert resp.headers["Content-Range"] == f"bytes {n - 5}-{n - 1}/{n}"
    longer = http.get(url, headers={"Range": f"bytes=-{n + 1000}"})  # longer than the file: all of it
    assert longer.status_code == 206 and longer.content == data
    assert longer.headers["Content-Range"] == f"bytes 0-{n - 1}/{n}"
    plain = http.get(url, headers={"Range": "bytes=3-9"})
    assert plain.status_code == 206 and plain.content == data[3:10]


@SQLITE_ONLY
@pytest.mark.parametrize("value", ["items=0-4", "bytes=0-4,10-14", "bytes=0-4, -3", "bytes=9-2", "bytes=x-", "bytes"])
def test_unknown_units_invalid_and_multiple_ranges_get_the_whole_file(
    stored_file: tuple[TestClient, str, bytes], value: str
) -> None:
    http, url, data = stored_file
    resp = http.get(url, headers={"Range": value})
    assert resp.status_code == 200 and resp.content == data
    assert "Content-Range" not in resp.headers


@SQLITE_ONLY
def test_unsatisfiable_ranges_get_416(stored_file: tuple[TestClient, str, bytes]) -> None:
    http, url, data = stored_file
    for value in ("bytes=-0", f"bytes={len(data)}-", f"bytes={len(data) + 5}-{len(data) + 9}"):
        resp = http.get(url, headers={"Range": value})
        assert resp.status_code == 416, value
        assert resp.headers["Content-Range"] == f"bytes */{len(data)}"


# --- redirects and the API description -----------------------------------------------------------


@SQLITE_ONLY
def test_a_trailing_slash_gets_no_redirect_built_from_the_host_header(api: TestClient) -> None:
    for path in ("/v1/adapters/", "/v1/tokens/"):
        resp = api.get(path, headers={"Host": "evil.example"}, follow_redirects=False)
        assert "evil.example" not in resp.headers.get("location", ""), path
        error_of(resp, 404, "NOT_FOUND")


@SQLITE_ONLY
@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_their_assets_from_the_app(anon: TestClient, page: str) -> None:
    resp = anon.get(page)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    html = resp.text
    assert not re.search(r"(https?:)?//", html), "the page names another host"
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    scripts = [a for a in assets if a.endswith(".js")]
    assert scripts, html[:500]
    for asset in assets:
        got = anon.get(asset)
        assert got.status_code == 200 and len(got.content) > 1000, asset
    assert "/openapi.json" in html
    assert anon.get("/openapi.json").status_code == 200  # public, like the pages
