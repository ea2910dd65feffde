"""The client's download pipeline (client._receive): one thread receives, two more hash and write; and
presigned downloads, which the client fetches from storage itself (urllib3) after the server's 307.

A connection that breaks leaves every byte received so far in the partial file (the next pull resumes
from there); a failing write stops the download with that error, without a deadlock.
"""

from __future__ import annotations

import errno
import hashlib
import http.server
import io
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from loreg.cli.client import BlobCache, RegistryClient, _receive
from loreg.registry.errors import ConnectionFailedError, FileNotStoredError

CHUNKS = [os.urandom(n) for n in (1, 1 << 20, 12345, 0, 3 << 20, 7)]


def test_every_byte_is_written_and_hashed_in_order() -> None:
    out, hasher, advanced = io.BytesIO(), hashlib.sha256(), []
    got = _receive(iter(CHUNKS), out, hasher, advanced.append)
    data = b"".join(CHUNKS)
    assert got == len(data) == sum(advanced)
    assert out.getvalue() == data
    assert hasher.hexdigest() == hashlib.sha256(data).hexdigest()


def test_a_broken_connection_keeps_what_arrived_for_the_resume() -> None:
    def broken() -> Iterator[bytes]:
        yield from CHUNKS[:3]
        raise httpx.ReadError("connection reset")

    out, hasher = io.BytesIO(), hashlib.sha256()
    with pytest.raises(httpx.ReadError):
        _receive(broken(), out, hasher, lambda n: None)
    assert out.getvalue() == b"".join(CHUNKS[:3])


def test_a_failing_write_stops_the_download_with_its_error() -> None:
    class Full(io.BytesIO):
        def write(self, data: bytes) -> int:  # type: ignore[override]
            if self.tell() > (1 << 20):
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(data)

    sent = []

    def endless() -> Iterator[bytes]:
        while len(sent) < 10_000:  # stops early once the writer failed, long before this
            sent.append(1)
            yield b"x" * 65536

    with pytest.raises(OSError) as info:
        _receive(endless(), Full(), hashlib.sha256(), lambda n: None)
    assert info.value.errno == errno.ENOSPC
    assert len(sent) < 10_000


# --- presigned downloads: the client follows a 307 to storage itself --------------------------------------


@pytest.fixture
def storage() -> Iterator[tuple[str, dict[str, bytes]]]:
    """A bare HTTP server standing in for S3: GET /<key> answers the bytes registered for it; a key
    ending in "-cut" sends the headers of the whole object, half the body, then closes. A request
    carrying an Authorization header is refused (403), as S3 refuses one beside a presigned query."""
    objects: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            key = self.path.lstrip("/")
            data = objects.get(key.removesuffix("-cut"))
            if data is None or "Authorization" in self.headers:  # a presigned URL is its own credential
                self.send_response(403)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2] if key.endswith("-cut") else data)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", objects
    finally:
        server.shutdown()
        server.server_close()


def redirecting_client(location: str) -> RegistryClient:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["x-loreg-direct"] == "1"
        return httpx.Response(307, headers={"location": location})

    return RegistryClient("http://registry.test", "loreg_x", http=httpx.Client(transport=httpx.MockTransport(handler), base_url="http://registry.test"))


def fetch(client: RegistryClient, tmp_path: Path, data: bytes) -> tuple[BlobCache, int]:
    cache = BlobCache(tmp_path / "cache")
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    return cache, cache.fetch(client, "/v1/x", digest, len(data), label="adapter_model.safetensors", progress=None)


def test_a_presigned_download_is_verified_and_published(storage: Any, tmp_path: Path) -> None:
    url, objects = storage
    objects["blob"] = os.urandom(3 << 20)
    with redirecting_client(f"{url}/blob") as client:
        cache, got = fetch(client, tmp_path, objects["blob"])
    assert got == len(objects["blob"])
    digest = "sha256:" + hashlib.sha256(objects["blob"]).hexdigest()
    assert cache.path(digest).read_bytes() == objects["blob"]


