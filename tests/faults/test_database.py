"""Postgres restarts and outages (TESTPLAN F4, F5) against the session's real Postgres cluster.

Every test that stops the cluster starts it again in a ``finally``: the cluster is shared by the
whole session.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from loreg.cli.client import RegistryClient
from loreg.registry import errors
from loreg.registry.app import create_app
from loreg.registry.db.session import make_engine, make_session_factory
from loreg.registry.services.context import AppContext
from loreg.registry.services.tokens import TokenService
from tests.faults.conftest import POSTGRES_ONLY, MiB, assert_pullable, blob_rows, sha256, tree, versions
from tests.support.adapters import variant
from tests.support.postgres import PgServer
from tests.support.server import poll_until

pytestmark = [pytest.mark.slow, POSTGRES_ONLY]

ANSWER_BOUND_S = 30.0  # "does not hang": a refused connection answers in milliseconds


def reads(api: Any, name: str) -> Iterator[Any]:
    """Requests that all need the database (token lookup, then metadata), in rotation."""
    paths = [f"/v1/adapters/{name}", f"/v1/adapters/{name}/versions/1", "/v1/adapters", "/v1/tokens"]
    i = 0
    while True:
        yield api.get(paths[i % len(paths)])
        i += 1


def fill_pool(api: Any, name: str, width: int = 4) -> None:
    """Use several pooled connections at once, so more than one is idle in the pool afterwards."""
    threads = [threading.Thread(target=lambda: [api.get(f"/v1/adapters/{name}") for _ in range(3)]) for _ in range(width)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)


def test_fast_restart_while_idle_loses_no_request_with_pool_pre_ping(
    api: Any, client: RegistryClient, registry: AppContext, pg_server: PgServer, adapter_dir: Path
) -> None:
    """F4: pool_pre_ping replaces the connections the restart killed before any request uses them."""
    client.push(adapter_dir, "org/pg")
    fill_pool(api, "org/pg")
    assert registry.engine.pool.checkedin() >= 1
    pg_server.restart("fast")
    statuses = [next(r).status_code for r in [reads(api, "org/pg")] for _ in range(20)]
    assert statuses == [200] * 20, statuses
    assert_pullable(registry, "org/pg")


def test_without_pool_pre_ping_a_restart_costs_requests_but_never_a_500(
    settings: Any, registry: AppContext, pg_server: PgServer, tiny_llama: dict[str, Path], adapter_dir: Path
) -> None:
    """F4 control run: without pool_pre_ping each dead pooled connection may fail one request, with a
    503 (retry), never a 500; then the pool recovers. This is why make_engine turns it on."""
    engine = make_engine(settings.database_url, pool_pre_ping=False)
    reg = dataclasses.replace(registry, engine=engine, sessions=make_session_factory(engine))
    token = TokenService(reg).create("admin", [])[1]
    try:
        with TestClient(create_app(registry=reg), raise_server_exceptions=False) as api:
            api.headers["Authorization"] = f"Bearer {token}"
            c = RegistryClient("http://testserver", token, http=api)
            from tests import factories

            c.register_base(tiny_llama["base"], factories.base_name("llama"))
            c.push(adapter_dir, "org/nopp")
            fill_pool(api, "org/nopp")
            pooled = engine.pool.checkedin()
            assert pooled >= 1
            pg_server.restart("fast")
            answers = [next(r) for r in [reads(api, "org/nopp")] for _ in range(20)]
    finally:
        engine.dispose()
    statuses = [a.status_code for a in answers]
    failed = [a for a in answers if a.status_code != 200]
    assert all(a.status_code == 503 and a.json()["errors"][0]["code"] == "DB_UNAVAILABLE" for a in failed), statuses
    assert "Retry-After" in (failed[0].headers if failed else {"Retry-After": ""})
    assert len(failed) <= pooled, statuses
    first_ok = statuses.index(200)
    assert statuses[first_ok:] == [200] * (20 - first_ok), statuses  # recovered for good


def test_a_pooled_connection_is_pinged_only_after_it_sat_idle(settings: Any) -> None:
    """make_engine pings on checkout only a connection idle longer than ping_after_idle_s: a fresh
    one never, a request's second checkout (the same connection, LIFO, a moment later) not within the
    window, an idle one always (the restart tests above show a dead one replaced)."""
    pinged: list[float] = []

    def engine_with(idle_s: float) -> Any:
        engine = make_engine(settings.database_url, ping_after_idle_s=idle_s)
        real = engine.dialect.do_ping
        engine.dialect.do_ping = lambda conn: (pinged.append(idle_s), real(conn))[1]  # type: ignore[method-assign]
        return engine

    for idle_s, expected in ((3600.0, []), (-1.0, [-1.0, -1.0])):
        engine = engine_with(idle_s)
        try:
            for _ in range(3):
                with engine.connect() as conn:
                    assert conn.exec_driver_sql("SELECT 1").scalar() == 1
            assert engine.pool.checkedin() == 1  # one connection, reused each time
        finally:
            engine.dispose()
        assert pinged == expected, (idle_s, pinged)
        pinged.clear()


def durable_commits(pg_server: PgServer, registry: AppContext) -> None:
    """The test cluster runs with synchronous_commit=off (speed), so an immediate stop, a crash,
    may lose the last commits. Turn it back on (the Postgres default) for this test's database,
    so "acknowledged = durable" (I5) is tested as in production; pooled connections reconnect."""
    dbname = registry.engine.url.database
    pg_server.execute(f"ALTER DATABASE {dbname} SET synchronous_commit = on")
    registry.engine.dispose()


def test_postgres_down_mid_push_is_503_not_500_and_a_retry_succeeds(
    live_server: str, admin_token: str, registry: AppContext, pg_server: PgServer, adapter_dir: Path, tmp_path: Path
) -> None:
    """F5: `pg_ctl stop -m immediate` while an upload streams; 503 DB_UNAVAILABLE everywhere until
    Postgres is back; no version; the retry succeeds."""
    auth = {"Authorization": f"Bearer {admin_token}"}
    durable_commits(pg_server, registry)
    with RegistryClient(live_server, admin_token) as c:
        c.push(adapter_dir, "org/down")
    data = b'{"x": "' + bytes(range(256)) * (4 * 4096)  # 4 MiB
    digest = sha256(data)
    half_sent, release = threading.Event(), threading.Event()
    result: dict[str, Any] = {}

    def body() -> Iterator[bytes]:
        for i in range(0, len(data), MiB):
            if i >= len(data) // 2 and not half_sent.is_set():
                half_sent.set()
                release.wait(120)  # held here while Postgres goes down
            yield data[i:i + MiB]

    def upload() -> None:
        with httpx.Client(base_url=live_server, headers=auth, timeout=120) as http:
            started = time.monotonic()
            result["resp"] = http.put(f"/v1/adapters/org/x/blobs/{digest}", content=body(),
                                      headers={"Content-Type": "application/octet-stream",
                                               "Content-Length": str(len(data))})
            result["elapsed"] = time.monotonic() - started

    uploader = threading.Thread(target=upload, daemon=True)
    uploader.start()
    try:
        assert half_sent.wait(120), "the upload never reached its middle"
        pg_server.stop("immediate")
        release.set()
        uploader.join(ANSWER_BOUND_S + 60)
        assert not uploader.is_alive()
        resp = result["resp"]
        assert resp.status_code == 503, resp.text
        assert resp.json()["errors"][0]["code"] == "DB_UNAVAILABLE"
        assert "Retry-After" in resp.headers

        with httpx.Client(base_url=live_server, headers=auth, timeout=ANSWER_BOUND_S + 30) as http:
            for method, path in [("GET", "/v1/ready"), ("GET", "/v1/adapters/org/down"),
                                 ("POST", "/v1/adapters/org/x/blobs:check")]:
                started = time.monotonic()
                answer = http.request(method, path, json={"digests": [digest]} if method == "POST" else None)
                assert time.monotonic() - started < ANSWER_BOUND_S
                assert answer.status_code == 503, (path, answer.text)
                if path == "/v1/ready":
                    assert answer.json()["checks"]["database"] != "ok"
                else:
                    assert answer.json()["errors"][0]["code"] == "DB_UNAVAILABLE"
            assert http.get("/v1/health").status_code == 200  # the process itself is fine
        other = variant(adapter_dir, tmp_path / "v2", seed=5)
        with RegistryClient(live_server, admin_token) as c, pytest.raises(errors.DbUnavailableError):
            c.push(other, "org/down")  # a push started while Postgres is down
    finally:
        release.set()
        pg_server.start()

    with httpx.Client(base_url=live_server, headers=auth, timeout=60) as http:
        poll_until(lambda: http.get("/v1/ready").status_code == 200, "the API to be ready again")
    assert versions(registry) == [("org/down", 1)]  # nothing of the failed push became visible
    assert digest not in blob_rows(registry)  # at most an unreferenced object, which GC takes
    with RegistryClient(live_server, admin_token) as c:
        out = c.push(other, "org/down")
        assert (out["created"], out["version"]) == (True, 2)
        c.pull("org/down:2", tmp_path / "pulled")
        up = c.request("PUT", f"/v1/adapters/org/x/blobs/{digest}", content=data, headers={"Content-Type": "application/octet-stream"})
        assert up.status_code in (200, 201)
    assert tree(tmp_path / "pulled") == tree(other)
    assert versions(registry) == [("org/down", 1), ("org/down", 2)]
    assert_pullable(registry, "org/down")
