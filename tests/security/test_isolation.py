"""Namespaces isolate: knowing a digest grants nothing (TESTPLAN A9; OCI's repository links).

A blob is usable in an adapter only once it is linked to it: by an upload for that adapter whose
bytes the server read and verified, or by a mount from an adapter the same token can read. Checks
answer for one adapter; a push is validated from its config and header before any file is sent.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import text

from loreg.cli.client import RegistryClient
from loreg.registry import errors
from loreg.registry.db.models import Export, ExportFile, ExportInput
from loreg.registry.formats import preflight
from loreg.registry.services.maintenance import MaintenanceService
from tests import factories
from tests.security.conftest import (
    SQLITE_ONLY,
    Pusher,
    assert_blob_absent,
    assert_nothing_stored,
    error_of,
    sha256,
    snapshot,
)

OCTET = {"Content-Type": "application/octet-stream"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def as_token(app: Any) -> Iterator[Any]:
    opened: list[TestClient] = []

    def make(token: str) -> TestClient:
        http = TestClient(app, base_url="http://testserver", raise_server_exceptions=False, headers=bearer(token))
        opened.append(http.__enter__())
        return http

    yield make
    for http in opened:
        http.__exit__(None, None, None)


def links(registry: Any, name: str) -> set[str]:
    namespace, short = name.split("/")
    with registry.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT digest FROM adapter_blobs WHERE namespace = :n AND name = :m"), {"n": namespace, "m": short}
        )
        return set(rows.scalars())


def object_count(registry: Any) -> int:
    return sum(1 for _ in registry.store.iter_digests())


# --- the reported attack -------------------------------------------------------------------------


def test_a_known_digest_gives_no_access_to_another_namespaces_bytes(
    pusher: Pusher, registry: Any, make_token: Any, as_token: Any
) -> None:
    secret = b"# team-b's card\nthe launch date is in here\n" + os.urandom(16)
    assert pusher.push("team-b/x", files={"README.md": secret}).status_code == 201
    digest = sha256(secret)
    writer = as_token(make_token("write", ["team-a/*"]))
    reader = as_token(make_token("read", ["team-a/*"]))
    before = snapshot(registry)

    # the upload is read and verified even though storage holds the digest
    error_of(writer.put(f"/v1/adapters/team-a/x/blobs/{digest}", content=b"whatever", headers=OCTET), 400, "DIGEST_MISMATCH")
    # with the true size declared, the body still has to hash to the digest
    forged = b"w" * len(secret)
    error_of(writer.put(f"/v1/adapters/team-a/x/blobs/{digest}", content=forged, headers=OCTET), 400, "DIGEST_MISMATCH")
    assert links(registry, "team-a/x") == set()
    assert registry.store.read_range(digest, 0, len(secret)) == secret  # the stored copy is untouched

    # team-a's own files, uploaded for team-a/x, plus team-b's digest named as README.md
    files = [{"path": "README.md", "size": len(secret), "digest": digest}]
    for path, data in pusher.files.items():
        if path != "README.md":
            assert writer.put(f"/v1/adapters/team-a/x/blobs/{sha256(data)}", content=data, headers=OCTET).status_code == 201
            files.append({"path": path, "size": len(data), "digest": sha256(data)})
    err = error_of(writer.post("/v1/adapters/team-a/x/versions", json={"files": files}), 422, "BLOB_MISSING")
    assert err["detail"]["digest"] == digest and "mount" in err["detail"]["hint"]
    # the check tells team-a nothing about what team-b holds
    check = writer.post("/v1/adapters/team-a/x/blobs:check", json={"digests": [digest]})
    assert check.json()["missing"] == [digest]
    # and a mount from team-b needs read access to team-b
    error_of(writer.post("/v1/adapters/team-a/x/blobs:mount", json={"digest": digest, "from": "team-b/x"}), 403, "DENIED")
    assert_nothing_stored(registry, before)

    error_of(reader.get("/v1/adapters/team-a/x/versions/1/files/README.md"), 404, "ADAPTER_NOT_FOUND")
    error_of(reader.get("/v1/adapters/team-b/x/versions/1/files/README.md"), 403, "DENIED")
    assert digest not in links(registry, "team-a/x")


def test_the_commit_refuses_a_blob_stored_for_another_adapter_of_the_same_namespace(pusher: Pusher, registry: Any) -> None:
    assert pusher.push("org/x").status_code == 201
    files = [{"path": k, "size": len(v), "digest": sha256(v)} for k, v in pusher.files.items()]
    before = snapshot(registry)
    err = error_of(pusher.http.post("/v1/adapters/org/y/versions", json={"files": files}), 422, "BLOB_MISSING")
    assert "org/y" in err["message"]
    assert_nothing_stored(registry, before)


# --- checks, uploads and mounts are per adapter ----------------------------------------------------


@SQLITE_ONLY
def test_blobs_check_answers_for_that_adapter_only(pusher: Pusher, registry: Any) -> None:
    assert pusher.push("org/x").status_code == 201
    digests = sorted(sha256(v) for v in pusher.files.values())
    held = pusher.http.post("/v1/adapters/org/x/blobs:check", json={"digests": digests})
    assert held.json()["missing"] == []
    other = pusher.http.post("/v1/adapters/org/y/blobs:check", json={"digests": digests})
    assert other.json()["missing"] == digests  # stored, but not for org/y


def test_an_upload_of_stored_bytes_for_a_new_adapter_is_read_and_kept_once(
    pusher: Pusher, registry: Any
) -> None:
    assert pusher.push("org/x").status_code == 201
    objects = object_count(registry)
    data = pusher.files["adapter_model.safetensors"]
    resp = pusher.put_blob(data, name="org/y")
    assert resp.status_code == 201 and resp.json()["created"] is True  # linked to org/y now
    again = pusher.put_blob(data, name="org/y")
    assert again.status_code == 200 and again.json()["created"] is False
    assert object_count(registry) == objects  # storage keeps one copy
    assert sha256(data) in links(registry, "org/y")
    # an upload makes no adapter: nothing empty shows up before the first version
    error_of(pusher.http.get("/v1/adapters/org/y"), 404, "ADAPTER_NOT_FOUND")
    assert [i["name"] for i in pusher.http.get("/v1/adapters").json()["items"]] == ["org/x"]


@SQLITE_ONLY
def test_mount_needs_read_access_to_the_source_and_the_blob_linked_there(
    pusher: Pusher, registry: Any, make_token: Any, as_token: Any
) -> None:
    assert pusher.push("shared/lib").status_code == 201
    files = [{"path": k, "size": len(v), "digest": sha256(v)} for k, v in pusher.files.items()]
    both = as_token(make_token("write", ["team-a/*", "shared/*"]))
    only_a = as_token(make_token("write", ["team-a/*"]))
    digest = files[0]["digest"]

    error_of(only_a.post("/v1/adapters/team-a/x/blobs:mount", json={"digest": digest, "from": "shared/lib"}), 403, "DENIED")
    assert links(registry, "team-a/x") == set()
    # the source must hold the blob: an adapter with nothing linked gives nothing
    error_of(both.post("/v1/adapters/team-a/x/blobs:mount", json={"digest": digest, "from": "shared/none"}), 404, "BLOB_NOT_FOUND")
    assert links(registry, "team-a/x") == set()
    error_of(both.post("/v1/adapters/team-a/x/blobs:mount", json={"digest": digest, "from": "Shared/../lib"}), 400, "NAME_INVALID")

    for f in files:
        resp = both.post("/v1/adapters/team-a/x/blobs:mount", json={"digest": f["digest"], "from": "shared/lib"})
        assert resp.status_code == 201, resp.text
    again = both.post("/v1/adapters/team-a/x/blobs:mount", json={"digest": digest, "from": "shared/lib"})
    assert again.status_code == 200
    assert both.post("/v1/adapters/team-a/x/versions", json={"files": files}).status_code == 201


# --- the client ------------------------------------------------------------------------------------


def test_repush_uploads_nothing_and_a_new_adapter_sends_the_bytes_again(
    client: RegistryClient, registry: Any, adapter_dir: Path
) -> None:
    total = sum(p.stat().st_size for p in adapter_dir.iterdir() if p.is_file())
    first = client.push(adapter_dir, "org/a")
    assert first["bytes_uploaded"] == total
    objects = object_count(registry)
    again = client.push(adapter_dir, "org/a")
    assert (again["created"], again["bytes_uploaded"]) == (False, 0)
    other = client.push(adapter_dir, "org/b")
    assert (other["created"], other["bytes_uploaded"]) == (True, total)  # read and verified for org/b
    assert object_count(registry) == objects


class BodyCounter:
    """ASGI wrapper counting the request body bytes the server receives, per (method, path)."""

    def __init__(self, app: Any):
        self.app = app
        self.received: dict[tuple[str, str], int] = {}

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        key = (scope["method"], scope["path"])

        async def counted() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                self.received[key] = self.received.get(key, 0) + len(message.get("body", b""))
            return message

        await self.app(scope, counted, send)

    def uploaded(self) -> int:
        return sum(n for (method, path), n in self.received.items() if method == "PUT")


def _wrong_shapes(adapter_dir: Path, dest: Path) -> Path:
    import torch

    def widen(tensors: dict[str, Any]) -> dict[str, Any]:
        key = next(k for k in sorted(tensors) if "lora_A" in k)
        a = tensors[key]
        tensors[key] = torch.zeros((a.shape[0], a.shape[1] + 1), dtype=a.dtype)
        return tensors

    return factories.edit_adapter(adapter_dir, dest, tensors=widen)


@pytest.mark.parametrize("case", ["unknown base", "wrong shapes"])
def test_a_refused_push_uploads_nothing(
    app: Any, admin_token: str, tiny_llama: dict[str, Path], adapter_dir: Path, registry: Any, tmp_path: Path,
    loreg_home: Path, case: str,
) -> None:
    counter = BodyCounter(app)
    with TestClient(counter, base_url="http://testserver", raise_server_exceptions=False) as http:
        c = RegistryClient("http://testserver", admin_token, http=http)
        c.register_base(tiny_llama["base"], factories.base_name("llama"))
        before = snapshot(registry)
        objects = object_count(registry)
        if case == "unknown base":
            folder, expected = adapter_dir, errors.BaseUnknownError
            kwargs = {"base": "someone/not-registered"}
        else:
            folder, expected, kwargs = _wrong_shapes(adapter_dir, tmp_path / "wide"), errors.ShapeMismatchError, {}
        with pytest.raises(expected):
            c.push(folder, "org/refused", **kwargs)
        assert counter.uploaded() == 0
        # what was sent is the config and the header, not the weights
        sent = sum(counter.received.values())
        assert sent < (folder / "adapter_model.safetensors").stat().st_size
        assert_nothing_stored(registry, before)
        assert object_count(registry) == objects and links(registry, "org/refused") == set()

        good = c.push(adapter_dir, "org/refused")  # the next good push sends every byte
        total = sum(p.stat().st_size for p in adapter_dir.iterdir() if p.is_file())
        assert (good["created"], good["bytes_uploaded"]) == (True, total)
        assert counter.uploaded() == total


# --- the preflight route -------------------------------------------------------------------------


def _preflight_body(adapter_dir: Path) -> tuple[bytes, int]:
    weights = (adapter_dir / "adapter_model.safetensors").read_bytes()
    n = int.from_bytes(weights[:8], "little")
    return preflight.pack((adapter_dir / "adapter_config.json").read_bytes(), weights[: 8 + n]), len(weights)


@SQLITE_ONLY
def test_preflight_validates_from_config_and_header_and_stores_nothing(
    client: RegistryClient, api: Any, registry: Any, adapter_dir: Path
) -> None:
    body, size = _preflight_body(adapter_dir)
    before = snapshot(registry)
    objects = object_count(registry)
    ok = api.post("/v1/adapters/org/x/versions:validate", params={"size": size}, content=body, headers=OCTET)
    assert ok.status_code == 200, ok.text
    assert ok.json()["base"]["names"] == [factories.base_name("llama")]
    assert ok.json()["facts"]["ranks"]
    # the same refusals the commit gives
    error_of(api.post("/v1/adapters/org/x/versions:validate", params={"size": size + 2}, content=body, headers=OCTET),
             400, "TRAILING_DATA")
    error_of(api.post("/v1/adapters/org/x/versions:validate", params={"size": size, "base": "no/such"}, content=body,
                      headers=OCTET), 422, "BASE_UNKNOWN")
    # strict framing: a byte after the header, a cut header, a config over the limit
    error_of(api.post("/v1/adapters/org/x/versions:validate", params={"size": size}, content=body + b"x", headers=OCTET),
             400, "REQUEST_INVALID")
    error_of(api.post("/v1/adapters/org/x/versions:validate", params={"size": size}, content=body[:-1], headers=OCTET),
             400, "REQUEST_INVALID")
    big = (1 << 40).to_bytes(8, "little") + b"{}"
    error_of(api.post("/v1/adapters/org/x/versions:validate", params={"size": size}, content=big, headers=OCTET),
             413, "CONFIG_TOO_LARGE")
    assert_nothing_stored(registry, before)
    assert object_count(registry) == objects


@SQLITE_ONLY
def test_preflight_body_is_bounded_by_the_header_and_config_limits(api: Any, registry: Any) -> None:
    limit = preflight.max_body(registry.settings.max_config_size, registry.settings.max_header_size)
    chunks = [b"\x02" + bytes(8)] + [bytes(1 << 20)] * (limit // (1 << 20) + 2)
    resp = api.post("/v1/adapters/org/x/versions:validate", params={"size": 8}, content=iter(chunks), headers=OCTET)
    error_of(resp, 413, "TOO_LARGE")
    # a header of a large adapter (over the 1 MiB JSON limit) is accepted up to the header limit
    header = b'{"__metadata__":{"format":"pt"}}' + b" " * (2 << 20)
    body = preflight.pack(b"{}", len(header).to_bytes(8, "little") + header)
    resp = api.post("/v1/adapters/org/x/versions:validate", params={"size": 8 + len(header)}, content=body, headers=OCTET)
    assert resp.status_code == 422, resp.text  # past the size checks: the config is what is refused
    assert resp.json()["errors"][0]["code"] == "CONFIG_INVALID"


# --- base weights, export results, GC ------------------------------------------------------------


@SQLITE_ONLY
def test_base_weight_uploads_need_an_admin_of_every_namespace_and_are_always_verified(
    pusher: Pusher, registry: Any, make_token: Any, as_token: Any
) -> None:
    assert pusher.push("team-b/x").status_code == 201
    digest = sha256(pusher.weights)
    limited = as_token(make_token("admin", ["team-a/*"]))
    error_of(limited.post("/v1/base-models/blobs:check", json={"digests": [digest]}), 403, "DENIED")
    error_of(limited.put(f"/v1/base-models/blobs/{digest}", content=pusher.weights, headers=OCTET), 403, "DENIED")
    body = {"name": "org/base", "config": {}, "weights_uploaded": True,
            "tensors": [{"name": "w", "dtype": "F32", "shape": [1], "file": "m.safetensors", "digest": digest}],
            "files": [{"path": "m.safetensors", "size": len(pusher.weights), "digest": digest}]}
    error_of(limited.post("/v1/base-models", json=body), 403, "DENIED")
    # an admin of everything still sends the bytes: a stored digest is not taken on its word
    error_of(pusher.http.put(f"/v1/base-models/blobs/{digest}", content=b"whatever", headers=OCTET), 400, "DIGEST_MISMATCH")
    ok = pusher.http.put(f"/v1/base-models/blobs/{digest}", content=pusher.weights, headers=OCTET)
    assert ok.status_code == 200 and ok.json()["created"] is False


@SQLITE_ONLY
def test_export_file_route_serves_only_the_files_of_that_export(
    pusher: Pusher, registry: Any, make_token: Any, as_token: Any
) -> None:
    secret = b"team-b only " + os.urandom(16)
    assert pusher.push("team-b/x", files={"README.md": secret}).status_code == 201
    assert pusher.push("team-a/x").status_code == 201
    result = b'{"merged": true}'
    assert pusher.put_blob(result, name="team-a/x").status_code == 201
    with registry.engine.connect() as conn:
        version_id = conn.execute(text(
            "SELECT v.id FROM versions v JOIN adapters a ON a.id = v.adapter_id WHERE a.namespace = 'team-a'"
        )).scalar_one()
        base_id = conn.execute(text("SELECT min(id) FROM base_models")).scalar_one()
    export_id = os.urandom(16).hex()
    with registry.sessions.begin() as session:
        session.add(Export(id=export_id, request_digest=sha256(os.urandom(8)), content_digest=sha256(os.urandom(8)),
                           base_model_id=base_id, request={}, dtype="float32", state="done", loreg_version="test"))
        session.flush()
        session.add(ExportInput(export_id=export_id, position=0, version_id=version_id, name="team-a/x:1",
                                manifest_digest=sha256(b"m"), weight=1.0))
        session.add(ExportFile(export_id=export_id, path="config.json", size=len(result), digest=sha256(result)))
    reader = as_token(make_token("read", ["team-a/*"]))
    got = reader.get(f"/v1/exports/{export_id}/files/config.json")
    assert got.status_code == 200 and got.content == result
    for path in ("README.md", sha256(secret), "adapter_model.safetensors"):
        resp = reader.get(f"/v1/exports/{export_id}/files/{path}")
        assert resp.status_code in (400, 404), (path, resp.status_code)
        assert secret not in resp.content


@SQLITE_ONLY
def test_gc_drops_links_with_the_unreferenced_blobs_they_name(pusher: Pusher, registry: Any) -> None:
    assert pusher.push("org/x").status_code == 201
    stray = b'{"never committed": 1}'
    assert pusher.put_blob(stray, name="org/y").status_code == 201
    assert pusher.put_blob(pusher.weights, name="org/y").status_code == 201  # also in org/x:1
    grace = timedelta(seconds=registry.settings.gc_grace_seconds)
    report = MaintenanceService(registry).gc(now=datetime.now(UTC) + grace + timedelta(minutes=1))
    assert report.deleted == [sha256(stray)]
    assert_blob_absent(registry, sha256(stray))
    # a link alone keeps nothing; a blob a version references keeps its links
    assert links(registry, "org/y") == {sha256(pusher.weights)}
    assert links(registry, "org/x") == {sha256(v) for v in pusher.files.values()}
