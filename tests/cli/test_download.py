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
from loreg.registry.errors import ConnectionFailedError

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
    ending in "-cut" sends the headers of the whole object, half the body, then closes."""
    objects: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            key = self.path.lstrip("/")
            data = objects.get(key.removesuffix("-cut"))
            if data is None:
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
