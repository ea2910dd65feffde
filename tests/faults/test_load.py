"""Loads (TESTPLAN L1-L5): concurrent pushes, identical pushes, a mixed read load, an oversized
chunked body. Bounds here prove "does not hang / stays bounded", never a performance figure.
"""

from __future__ import annotations

import hashlib
import json
import select
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from loreg.cli.client import RegistryClient
from loreg.registry.services.context import AppContext
from tests import factories
from tests.faults.conftest import (
    POSTGRES_ONLY,
    SQLITE_ONLY,
    MiB,
    assert_pullable,
    big_adapter,
    blob_rows,
    file_digest,
    sha256,
    staging_leftovers,
    store_objects,
    versions,
)
from tests.support.adapters import variant
from tests.support.server import env_with, minor_faults, poll_until, rss_bytes, serving, token_for

pytestmark = pytest.mark.slow


def at_once(n: int, work: Callable[[int], Any]) -> list[Any]:
    """Run ``work(i)`` for i in range(n) in n threads released together; results or exceptions."""
    results: list[Any] = [None] * n
    barrier = threading.Barrier(n)

    def run(i: int) -> None:
        try:
            barrier.wait(60)
            results[i] = work(i)
        except BaseException as exc:  # noqa: BLE001 - returned to the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not any(t.is_alive() for t in threads), "a push hung"
    return results


def push_many(url: str, token: str, folders: list[Path], name: str) -> list[Any]:
    def work(i: int) -> Any:
        with RegistryClient(url, token, timeout=300) as c:
            return c.push(folders[i], name)

    return at_once(len(folders), work)


def assert_distinct_versions(registry: AppContext, name: str, results: list[Any]) -> None:
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures[:3]  # 0 x 5xx, 0 x "database is locked", 0 x conflicts
    assert all(r["created"] for r in results)
    n = len(results)
    assert sorted(r["version"] for r in results) == list(range(1, n + 1))  # unique and contiguous
    assert len({r["digest"] for r in results}) == n
    assert versions(registry, name) == [(name, i) for i in range(1, n + 1)]
    assert_pullable(registry, name)


CONCURRENT = 50


@POSTGRES_ONLY
def test_l1_fifty_concurrent_pushes_to_one_name_on_postgres(
    live_server: str, admin_token: str, registry: AppContext, adapter_dir: Path, tmp_path: Path
) -> None:
    folders = [variant(adapter_dir, tmp_path / f"v{i}", seed=i) for i in range(CONCURRENT)]
    results = push_many(live_server, admin_token, folders, "org/l1")
    assert_distinct_versions(registry, "org/l1", results)


@SQLITE_ONLY
def test_l2_fifty_concurrent_pushes_to_one_name_on_sqlite_three_times(
    live_server: str, admin_token: str, registry: AppContext, adapter_dir: Path, tmp_path: Path
) -> None:
    for round_ in range(3):
        folders = [variant(adapter_dir, tmp_path / f"r{round_}-v{i}", seed=1000 * round_ + i) for i in range(CONCURRENT)]
        results = push_many(live_server, admin_token, folders, f"org/l2-{round_}")
        assert_distinct_versions(registry, f"org/l2-{round_}", results)


def test_l3_twenty_identical_pushes_make_one_version(
    live_server: str, admin_token: str, registry: AppContext, adapter_dir: Path
) -> None:
    results = push_many(live_server, admin_token, [adapter_dir] * 20, "org/l3")
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, failures[:3]
    assert sum(r["created"] for r in results) == 1  # one 201, nineteen 200
    assert {r["version"] for r in results} == {1}
    assert len({r["digest"] for r in results}) == 1
    assert versions(registry, "org/l3") == [("org/l3", 1)]
    objects = store_objects(registry)
    assert len(objects) == len(set(objects))
    pushed = {file_digest(p) for p in adapter_dir.iterdir() if p.is_file()}
    assert pushed <= set(objects) and pushed <= blob_rows(registry)  # one object and one row per file
    assert staging_leftovers(registry.store) == []
    assert_pullable(registry, "org/l3")


# --- L4: a mixed read load on `loreg serve` --------------------------------------------------------

LOAD_S = 5.0
RSS_HEADROOM = 128 * MiB


