"""Storage faults (TESTPLAN F6, F7, F8): S3 reset mid-upload, S3 slow, local disk full.

F6/F7 put the TCP proxy of tests/support/proxy.py between the server and moto, and serve the app
with uvicorn in a thread (real HTTP), so a blocked event loop would show as slow health checks.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from loreg.cli.client import RegistryClient
from loreg.registry import errors
from loreg.registry.app import create_app
from loreg.registry.services.context import AppContext, open_registry
from loreg.registry.services.maintenance import MaintenanceService
from loreg.registry.services.tokens import TokenService
from loreg.registry.storage.s3 import S3BlobStore
from tests import factories
from tests.faults.conftest import (
    POSTGRES_ONLY,
    SQLITE_ONLY,
    MiB,
    assert_pullable,
    blob_rows,
    sha256,
    staging_leftovers,
    tree,
    versions,
)
from tests.support.adapters import variant
from tests.support.moto import REGION, MotoServer
from tests.support.proxy import TcpProxy
from tests.support.server import poll_until, serve_in_thread

OCTET = {"Content-Type": "application/octet-stream"}


def payload(size: int) -> bytes:
    """``size`` random bytes that no magic-byte check refuses (JSON-looking start)."""
    return b'{"x": "' + os.urandom(size - 7)


@dataclass
class Proxied:
    registry: AppContext  # the server's: its S3 endpoint is the proxy
    direct: S3BlobStore  # the same bucket straight on moto, to look behind the server's back
    proxy: TcpProxy
    url: str
    token: str
    bucket: str
    prefix: str

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@contextmanager
def proxied_server(settings: Any, moto: MotoServer, base: Path, **store_options: Any) -> Iterator[Proxied]:
    """The app on S3 through a proxy to moto, served in a thread, with the tiny base registered."""
    parts = urlsplit(settings.storage_url)
    bucket, prefix = parts.netloc, parts.path.strip("/")
    with TcpProxy("127.0.0.1", moto.port) as proxy:
        server_settings = settings.model_copy(update={"s3_endpoint_url": proxy.url})
        store = S3BlobStore(bucket, prefix, endpoint_url=proxy.url, region=REGION, **store_options)
        registry = open_registry(server_settings, store=store)
        direct = S3BlobStore(bucket, prefix, endpoint_url=moto.endpoint_url, region=REGION)
        try:
            token = TokenService(registry).create("admin", [])[1]
            with serve_in_thread(create_app(registry=registry)) as url:
                with RegistryClient(url, token) as c:
                    c.register_base(base, factories.base_name("llama"))
                yield Proxied(registry, direct, proxy, url, token, bucket, prefix)
        finally:
            registry.close()
            direct.close()


@pytest.fixture
def proxied(settings: Any, moto_server: MotoServer, tiny_llama: dict[str, Path]) -> Iterator[Proxied]:
    with proxied_server(settings, moto_server, tiny_llama["base"]) as p:
        yield p


# --- F6: the connection to S3 is reset in the middle of a multipart upload ---------------------------


@pytest.mark.slow
@POSTGRES_ONLY
def test_s3_reset_mid_multipart_upload_is_503_and_leaves_nothing(
    proxied: Proxied, adapter_dir: Path, tmp_path: Path
) -> None:
    data = payload(12 * MiB)  # over one 8 MiB part: a multipart upload
    digest = sha256(data)
    proxy, registry = proxied.proxy, proxied.registry
    with httpx.Client(base_url=proxied.url, headers=proxied.auth, timeout=120) as http:
        proxy.reset_after(1 * MiB)
        resp = http.put(f"/v1/adapters/org/x/blobs/{digest}", content=data, headers=OCTET)
        assert resp.status_code == 503, resp.text
        assert resp.json()["errors"][0]["code"] == "STORAGE_UNAVAILABLE"
        assert int(resp.headers["Retry-After"]) > 0
        assert proxy.resets >= 1
        # nothing stored: no blob row, no object, no version
        assert digest not in blob_rows(registry)
        assert not proxied.direct.exists(digest)
        assert versions(registry) == []

        proxy.heal()
        # the server aborted its multipart upload, or (when the abort itself was reset) GC does
        if staging_leftovers(proxied.direct):
            report = MaintenanceService(registry).gc(grace=timedelta(0))
            assert report.multipart_aborted >= 1
        assert staging_leftovers(proxied.direct) == []

        # the retry after the network healed succeeds
        again = http.put(f"/v1/adapters/org/x/blobs/{digest}", content=data, headers=OCTET)
        assert again.status_code == 201, again.text
        assert proxied.direct.exists(digest) and proxied.direct.stat(digest).size == len(data)

    with RegistryClient(proxied.url, proxied.token) as c:
        out = c.push(adapter_dir, "org/after-reset")
        assert (out["created"], out["version"]) == (True, 1)
        c.pull("org/after-reset:1", tmp_path / "pulled")
    assert tree(tmp_path / "pulled") == tree(adapter_dir)
    assert staging_leftovers(proxied.direct) == []


@pytest.mark.slow
@POSTGRES_ONLY
def test_s3_refusing_connections_is_503_and_ready_says_so(proxied: Proxied, adapter_dir: Path) -> None:
    proxied.proxy.refuse()
    with httpx.Client(base_url=proxied.url, headers=proxied.auth, timeout=120) as http:
        data = payload(64 * 1024)
        resp = http.put(f"/v1/adapters/org/x/blobs/{sha256(data)}", content=data, headers=OCTET)
        assert resp.status_code == 503 and resp.json()["errors"][0]["code"] == "STORAGE_UNAVAILABLE", resp.text
        assert "Retry-After" in resp.headers
        ready = http.get("/v1/ready")
        assert ready.status_code == 503 and ready.json()["checks"]["storage"] != "ok"
        assert http.get("/v1/health").status_code == 200
        proxied.proxy.heal()
        assert http.get("/v1/ready").status_code == 200
        assert http.put(f"/v1/adapters/org/x/blobs/{sha256(data)}", content=data, headers=OCTET).status_code == 201
    assert sha256(data) in blob_rows(proxied.registry)


# --- F7: S3 is slow; the API keeps answering --------------------------------------------------------

LATENCY_S = 2.0  # per S3 response while slowed: a blob upload makes three S3 calls (stat, put, exists)
ANSWER_BOUND_S = 1.5  # a health or metadata GET takes ~0.02 s; a blocked event loop would hold one ~2 s


@pytest.mark.slow
@POSTGRES_ONLY
def test_slow_s3_during_an_upload_does_not_block_other_requests(proxied: Proxied, adapter_dir: Path) -> None:
    with RegistryClient(proxied.url, proxied.token) as c:
        c.push(adapter_dir, "org/meta")  # something for the metadata GETs to read
    data = payload(256 * 1024)
    digest = sha256(data)
    result: dict[str, Any] = {}

    def upload() -> None:
        with httpx.Client(base_url=proxied.url, headers=proxied.auth, timeout=120) as http:
            result["resp"] = http.put(f"/v1/adapters/org/x/blobs/{digest}", content=data, headers=OCTET)

    proxied.proxy.slow(LATENCY_S)
    uploader = threading.Thread(target=upload, daemon=True)
    timings: list[tuple[str, float]] = []
    with httpx.Client(base_url=proxied.url, headers=proxied.auth, timeout=60) as http:
        up_before, down_before = proxied.proxy.bytes_up, proxied.proxy.bytes_down
        uploader.start()
        # measure while the upload is held up in S3 (its first S3 request went through the proxy)
        poll_until(lambda: proxied.proxy.bytes_up > up_before or not uploader.is_alive(), "the upload to reach S3")
        while uploader.is_alive():
            for path in ("/v1/health", "/v1/adapters/org/meta"):
                started = time.monotonic()
                resp = http.get(path)
                timings.append((path, time.monotonic() - started))
                assert resp.status_code == 200, resp.text
        uploader.join(120)
    assert result["resp"].status_code == 201, result["resp"].text
    assert proxied.proxy.bytes_down > down_before
    assert len(timings) >= 4, timings  # the upload took seconds; the loop answered meanwhile
    slowest = max(timings, key=lambda t: t[1])
    assert slowest[1] < ANSWER_BOUND_S, slowest
    assert proxied.direct.exists(digest) and digest in blob_rows(proxied.registry)


@pytest.mark.slow
@POSTGRES_ONLY
def test_s3_slower_than_its_timeout_is_504_with_nothing_stored(
    settings: Any, moto_server: MotoServer, tiny_llama: dict[str, Path]
) -> None:
    with proxied_server(settings, moto_server, tiny_llama["base"], read_timeout=1.0, max_attempts=1) as p:
        data = payload(256 * 1024)
        digest = sha256(data)
        p.proxy.slow(LATENCY_S)
        with httpx.Client(base_url=p.url, headers=p.auth, timeout=120) as http:
            resp = http.put(f"/v1/adapters/org/x/blobs/{digest}", content=data, headers=OCTET)
            assert resp.status_code == 504 and resp.json()["errors"][0]["code"] == "STORAGE_TIMEOUT", resp.text
            p.proxy.heal()
            assert digest not in blob_rows(p.registry)
            assert not p.direct.exists(digest)
            assert staging_leftovers(p.direct) == []
            assert http.put(f"/v1/adapters/org/x/blobs/{digest}", content=data, headers=OCTET).status_code == 201


# --- F8: the local disk fills up ----------------------------------------------------------------------


@SQLITE_ONLY
def test_disk_full_is_507_removes_the_staging_file_and_reads_go_on(
    client: RegistryClient, api: Any, registry: AppContext, adapter_dir: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from loreg.registry.storage import local

    client.push(adapter_dir, "org/full")  # version 1, before the disk fills
    room = {"left": 512 * 1024}
    real_write = local._write_all

    def filling(fd: int, data: bytes) -> None:
        if len(data) > room["left"]:
            real_write(fd, data[: room["left"]])  # what still fits is written, then the disk is full
            room["left"] = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        room["left"] -= len(data)
        real_write(fd, data)

    monkeypatch.setattr(local, "_write_all", filling)
    data = payload(3 * MiB)
    digest = sha256(data)
    resp = api.put(f"/v1/adapters/org/x/blobs/{digest}", content=data, headers=OCTET)
    assert resp.status_code == 507, resp.text
    assert resp.json()["errors"][0]["code"] == "INSUFFICIENT_STORAGE"
    assert staging_leftovers(registry.store) == []
    assert not registry.store.exists(digest) and digest not in blob_rows(registry)

    # a whole push fails the same way and leaves no version
    other = variant(adapter_dir, tmp_path / "v2", seed=2)
    with pytest.raises(errors.InsufficientStorageError):
        client.push(other, "org/full")
    assert versions(registry) == [("org/full", 1)]
    assert staging_leftovers(registry.store) == []

    # reads are still served
    assert api.get("/v1/adapters/org/full").status_code == 200
    client.pull("org/full:1", tmp_path / "pulled")
    assert tree(tmp_path / "pulled") == tree(adapter_dir)

    # space again: the retry succeeds
    monkeypatch.setattr(local, "_write_all", real_write)
    out = client.push(other, "org/full")
    assert (out["created"], out["version"]) == (True, 2)
    assert_pullable(registry, "org/full")