def test_storage_cutting_a_download_short_keeps_the_bytes_for_the_resume(storage: Any, tmp_path: Path) -> None:
    url, objects = storage
    objects["blob"] = os.urandom(3 << 20)
    with redirecting_client(f"{url}/blob-cut") as client, pytest.raises(ConnectionFailedError) as info:
        fetch(client, tmp_path, objects["blob"])
    assert "resumes" in (info.value.hint or "")
    partial = next((tmp_path / "cache").rglob("*.partial"))
    assert partial.read_bytes() == objects["blob"][: len(objects["blob"]) // 2]


def test_unreachable_storage_and_refused_urls_are_clear_errors(storage: Any, tmp_path: Path) -> None:
    url, _objects = storage
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    with redirecting_client(f"http://127.0.0.1:{dead}/blob") as client, pytest.raises(ConnectionFailedError):
        fetch(client, tmp_path, b"x")
    with redirecting_client(f"{url}/missing") as client, pytest.raises(ConnectionFailedError) as info:
        fetch(client, tmp_path, b"x")
    assert "HTTP 403" in str(info.value) and info.value.detail["status"] == 403 and info.value.hint


# --- downloads from the server itself: urllib3 too, with the token, resumed with a Range -------------------


@pytest.fixture
def registry_http(storage: Any) -> Iterator[tuple[str, dict[str, bytes], list[dict[str, str]]]]:
    """A bare HTTP server standing in for `loreg serve`'s file route: GET /v1/files/<key> answers
    the bytes (206 for ``Range: bytes=N-``), "<key>-cut" half of them, "<key>-redirect" a 307 to
    the storage stand-in, an unknown key the 404 envelope. Every request's headers are kept."""
    storage_url, objects = storage
    seen: list[dict[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            seen.append({k.lower(): v for k, v in self.headers.items()})
            key = self.path.removeprefix("/v1/files/")
            if key.endswith("-redirect"):
                self.send_response(307)
                self.send_header("Location", f"{storage_url}/{key.removesuffix('-redirect')}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = objects.get(key.removesuffix("-cut"))
            if data is None:
                body = b'{"errors": [{"code": "FILE_NOT_FOUND", "message": "no such file"}]}'
                self.send_response(404)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("X-Request-ID", "req-1")
                self.end_headers()
                self.wfile.write(body)
                return
            start = int(self.headers.get("Range", "bytes=0-").removeprefix("bytes=").rstrip("-"))
            self.send_response(206 if start else 200)
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            self.wfile.write(data[start : len(data) // 2] if key.endswith("-cut") else data[start:])
            if key.endswith("-cut"):
                self.close_connection = True

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", objects, seen
    finally:
        server.shutdown()
        server.server_close()


def fetch_key(client: RegistryClient, tmp_path: Path, key: str, data: bytes) -> tuple[BlobCache, int]:
    cache = BlobCache(tmp_path / "cache")
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    return cache, cache.fetch(client, f"/v1/files/{key}", digest, len(data), label="adapter_model.safetensors", progress=None)


@pytest.fixture
def no_httpx_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    """httpx reads a body 64 KiB at a time and parses each piece in Python: file bodies must not go through it."""

    def refused(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a file download went through httpx")

    monkeypatch.setattr(httpx.Client, "stream", refused)


@pytest.mark.usefixtures("no_httpx_streams")
def test_a_download_from_the_server_carries_the_token_and_resumes_with_a_range(registry_http: Any, tmp_path: Path) -> None:
    url, objects, seen = registry_http
    objects["blob"] = data = os.urandom(3 << 20)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    cache = BlobCache(tmp_path / "cache")
    partial = cache.path(digest).with_name(cache.path(digest).name + ".partial")
    partial.parent.mkdir(parents=True)
    partial.write_bytes(data[:1000])
    with RegistryClient(url, "loreg_x") as client:
        _cache, got = fetch_key(client, tmp_path, "blob", data)
    assert got == len(data) - 1000
    assert cache.path(digest).read_bytes() == data
    assert seen[-1]["authorization"] == "Bearer loreg_x" and seen[-1]["x-loreg-direct"] == "1"
    assert seen[-1]["range"] == "bytes=1000-"


@pytest.mark.usefixtures("no_httpx_streams")
def test_a_download_cut_short_by_the_server_keeps_the_bytes_and_publishes_nothing(registry_http: Any, tmp_path: Path) -> None:
    url, objects, _seen = registry_http
    objects["blob"] = data = os.urandom(3 << 20)
    with RegistryClient(url, "loreg_x") as client, pytest.raises(ConnectionFailedError) as info:
        fetch_key(client, tmp_path, "blob-cut", data)
    assert "resumes" in (info.value.hint or "")
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert not BlobCache(tmp_path / "cache").path(digest).exists()
    partial = next((tmp_path / "cache").rglob("*.partial"))
    assert partial.read_bytes() == data[: len(data) // 2]


@pytest.mark.usefixtures("no_httpx_streams")
def test_a_refused_download_is_the_typed_error_and_a_redirect_leaves_the_token_behind(
    registry_http: Any, tmp_path: Path
) -> None:
    url, objects, seen = registry_http
    with RegistryClient(url, "loreg_x") as client, pytest.raises(FileNotStoredError) as info:
        fetch_key(client, tmp_path, "missing", b"x")
    assert info.value.request_id == "req-1"
    objects["blob"] = data = os.urandom(1 << 20)
    with RegistryClient(url, "loreg_x") as client:
        cache, got = fetch_key(client, tmp_path, "blob-redirect", data)
    assert got == len(data)
    assert cache.path("sha256:" + hashlib.sha256(data).hexdigest()).read_bytes() == data
    assert seen[-1]["authorization"] == "Bearer loreg_x"  # the registry's; storage refuses a request with one