def test_l4_mixed_read_load_streams_downloads_with_flat_memory(tmp_path: Path, tiny_llama: dict[str, Path]) -> None:
    home = tmp_path / "home"
    folder = big_adapter(tiny_llama["adapter"], tmp_path / "adapter", 16 * MiB)
    big_digest = file_digest(folder / "tokenizer.json")
    with serving(env_with(LOREG_HOME=str(home)), tmp_path) as (url, proc):
        token = token_for(home, url)
        with RegistryClient(url, token) as c:
            c.register_base(tiny_llama["base"], factories.base_name("llama"))
            c.push(folder, "org/l4")
        auth = {"Authorization": f"Bearer {token}"}
        file_url = "/v1/adapters/org/l4/versions/1/files/tokenizer.json"

        def download(http: httpx.Client) -> None:
            h = hashlib.sha256()
            with http.stream("GET", file_url) as resp:
                assert resp.status_code == 200
                for chunk in resp.iter_bytes(MiB):
                    h.update(chunk)
            assert "sha256:" + h.hexdigest() == big_digest

        def metadata(http: httpx.Client) -> None:
            for path in ("/v1/adapters/org/l4", "/v1/adapters/org/l4/versions/1", "/v1/adapters?namespace=org"):
                assert http.get(path).status_code == 200

        with httpx.Client(base_url=url, headers=auth, timeout=60) as http:
            download(http)  # warm: first-use allocations are not a leak
            metadata(http)
        baseline = rss_bytes(proc.pid)
        peak = [baseline]
        counts = {"download": 0, "metadata": 0}
        errors: list[BaseException] = []
        deadline = time.monotonic() + LOAD_S

        def loop(kind: str, work: Callable[[httpx.Client], None]) -> None:
            with httpx.Client(base_url=url, headers=auth, timeout=60) as http:
                while time.monotonic() < deadline:
                    try:
                        work(http)
                        counts[kind] += 1
                    except BaseException as exc:  # noqa: BLE001
                        errors.append(exc)
                        return

        workers = [threading.Thread(target=loop, args=("download", download), daemon=True) for _ in range(2)]
        workers += [threading.Thread(target=loop, args=("metadata", metadata), daemon=True) for _ in range(2)]
        for w in workers:
            w.start()
        while any(w.is_alive() for w in workers):
            peak.append(rss_bytes(proc.pid))
            for w in workers:
                w.join(0.05)
        assert not errors, errors[:3]
        assert counts["download"] >= 2 and counts["metadata"] >= 2, counts
        assert max(peak) < baseline + RSS_HEADROOM, (baseline // MiB, max(peak) // MiB, counts)


# --- L5: a chunked body over the limit --------------------------------------------------------------

LIMIT = 4 * MiB
OFFERED = 64 * MiB


def send_chunked_until_answered(url: str, token: str, digest: str, total: int) -> tuple[int, bytes, int]:
    """PUT a chunked body (no Content-Length) lazily, stopping as soon as the server answers.

    Returns (status, response bytes, body bytes sent before the answer).
    """
    parts = urlsplit(url)
    chunk = bytes(range(256)) * 256  # 64 KiB
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    sent = 0
    with socket.create_connection((parts.hostname, parts.port), timeout=60) as sock:
        sock.sendall((f"PUT /v1/adapters/org/x/blobs/{digest} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                      f"Authorization: Bearer {token}\r\nContent-Type: application/octet-stream\r\n"
                      "Transfer-Encoding: chunked\r\n\r\n").encode())
        while sent < total:
            readable, writable, _ = select.select([sock], [sock], [], 30)
            if readable or not writable:
                break  # the answer is here (or the server stopped reading for 30 s)
            try:
                sock.sendall(framed)
            except OSError:
                break  # the server closed the connection after answering
            sent += len(chunk)
        else:
            sock.sendall(b"0\r\n\r\n")
        answer = b""
        try:
            while not _complete(answer):
                more = sock.recv(65536)
                if not more:
                    break
                answer += more
        except OSError:
            pass
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
    return status, answer, sent


def _complete(answer: bytes) -> bool:
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return True


@SQLITE_ONLY
def test_l5_chunked_body_over_the_limit_is_413_before_it_is_read(
    live_server: str, admin_token: str, registry: AppContext
) -> None:
    registry.settings.max_file_size = LIMIT
    at_limit = b'{"x": "' + bytes(LIMIT - 7)
    with httpx.Client(base_url=live_server, headers={"Authorization": f"Bearer {admin_token}"}, timeout=60) as http:
        ok = http.put(f"/v1/adapters/org/x/blobs/{sha256(at_limit)}", content=iter([at_limit[i:i + MiB] for i in range(0, LIMIT, MiB)]))
    assert ok.status_code == 201, ok.text  # exactly the limit, chunked: accepted

    digest = "sha256:" + "ab" * 32
    status, answer, sent = send_chunked_until_answered(live_server, admin_token, digest, OFFERED)
    assert status == 413, answer[:500]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["errors"][0]["code"] == "TOO_LARGE"
    # the limit plus what queues and socket buffers hold: far from the 64 MiB offered
    assert sent < OFFERED // 2, sent // MiB
    assert digest not in blob_rows(registry)
    poll_until(lambda: staging_leftovers(registry.store) == [], "the staging file to go")


BIG = 1024 * MiB


def _big_body(block: bytes, total: int) -> Any:
    for _ in range(total // len(block)):
        yield block


def test_l5_max_size_upload_is_streamed_with_flat_server_memory(tmp_path: Path) -> None:
    """A 1 GiB blob upload (the limit) succeeds while the server's RSS grows by less than 64 MiB."""
    block = hashlib.sha256(b"loreg").digest() * (MiB // 32)  # 1 MiB, not pickle or zip magic
    h = hashlib.sha256()
    for chunk in _big_body(block, BIG):
        h.update(chunk)
    digest = "sha256:" + h.hexdigest()
    home = tmp_path / "home"
    with serving(env_with(LOREG_HOME=str(home), LOREG_MAX_FILE_SIZE=str(BIG)), tmp_path) as (url, proc):
        auth = {"Authorization": f"Bearer {token_for(home, url)}"}
        with httpx.Client(base_url=url, headers=auth, timeout=120) as http:
            warm = block[: MiB // 2]
            assert http.put(f"/v1/adapters/org/x/blobs/{sha256(warm)}", content=warm).status_code == 201  # first-use allocations
            baseline = rss_bytes(proc.pid)
            peak = [baseline]
            done = threading.Event()

            def watch() -> None:
                while not done.is_set():
                    peak.append(rss_bytes(proc.pid))
                    done.wait(0.05)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            try:
                resp = http.put(f"/v1/adapters/org/x/blobs/{digest}", content=_big_body(block, BIG),
                                headers={"Content-Length": str(BIG)})
            finally:
                done.set()
                watcher.join()
            assert resp.status_code == 201, resp.text
            assert resp.json()["size"] == BIG
    assert max(peak) - baseline < 64 * MiB, ((max(peak) - baseline) // MiB, baseline // MiB)


FAULT_BODY = 128 * MiB


def test_l5_an_upload_does_not_fault_in_fresh_pages_for_each_piece(tmp_path: Path) -> None:
    """The server's allocator keeps the memory of the body's pieces for the next ones
    (registry/allocator.py): a 128 MiB upload took 1,300-2,100 page faults here. With glibc's
    defaults many 256 KiB pieces land on fresh pages (socket read, parser buffer): 7,000-9,800."""
    block = hashlib.sha256(b"faults").digest() * (MiB // 32)
    digest = sha256(block * (FAULT_BODY // MiB))
    home = tmp_path / "home"
    with serving(env_with(LOREG_HOME=str(home)), tmp_path) as (url, proc):
        auth = {"Authorization": f"Bearer {token_for(home, url)}"}
        with httpx.Client(base_url=url, headers=auth, timeout=120) as http:
            warm = block[: MiB // 2]
            assert http.put(f"/v1/adapters/org/x/blobs/{sha256(warm)}", content=warm).status_code == 201
            before = minor_faults(proc.pid)
            resp = http.put(f"/v1/adapters/org/x/blobs/{digest}", content=_big_body(block, FAULT_BODY),
                            headers={"Content-Length": str(FAULT_BODY)})
            faults = minor_faults(proc.pid) - before
    assert resp.status_code == 201, resp.text
    assert faults < FAULT_BODY // (32 * 1024), faults  # < 4,096: one per 32 KiB at most
