"""Who must be refused: TESTPLAN A1-A8 on every route that exists.

Decisions these tests pin down:
- A3: a token is refused a namespace it does not cover with 403 DENIED whether or not the adapter
  exists (the same answer for team-b/x and team-b/ghost, so 403 leaks nothing).
- A7: failed authentications are counted per client address and per (address, token id), as
  PyPI counts per address. Once an address is over the limit, it gets 429 for malformed and unknown
  tokens and wrong secrets, while a token that verifies is answered (clients behind one NAT or proxy
  share an address); an id over its own limit gets 429 without its secret being checked. The
  address is the peer's, or from X-Forwarded-For when the peer is in LOREG_TRUSTED_PROXIES.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import stat
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import routing
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from sqlalchemy import inspect, text

from loreg.cli import config as cli_config
from loreg.cli.client import RegistryClient
from loreg.registry import errors
from loreg.registry.api.deps import Permission
from loreg.registry.api.ratelimit import FailureLimiter
from loreg.registry.app import api_routes
from loreg.registry.services import tokens as token_service
from tests.security.conftest import (
    SQLITE_ONLY,
    Pusher,
    assert_blob_absent,
    assert_nothing_stored,
    error_of,
    sha256,
    snapshot,
)

PUBLIC = {("GET", "/v1/health"), ("GET", "/v1/ready")}
# the API description and its page assets, public (DESIGN.md section 6)
DOCS = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc", "/docs/assets", "/ui/static"}


def is_page(path: str) -> bool:
    """A page of the web interface: it answers a missing token with the login page (tests/web/test_access.py)."""
    return path == "/" or path == "/ui" or path.startswith("/ui/")
REPO = Path(__file__).resolve().parents[2]

# values for path parameters when a route is called without knowing what it is
PATH_VALUES = {
    "namespace": "org",
    "name": "x",
    "tag": "1",
    "path": "adapter_config.json",
    "alias": "prod",
    "ref": "loreg-test/tiny-llama",
    "digest": "sha256:" + "0" * 64,
    "token_id": "abcdefabcdef",
    "export_id": "0" * 32,
}


def permissions_of(route: Any) -> list[Permission]:
    found: list[Permission] = []
    stack = [route.dependant]
    while stack:
        dep = stack.pop()
        if isinstance(dep.call, Permission):
            found.append(dep.call)
        stack.extend(dep.dependencies)
    return found


def route_contexts(app: Any) -> list[Any]:
    """The routes as served, with what include_router added; FastAPI >= 0.160 nests routers in app.routes."""
    iterate = getattr(routing, "iter_route_contexts", None)
    return list(iterate(app.routes)) if iterate else list(app.routes)


def original(ctx: Any) -> Any:
    return getattr(ctx, "original_route", ctx)


def operations(app: Any) -> list[tuple[str, str, Any]]:
    """(method, path, route) of every API operation, routers included, as the app serves them."""
    out = []
    for ctx in route_contexts(app):
        if not isinstance(original(ctx), APIRoute):
            continue
        for method in sorted((ctx.methods or set()) - {"HEAD", "OPTIONS"}):
            out.append((method, ctx.path, ctx))
    return out


def concrete_path(route: Any) -> str:
    values = {p: PATH_VALUES.get(p, "x1") for p in route.param_convertors}
    return route.path_format.format(**values)


def forged_token(token: str) -> str:
    """Same shape as ``token`` with a wrong checksum."""
    last = token[-1]
    return token[:-1] + ("A" if last != "A" else "B")


def wrong_secret(token: str) -> str:
    """Same id, another secret, a valid checksum: it parses, and fails only on the server."""
    token_id = token_service.parse_token(token)[0]  # type: ignore[index]
    body = f"{token_service.PREFIX}{token_id}_{'W' * 32}"
    return body + token_service._checksum(body)


def unknown_token() -> str:
    """Well-formed, valid checksum, never issued."""
    body = f"{token_service.PREFIX}{'q' * 12}_{'Z' * 32}"
    return body + token_service._checksum(body)


@pytest.fixture
def seeded(pusher: Pusher, api: TestClient) -> Pusher:
    """org/x:1 with alias prod, team-a/x:1 and team-b/x:1 (alias prod), pushed as admin."""
    for name in ("org/x", "team-a/x", "team-b/x"):
        resp = pusher.push(name, aliases=["prod"])
        assert resp.status_code == 201, resp.text
    return pusher


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- A1 ------------------------------------------------------------------------------------------


@SQLITE_ONLY
def test_every_route_declares_a_permission(app: Any) -> None:
    ops = operations(app)
    missing = [f"{m} {p}" for m, p, route in ops if (m, p) not in PUBLIC and not permissions_of(route)]
    assert missing == [], f"routes without a Permission dependency: {missing}"
    assert PUBLIC <= {(m, p) for m, p, _ in ops}
    assert len(ops) >= 25  # the walk sees the included routers (FastAPI nests them in app.routes)
    assert {r.path for r in api_routes(app)} == {p for _, p, _ in ops}
    others = [getattr(c, "path", repr(c)) for c in route_contexts(app) if not isinstance(original(c), APIRoute)]
    assert set(others) <= DOCS, f"routes outside FastAPI's dependency system: {sorted(set(others) - DOCS)}"


@SQLITE_ONLY
def test_public_routes_answer_without_a_token(anon: TestClient) -> None:
    assert anon.get("/v1/health").status_code == 200
    assert anon.get("/v1/ready").status_code == 200


@SQLITE_ONLY
@pytest.mark.parametrize("variant", ["none", "not-bearer", "malformed", "bad-checksum", "never-issued"])
def test_every_route_refuses_requests_without_a_valid_token(
    app: Any, seeded: Pusher, make_token: Any, registry: Any, variant: str
) -> None:
    app.state.auth_limiter = FailureLimiter(10**6, 300.0)  # this sweep fails on purpose, many times
    headers = {
        "none": {},
        "not-bearer": {"Authorization": "Basic YWRtaW46cGFzc3dvcmQxMjM0"},
        "malformed": bearer("loreg_nope"),
        "bad-checksum": bearer(forged_token(make_token("admin"))),
        "never-issued": bearer(unknown_token()),
    }[variant]
    before = snapshot(registry)
    with TestClient(app, raise_server_exceptions=False) as http:
        checked = 0
        for method, path, route in operations(app):
            if (method, path) in PUBLIC or is_page(path):
                continue
            kwargs: dict[str, Any] = {"headers": headers}
            if route.body_field is not None:
                kwargs["json"] = {}
            if path.endswith("/blobs/{digest}") or path.endswith("/versions:validate"):
                kwargs["content"] = b"payload"
            resp = http.request(method, concrete_path(route), **kwargs)
            err = error_of(resp, 401, "UNAUTHORIZED")
            assert resp.headers["WWW-Authenticate"].startswith("Bearer"), (method, path)
            assert err["message"]
            checked += 1
    assert checked >= 15
    assert_nothing_stored(registry, before)
    assert_blob_absent(registry, sha256(b"payload"))


# --- A2 ------------------------------------------------------------------------------------------


def test_read_token_cannot_change_anything(app: Any, seeded: Pusher, make_token: Any, registry: Any) -> None:
    read = make_token("read")
    before = snapshot(registry)
    new_bytes = b"a new blob"
    files = [{"path": k, "size": len(v), "digest": sha256(v)} for k, v in seeded.files.items()]
    with TestClient(app, raise_server_exceptions=False, headers=bearer(read)) as http:
        assert http.get("/v1/adapters/org/x/versions/1").status_code == 200  # reading is allowed
        attempts = [
            http.post("/v1/adapters/org/x/blobs:check", json={"digests": [sha256(new_bytes)]}),
            http.put(f"/v1/adapters/org/x/blobs/{sha256(new_bytes)}", content=new_bytes),
            http.post("/v1/adapters/org/new/blobs:mount", json={"digest": files[0]["digest"], "from": "org/x"}),
            http.post("/v1/adapters/org/x/versions:validate", params={"size": 8}, content=b"\0" * 16),
            http.post("/v1/base-models/blobs:check", json={"digests": [sha256(new_bytes)]}),
            http.put(f"/v1/base-models/blobs/{sha256(new_bytes)}", content=new_bytes),
            http.post("/v1/adapters/org/x/versions", json={"files": files, "message": "again"}),
            http.post("/v1/adapters/org/new/versions", json={"files": files}),
            http.delete("/v1/adapters/org/x/versions/1"),
            http.put("/v1/adapters/org/x/aliases/prod", json={"version": 1}),
            http.put("/v1/adapters/org/x/aliases/staging", json={"version": 1}),
            http.delete("/v1/adapters/org/x/aliases/prod"),
            http.post("/v1/adapters/org/x/versions/1/metrics", json={"metrics": {"loss": 1.0}}),
            http.post("/v1/tokens", json={"scope": "admin"}),
            http.get("/v1/tokens"),
            http.delete("/v1/tokens/abcdefabcdef"),
        ]
    for resp in attempts:
        error_of(resp, 403, "DENIED")
    assert_nothing_stored(registry, before)
    assert_blob_absent(registry, sha256(new_bytes))


# --- A3 ------------------------------------------------------------------------------------------


def test_namespace_token_cannot_touch_another_namespace(
    app: Any, seeded: Pusher, make_token: Any, registry: Any
) -> None:
    team_a = make_token("write", ["team-a/*"])
    version = seeded.http.get("/v1/adapters/team-b/x/versions/1").json()
    files = [{"path": f["path"], "size": f["size"], "digest": f["digest"]} for f in version["files"]]
    before = snapshot(registry)
    with TestClient(app, raise_server_exceptions=False, headers=bearer(team_a)) as http:
        attempts = {
            "push to team-b/x": http.post("/v1/adapters/team-b/x/versions", json={"files": files, "message": "m"}),
            "push to team-b/new": http.post("/v1/adapters/team-b/new/versions", json={"files": files}),
            "delete team-b/x:1": http.delete("/v1/adapters/team-b/x/versions/1"),
            "delete by digest": http.delete(f"/v1/adapters/team-b/x/versions/{version['digest']}"),
            "delete by alias": http.delete("/v1/adapters/team-b/x/versions/prod"),
            "move alias": http.put("/v1/adapters/team-b/x/aliases/prod", json={"version": 1}),
            "new alias": http.put("/v1/adapters/team-b/x/aliases/canary", json={"version": 1}),
            "remove alias": http.delete("/v1/adapters/team-b/x/aliases/prod"),
            "add metrics": http.post("/v1/adapters/team-b/x/versions/1/metrics", json={"metrics": {"l": 1.0}}),
            "check team-b's blobs": http.post("/v1/adapters/team-b/x/blobs:check", json={"digests": [files[0]["digest"]]}),
            "upload for team-b": http.put(f"/v1/adapters/team-b/x/blobs/{sha256(b'new')}", content=b"new"),
            "mount into team-b": http.post("/v1/adapters/team-b/new/blobs:mount", json={"digest": files[0]["digest"], "from": "team-a/x"}),
            "mount from team-b": http.post("/v1/adapters/team-a/z/blobs:mount", json={"digest": files[0]["digest"], "from": "team-b/x"}),
            "validate for team-b": http.post("/v1/adapters/team-b/x/versions:validate", params={"size": 8}, content=b"\0" * 16),
            "read adapter": http.get("/v1/adapters/team-b/x"),
            "read version": http.get("/v1/adapters/team-b/x/versions/1"),
            "read file": http.get("/v1/adapters/team-b/x/versions/1/files/adapter_config.json"),
            "read alias": http.get("/v1/adapters/team-b/x/aliases/prod"),
            "inspect": http.get("/v1/adapters/team-b/x/versions/1/inspect"),
            "list namespace": http.get("/v1/adapters", params={"namespace": "team-b"}),
            # same answer for a name that does not exist: 403 leaks no existence
            "read ghost": http.get("/v1/adapters/team-b/ghost"),
            "ghost version": http.get("/v1/adapters/team-b/ghost/versions/1"),
        }
        for what, resp in attempts.items():
            assert resp.status_code == 403, (what, resp.status_code, resp.text[:300])
            error_of(resp, 403, "DENIED")
        assert_nothing_stored(registry, before)

        listed = http.get("/v1/adapters").json()["items"]
        assert sorted(i["name"] for i in listed) == ["team-a/x"]
        fits = http.get("/v1/base-models/loreg-test/tiny-llama/adapters").json()["items"]
        assert sorted(i["name"] for i in fits) == ["team-a/x"]
        # what it covers, it may do
        assert http.get("/v1/adapters/team-a/x/versions/1").status_code == 200
        # a new adapter of its own: the blobs are mounted from team-a/x (which holds them), then committed
        refused = http.post("/v1/adapters/team-a/y/versions", json={"files": files})
        error_of(refused, 422, "BLOB_MISSING")
        for f in files:
            mounted = http.post("/v1/adapters/team-a/y/blobs:mount", json={"digest": f["digest"], "from": "team-a/x"})
            assert mounted.status_code == 201, mounted.text
        assert http.post("/v1/adapters/team-a/y/versions", json={"files": files}).status_code == 201


@SQLITE_ONLY
def test_listing_pages_reveal_nothing_about_uncovered_namespaces(
    app: Any, pusher: Pusher, make_token: Any
) -> None:
    assert pusher.push("team-a/x").status_code == 201
    for name in ("team-b/secret-merger", "team-b/secret-merger-2"):
        assert pusher.push(name).status_code == 201
    team_a = make_token("read", ["team-a/*"])
    with TestClient(app, raise_server_exceptions=False, headers=bearer(team_a)) as http:
        page = http.get("/v1/adapters", params={"q": "secret-merger", "limit": 1}).json()
        assert page == {"items": [], "next_cursor": None}  # the same as for a query nothing matches
        first = http.get("/v1/adapters", params={"limit": 1}).json()
        assert [i["name"] for i in first["items"]] == ["team-a/x"]


@SQLITE_ONLY
def test_namespace_token_cannot_reach_another_namespace_through_export_ids(
    app: Any, api: TestClient, bare_client: RegistryClient, tiny_llama: dict[str, Path], make_token: Any, registry: Any
) -> None:
    from tests import factories

    bare_client.register_base(tiny_llama["base"], factories.base_name("llama"), upload_weights=True)
    bare_client.push(tiny_llama["adapter"], "team-b/x")
    bare_client.push(tiny_llama["adapter"], "team-a/x")
    created = api.post("/v1/exports", json={"adapters": [{"ref": "team-b/x:1"}]})
    assert created.status_code in (200, 202), created.text
    export_id = created.json()["id"]
    with registry.engine.connect() as conn:
        exports_before = conn.execute(text("SELECT count(*) FROM exports")).scalar()
    team_a = make_token("write", ["team-a/*"])
    with TestClient(app, raise_server_exceptions=False, headers=bearer(team_a)) as http:
        for resp in (
            http.get(f"/v1/exports/{export_id}"),
            http.get(f"/v1/exports/{export_id}/files/config.json"),
            http.post("/v1/exports", json={"adapters": [{"ref": "team-b/x:1"}]}),
            http.post("/v1/exports", json={"adapters": [{"ref": "team-a/x:1"}, {"ref": "team-b/x:1", "weight": 0.5}]}),
            http.get("/v1/adapters/team-b/x/versions/1/exports"),
        ):
            error_of(resp, 403, "DENIED")
    read = make_token("read", ["team-a/*"])  # a read token may export what it reads, nothing else
    with TestClient(app, raise_server_exceptions=False, headers=bearer(read)) as http:
        error_of(http.post("/v1/exports", json={"adapters": [{"ref": "team-b/x:1"}]}), 403, "DENIED")
    with registry.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM exports")).scalar() == exports_before


# --- A4 ------------------------------------------------------------------------------------------


def _last_used(registry: Any, token: str) -> Any:
    token_id = token_service.parse_token(token)[0]  # type: ignore[index]
    with registry.engine.connect() as conn:
        return conn.execute(text("SELECT last_used_at FROM tokens WHERE id = :i"), {"i": token_id}).scalar()


def test_revoked_and_expired_tokens_are_refused(app: Any, api: TestClient, make_token: Any, registry: Any) -> None:
    revoked = make_token("write")
    expired = make_token("write", expires_at=datetime.now(UTC) - timedelta(seconds=1))
    token_id = token_service.parse_token(revoked)[0]  # type: ignore[index]
    assert api.delete(f"/v1/tokens/{token_id}").status_code == 200
    with TestClient(app, raise_server_exceptions=False) as http:
        for token in (revoked, expired):
            resp = http.get("/v1/adapters", headers=bearer(token))
            error_of(resp, 401, "UNAUTHORIZED")
            assert "WWW-Authenticate" in resp.headers
            assert _last_used(registry, token) is None
        fresh = make_token("read", expires_at=datetime.now(UTC) + timedelta(hours=1))
        assert http.get("/v1/adapters", headers=bearer(fresh)).status_code == 200
        assert _last_used(registry, fresh) is not None


OFFSETS = st.integers(-(24 * 60 - 1), 24 * 60 - 1).map(lambda m: timezone(timedelta(minutes=m)))


def test_token_expiry_at_any_date_and_offset_is_stored_or_refused_with_a_4xx(
    api: TestClient, registry: Any
) -> None:
    """B20: the instant is stored in UTC, or refused with 400 naming the field when UTC cannot hold
    it (year 1 at +14:00, year 9999 at -14:00); never a 500."""

    @hypothesis_settings(max_examples=40, deadline=None, database=None,
                         suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59, 999999),
                        timezones=st.one_of(st.none(), OFFSETS)))
    @example(datetime.fromisoformat("0001-01-01T00:00:00+14:00"))
    @example(datetime.fromisoformat("9999-12-31T23:59:59-14:00"))
    @example(datetime.fromisoformat("0001-01-01T00:00:00-14:00"))
    @example(datetime.fromisoformat("9999-12-31T23:59:59+14:00"))
    def check(when: datetime) -> None:
        count = _token_count(registry)
        resp = api.post("/v1/tokens", json={"scope": "read", "expires_at": when.isoformat()})
        aware = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
        try:
            expected = aware.astimezone(UTC)
        except OverflowError:
            err = error_of(resp, 400, "REQUEST_INVALID")
            assert "expires_at" in err["message"] and err["detail"]["field"] == "expires_at"
            assert _token_count(registry) == count
            return
        assert resp.status_code == 201, (when.isoformat(), resp.status_code, resp.text[:300])
        assert datetime.fromisoformat(resp.json()["expires_at"]) == expected
        with registry.engine.connect() as conn:
            stored = conn.execute(text("SELECT expires_at FROM tokens WHERE id = :i"), {"i": resp.json()["id"]}).scalar()
        stored = stored if isinstance(stored, datetime) else datetime.fromisoformat(stored)
        assert (stored if stored.tzinfo else stored.replace(tzinfo=UTC)) == expected

    check()


# --- A5 ------------------------------------------------------------------------------------------


def test_database_holds_no_token_secret(api: TestClient, make_token: Any, registry: Any, settings: Any) -> None:
    created = api.post("/v1/tokens", json={"scope": "write", "namespaces": ["team-a/*"]})
    assert created.status_code == 201
    tokens = [created.json()["token"], make_token("read")]
    for token in tokens:
        assert api.get("/v1/tokens/self", headers=bearer(token)).status_code == 200  # last_used written
    dump = []
    with registry.engine.connect() as conn:
        for table in inspect(registry.engine).get_table_names():
            dump.extend(repr(tuple(row)) for row in conn.execute(text(f'SELECT * FROM "{table}"')))
        stored = dict(conn.execute(text("SELECT id, secret_hash FROM tokens")).all())
    text_dump = "\n".join(dump)
    if registry.engine.url.get_backend_name() == "sqlite":
        db = Path(registry.engine.url.database)
        text_dump += "".join(p.read_bytes().decode("latin-1") for p in db.parent.glob(db.name + "*"))
    for token in tokens:
        token_id, secret = token_service.parse_token(token)  # type: ignore[misc]
        assert secret not in text_dump and token not in text_dump
        assert token_id in text_dump  # looked up by its public id
        assert stored[token_id] == hashlib.sha256(secret.encode()).hexdigest()


def test_token_check_compares_hashes_in_constant_time() -> None:
    source = (REPO / "registry" / "services" / "tokens.py").read_text()
    tree = ast.parse(source)
    compared = [
        node for node in ast.walk(tree)
        if isinstance(node, ast.Compare) and "secret_hash" in ast.unparse(node)
    ]
    assert compared == [], "secret hashes must be compared with hmac.compare_digest, never =="
    assert "hmac.compare_digest(row.secret_hash" in source


@SQLITE_ONLY
def test_tokens_carry_a_prefix_and_a_checksum(make_token: Any) -> None:
    token = make_token("read")
    assert token.startswith("loreg_")
    assert token_service.parse_token(token) is not None
    for i in range(len("loreg_"), len(token)):  # any one-character typo is caught offline
        typo = token[:i] + ("x" if token[i] != "x" else "y") + token[i + 1:]
        assert token_service.parse_token(typo) is None, i


# --- A6 ------------------------------------------------------------------------------------------


@SQLITE_ONLY
def test_admin_routes_refuse_write_tokens(app: Any, make_token: Any, registry: Any, tiny_llama: dict[str, Path]) -> None:
    write = make_token("write")
    body = {
        "name": "evil/base",
        "tensors": [
            {"name": "w", "dtype": "F32", "shape": [1], "file": "model.safetensors", "digest": "sha256:" + "1" * 64}
        ],
        "files": [{"path": "model.safetensors", "size": 4, "digest": "sha256:" + "1" * 64}],
    }
    before = snapshot(registry)
    count = _token_count(registry)
    with TestClient(app, raise_server_exceptions=False) as http:
        for headers, status, code in ((bearer(write), 403, "DENIED"), ({}, 401, "UNAUTHORIZED")):
            error_of(http.post("/v1/tokens", json={"scope": "admin"}, headers=headers), status, code)
            error_of(http.get("/v1/tokens", headers=headers), status, code)
            error_of(http.delete("/v1/tokens/abcdefabcdef", headers=headers), status, code)
            error_of(http.post("/v1/base-models", json=body, headers=headers), status, code)
    assert _token_count(registry) == count
    assert_nothing_stored(registry, before)


def _token_count(registry: Any) -> int:
    with registry.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM tokens")).scalar() or 0)


# --- A7 ------------------------------------------------------------------------------------------


@SQLITE_ONLY
def test_failed_authentication_is_rate_limited_per_address(app: Any, make_token: Any, settings: Any) -> None:
    valid = make_token("read")
    limit = settings.auth_max_failures
    assert limit == 10 and settings.auth_failure_window_s == 300  # PyPI's 10 per 5 minutes
    with TestClient(app, raise_server_exceptions=False, client=("203.0.113.7", 40000)) as guesser:
        for _ in range(limit):
            error_of(guesser.get("/v1/adapters", headers=bearer(forged_token(valid))), 401, "UNAUTHORIZED")
        for token in (unknown_token(), "loreg_nope", forged_token(valid), wrong_secret(valid)):
            resp = guesser.get("/v1/adapters", headers=bearer(token))
            error_of(resp, 429, "TOOMANYREQUESTS")
            assert 1 <= int(resp.headers["Retry-After"]) <= 301
        # a client sharing the address (NAT, a proxy) whose token verifies is answered
        assert guesser.get("/v1/adapters", headers=bearer(valid)).status_code == 200
        assert guesser.get("/v1/adapters", headers=bearer(make_token("write"))).status_code == 200
        error_of(guesser.get("/v1/adapters", headers=bearer(unknown_token())), 429, "TOOMANYREQUESTS")
    with TestClient(app, raise_server_exceptions=False, client=("198.51.100.9", 40000)) as other:
        error_of(other.get("/v1/adapters", headers=bearer(unknown_token())), 401, "UNAUTHORIZED")
        assert other.get("/v1/adapters", headers=bearer(valid)).status_code == 200


@SQLITE_ONLY
def test_a_token_id_over_its_limit_is_refused_before_its_secret_is_checked(app: Any, make_token: Any) -> None:
    target, bystander = make_token("read"), make_token("read")
    with TestClient(app, raise_server_exceptions=False, client=("203.0.113.8", 40000)) as guesser:
        for _ in range(10):
            error_of(guesser.get("/v1/adapters", headers=bearer(wrong_secret(target))), 401, "UNAUTHORIZED")
        # the right secret of that id gets no answer that would tell a guesser it guessed right
        error_of(guesser.get("/v1/adapters", headers=bearer(target)), 429, "TOOMANYREQUESTS")
        assert guesser.get("/v1/adapters", headers=bearer(bystander)).status_code == 200
    with TestClient(app, raise_server_exceptions=False, client=("198.51.100.10", 40000)) as elsewhere:
        assert elsewhere.get("/v1/adapters", headers=bearer(target)).status_code == 200


@SQLITE_ONLY
def test_forwarded_for_names_the_client_only_behind_a_trusted_proxy(registry: Any, make_token: Any) -> None:
    from loreg.registry.app import create_app

    registry.settings.trusted_proxies = ["10.0.0.0/8"]
    app = create_app(registry=registry)
    valid = make_token("read")

    def fail_ten(http: TestClient, forwarded: str) -> None:
        for _ in range(10):
            resp = http.get("/v1/adapters", headers={**bearer(unknown_token()), "X-Forwarded-For": forwarded})
            error_of(resp, 401, "UNAUTHORIZED")

    with TestClient(app, raise_server_exceptions=False, client=("10.1.2.3", 40000)) as proxy:
        # the client the proxy appended (right-most untrusted hop) is counted, not what it claimed
        fail_ten(proxy, "1.1.1.1, 203.0.113.20, 10.9.9.9")
        blocked = proxy.get("/v1/adapters", headers={**bearer(unknown_token()), "X-Forwarded-For": "203.0.113.20"})
        error_of(blocked, 429, "TOOMANYREQUESTS")
        other = proxy.get("/v1/adapters", headers={**bearer(unknown_token()), "X-Forwarded-For": "203.0.113.21"})
        error_of(other, 401, "UNAUTHORIZED")
        fine = proxy.get("/v1/adapters", headers={**bearer(valid), "X-Forwarded-For": "203.0.113.20"})
        assert fine.status_code == 200
    with TestClient(app, raise_server_exceptions=False, client=("192.0.2.50", 40000)) as direct:
        # an untrusted peer cannot move its failures onto other addresses by writing the header
        for i in range(10):
            resp = direct.get("/v1/adapters", headers={**bearer(unknown_token()), "X-Forwarded-For": f"198.18.0.{i}"})
            error_of(resp, 401, "UNAUTHORIZED")
        spoofed = direct.get("/v1/adapters", headers={**bearer(unknown_token()), "X-Forwarded-For": "198.18.0.99"})
        error_of(spoofed, 429, "TOOMANYREQUESTS")


def test_trusted_proxies_setting_takes_a_comma_separated_list_of_networks(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    from loreg.registry.settings import Settings

    monkeypatch.setenv("LOREG_TRUSTED_PROXIES", "10.0.0.0/8, 192.0.2.7,2001:db8::/32")
    assert Settings().trusted_proxies == ["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"]
    monkeypatch.setenv("LOREG_TRUSTED_PROXIES", "10.0.0.0/8,not-a-network")
    with pytest.raises(ValidationError, match="not-a-network"):
        Settings()
    monkeypatch.delenv("LOREG_TRUSTED_PROXIES")
    assert Settings().trusted_proxies == []


@SQLITE_ONLY
def test_two_authorization_headers_are_refused(app: Any, make_token: Any, registry: Any) -> None:
    admin, read = make_token("admin"), make_token("read")
    before = snapshot(registry)
    count = _token_count(registry)
    with TestClient(app, raise_server_exceptions=False) as http:
        for first, second in ((read, admin), (admin, read)):
            headers = [("Authorization", f"Bearer {first}"), ("Authorization", f"Bearer {second}")]
            err = error_of(http.post("/v1/tokens", json={"scope": "admin"}, headers=headers), 400, "REQUEST_INVALID")
            assert "Authorization" in err["message"]
            error_of(http.get("/v1/adapters", headers=headers), 400, "REQUEST_INVALID")
    assert _token_count(registry) == count
    assert_nothing_stored(registry, before)


def test_rate_limit_window_passes() -> None:
    now = [1000.0]
    limiter = FailureLimiter(2, 60.0, clock=lambda: now[0])
    limiter.failed("a")
    limiter.failed("a")
    with pytest.raises(errors.TooManyRequestsError) as info:
        limiter.check("a")
    assert 1 <= info.value.detail["retry_after"] <= 61
    limiter.check("b")
    now[0] += 61
    limiter.check("a")


# --- A8 ------------------------------------------------------------------------------------------


@SQLITE_ONLY
def test_token_in_the_query_string_is_refused(app: Any, make_token: Any) -> None:
    token = make_token("admin")
    with TestClient(app, raise_server_exceptions=False) as http:
        for param in ("token", "access_token"):
            error_of(http.get("/v1/adapters", params={param: token}), 400, "REQUEST_INVALID")
            error_of(http.get("/v1/adapters", params={param: token}, headers=bearer(token)), 400, "REQUEST_INVALID")


@SQLITE_ONLY
def test_debug_logs_hold_no_token(
    bare_client: RegistryClient, tiny_llama: dict[str, Path], caplog: pytest.LogCaptureFixture, make_token: Any,
    tmp_path: Path,
) -> None:
    from tests import factories

    caplog.set_level(logging.DEBUG)
    bare_client.register_base(tiny_llama["base"], factories.base_name("llama"))
    bare_client.push(tiny_llama["adapter"], "org/x")
    bare_client.pull("org/x", tmp_path / "out")
    bad = forged_token(bare_client.token or "")
    with pytest.raises(errors.UnauthorizedError):
        bare_client.request("GET", "/v1/adapters", headers=bearer(bad))
    logged = caplog.text + "".join(repr(r.__dict__) for r in caplog.records)
    for token in (bare_client.token or "", bad):
        secret = token[len("loreg_") + 13:]
        assert secret and secret[:32] not in logged


def test_credentials_file_is_private(loreg_home: Path) -> None:
    path = cli_config.credentials_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{}")
    os.chmod(path, 0o644)
    cli_config.write_credential("http://registry.example:8080/", "loreg_token")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"http://registry.example:8080": "loreg_token"}
    assert sorted(p.name for p in path.parent.iterdir()) == ["credentials.json"]  # no temp file left


HOSTILE_FILE_NAMES = ["../../evil", "/tmp/evil", "..", "sub/evil", "..\\evil", "evil\x00.json", ".evil"]


def _fake_server(paths: list[str]) -> httpx.MockTransport:
    data = b"evil bytes"
    version = {
        "name": "org/x", "version": 1, "digest": "sha256:" + "2" * 64,
        "files": [{"path": p, "size": len(data), "digest": sha256(data)} for p in paths],
    }

    def handle(request: httpx.Request) -> httpx.Response:
        if "/files/" in request.url.path:
            return httpx.Response(200, content=data)
        return httpx.Response(200, json=version)

    return httpx.MockTransport(handle)


def _inside(path: Path, *roots: Path) -> bool:
    return any(path.is_relative_to(r) for r in roots)


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if not p.is_dir()}


@pytest.mark.parametrize("hostile", HOSTILE_FILE_NAMES)
def test_pull_refuses_server_supplied_paths(tmp_path: Path, loreg_home: Path, hostile: str) -> None:
    work = tmp_path / "work"
    dest = work / "a" / "b" / "out"
    work.mkdir()
    before = _files_under(tmp_path)
    http = httpx.Client(base_url="http://registry.test", transport=_fake_server(["adapter_config.json", hostile]))
    with RegistryClient("http://registry.test", "loreg_x", http=http) as client:
        with pytest.raises((errors.NameInvalidError, errors.UnsupportedFormatError)):
            client.pull("org/x:1", dest)
    created = {p for p in _files_under(tmp_path) - before if not _inside(p, dest, loreg_home)}
    assert created == set(), created
    assert not (work / "a" / "evil").exists() and not (work / "evil").exists()
    assert not Path("/tmp/evil").exists() or hostile != "/tmp/evil"


def test_cli_pull_exits_non_zero_on_a_hostile_file_name(
    tmp_path: Path, loreg_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from loreg.cli import main as cli_main

    data = b"evil"
    fake = {"name": "org/x", "version": 1, "files": [{"path": "../../evil", "size": len(data), "digest": sha256(data)}]}
    monkeypatch.setattr(RegistryClient, "version", lambda self, ref: dict(fake))
    monkeypatch.setenv("LOREG_URL", "http://127.0.0.1:9")  # never reached: the name is refused first
    monkeypatch.setenv("LOREG_TOKEN", "loreg_x")
    work = tmp_path / "w" / "x"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "argv", ["loreg", "pull", "org/x:1", "-o", "out"])
    before = _files_under(tmp_path)
    with pytest.raises(SystemExit) as info:
        cli_main.main()
    assert info.value.code != 0
    assert "NAME_INVALID" in capsys.readouterr().err
    created = {p for p in _files_under(tmp_path) - before if not _inside(p, work / "out", loreg_home)}
    assert created == set()
