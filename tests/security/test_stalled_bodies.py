"""A12: bodies that stop arriving. More stalled uploads than the server has worker threads (headers
and part of the body sent, then nothing), plus stalled JSON bodies with and without a token: reads
keep answering, /v1/ready reports the busy upload slots with a 200, every stalled request is cut
(an upload that holds a slot, or a JSON body, with 408 after the idle timeout; one that found no
slot, at once or after a bounded wait, with 503 + Retry-After) and nothing is left behind."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from loreg.registry.api.streaming import UploadSlots
from loreg.registry.app import create_app
from tests.security.conftest import assert_blob_absent, assert_nothing_stored, sha256, snapshot, staging_leftovers
from tests.support.server import poll_until, serve_in_thread

pytestmark = pytest.mark.slow

IDLE_S = 4.0  # long enough to see the slots busy on a loaded machine, short enough for a test
SLOTS = 4
QUEUED = UploadSlots.QUEUE_FACTOR * SLOTS
STALLED_UPLOADS = 45  # over the upload slots and over the framework's 40 shared worker threads


@pytest.fixture
def stalling_server(registry: Any) -> Iterator[str]:
    registry.settings.body_idle_timeout_s = IDLE_S
    registry.settings.upload_concurrency = SLOTS
    with serve_in_thread(create_app(registry=registry)) as url:
        yield url


class Stalled:
    """A request whose headers and first body bytes are sent, and then nothing."""

    def __init__(self, port: int, head: str, first_bytes: bytes):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock.sendall(head.encode() + first_bytes)
        self.answer = b""
        self.closed = False

    def poll(self) -> bool:
        """Read what the server sent; True once it closed the connection."""
        if not self.closed:
            self.sock.settimeout(0.001)
            try:
                while chunk := self.sock.recv(65536):
                    self.answer += chunk
                self.closed = True
            except (BlockingIOError, TimeoutError):
                pass
            except OSError:
                self.closed = True
        return self.closed

    @property
    def status(self) -> int:
        return int(self.answer.split(b" ", 2)[1]) if self.answer.startswith(b"HTTP/1.1 ") else 0

    def close(self) -> None:
        self.sock.close()


def _request(method: str, path: str, length: int, content_type: str, token: str | None) -> str:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (f"{method} {path} HTTP/1.1\r\nHost: loreg\r\n{auth}Content-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\n\r\n")


def test_stalled_bodies_are_cut_and_never_starve_reads(
    stalling_server: str, registry: Any, admin_token: str, tiny_llama: dict[str, Path]
) -> None:
    port = int(stalling_server.rsplit(":", 1)[1])
    weights = (tiny_llama["adapter"] / "adapter_model.safetensors").read_bytes()
    digest = sha256(weights)
    part = weights[: len(weights) // 2]  # a real safetensors start: nothing refuses it before it ends
    upload = _request("PUT", f"/v1/adapters/org/stalled/blobs/{digest}", len(weights), "application/octet-stream", admin_token)
    before = snapshot(registry)
    uploads = [Stalled(port, upload, part) for _ in range(STALLED_UPLOADS)]
    json_head = b'{"files": ['
    others = {
        "json with a token": Stalled(port, _request("POST", "/v1/adapters/org/x/versions", 1000, "application/json",
                                                    admin_token), json_head),
        "json without a token": Stalled(port, _request("POST", "/v1/adapters/org/x/versions", 1000,
                                                       "application/json", None), json_head),
        "upload without a token": Stalled(port, _request("PUT", f"/v1/adapters/org/stalled/blobs/{digest}", len(weights),
                                                         "application/octet-stream", None), part),
    }
    try:
        with httpx.Client(base_url=stalling_server, timeout=30) as http:

            def slots_exhausted() -> dict[str, Any] | None:
                resp = http.get("/v1/ready")
                assert resp.status_code == 200, resp.text  # busy uploads never take the server out
                usage = resp.json()["uploads"]
                return usage if usage["exhausted"] and usage["waiting"] == QUEUED else None

            usage = poll_until(slots_exhausted, "/v1/ready to report the upload slots exhausted", deadline_s=30)
            assert usage == {"in_use": SLOTS, "limit": SLOTS, "waiting": QUEUED, "exhausted": True}
            # reads that need a worker thread (authentication, a sync route) answer meanwhile
            auth = {"Authorization": f"Bearer {admin_token}"}
            assert http.get("/v1/adapters", headers=auth).status_code == 200
            assert http.get("/v1/tokens/self", headers=auth).status_code == 200

            everything = [*uploads, *others.values()]
            poll_until(lambda: all(s.poll() for s in everything), "the server to cut every stalled request",
                       deadline_s=60)
            statuses = [s.status for s in uploads]
            assert set(statuses) == {408, 503}, statuses
            # the slots' holders time out; the uploads past the queue were refused at once, and the
            # queued ones either timed out waiting or took a freed slot and then timed out
            assert statuses.count(408) >= SLOTS and statuses.count(503) >= STALLED_UPLOADS - SLOTS - QUEUED
            busy = next(s.answer for s in uploads if s.status == 503)
            assert b"UPLOADS_BUSY" in busy and b"retry-after: 5" in busy.lower()
            timed_out = next(s.answer for s in uploads if s.status == 408)
            assert b"REQUEST_TIMEOUT" in timed_out and b"connection: close" in timed_out.lower()
            assert others["json with a token"].status == 408
            assert others["json without a token"].status == 408
            assert others["upload without a token"].status == 401

            idle = {"in_use": 0, "limit": SLOTS, "waiting": 0, "exhausted": False}
            assert http.get("/v1/ready").json()["uploads"] == idle
    finally:
        for s in [*uploads, *others.values()]:
            s.close()
    assert staging_leftovers(registry) == []
    assert_blob_absent(registry, digest)
    assert_nothing_stored(registry, before)
