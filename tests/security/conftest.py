"""Helpers of the security suite: the "nothing stored" oracle and raw pushes through the REST API.

``assert_nothing_stored(registry, before)`` is TESTPLAN's oracle (DESIGN.md §4): no new version,
adapter or base row, no new blob referenced by anything, no staging file left in the local
store's ``uploads/`` and no open S3 multipart upload. Unreferenced blobs may stay (GC's job).
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, text

from loreg.registry.errors import ERRORS

DIGEST_OF_NOTHING = "sha256:" + hashlib.sha256(b"").hexdigest()

# Cases that do not depend on the storage backend run on SQLite + folder only (time budget);
# each file keeps at least one pass over its cases on Postgres + S3.
SQLITE_ONLY = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
POSTGRES_ONLY = pytest.mark.parametrize("backend", ["postgres"], indirect=True)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def hdr(j: bytes) -> bytes:
    return struct.pack("<Q", len(j)) + j


@dataclass(frozen=True)
class StoreState:
    versions: frozenset[int]
    adapters: frozenset[int]
    bases: frozenset[int]
    aliases: frozenset[tuple[int, str, int]]
    alias_events: int
    metrics: int
    referenced: frozenset[str]


def snapshot(registry: Any) -> StoreState:
    """What references reach: rows and the blob digests they name (read with plain SQL)."""
    tables = set(inspect(registry.engine).get_table_names())
    with registry.engine.connect() as conn:
        versions = frozenset(conn.execute(text("SELECT id FROM versions")).scalars())
        adapters = frozenset(conn.execute(text("SELECT id FROM adapters")).scalars())
        bases = frozenset(conn.execute(text("SELECT id FROM base_models")).scalars())
        aliases = frozenset(tuple(r) for r in conn.execute(text("SELECT adapter_id, name, version_id FROM aliases")))
        alias_events = int(conn.execute(text("SELECT count(*) FROM alias_events")).scalar() or 0)
        metrics = int(conn.execute(text("SELECT count(*) FROM metrics")).scalar() or 0)
        referenced = set(conn.execute(text("SELECT digest FROM version_files")).scalars())
        for files in conn.execute(text("SELECT files FROM base_models")).scalars():
            items = json.loads(files) if isinstance(files, str) else files
            referenced.update(f["digest"] for f in items or [])
        if "export_files" in tables:
            referenced.update(conn.execute(text("SELECT digest FROM export_files")).scalars())
    return StoreState(versions, adapters, bases, aliases, alias_events, metrics, frozenset(referenced))


def staging_leftovers(registry: Any) -> list[str]:
    """Staging files (local uploads/) or open multipart uploads (S3) the store still holds."""
    store = registry.store
    uploads = getattr(store, "_uploads", None)
    if isinstance(uploads, Path):
        return sorted(p.name for p in uploads.iterdir()) if uploads.exists() else []
    client = store._client
    listing = client.list_multipart_uploads(Bucket=store.bucket)
    return sorted(u["Key"] for u in listing.get("Uploads", []))


def assert_nothing_stored(registry: Any, before: StoreState) -> None:
    after = snapshot(registry)
    assert after.versions == before.versions, "a version row appeared"
    assert after.adapters == before.adapters, "an adapter row appeared"
    assert after.bases == before.bases, "a base model row appeared"
    assert after.aliases == before.aliases, "an alias moved or appeared"
    assert after.alias_events == before.alias_events, "an alias event was recorded"
    assert after.metrics == before.metrics, "a metric was appended"
    assert after.referenced == before.referenced, f"new blobs referenced: {sorted(after.referenced - before.referenced)}"
    assert staging_leftovers(registry) == [], "a staging file or multipart upload was left behind"


def assert_blob_absent(registry: Any, digest: str) -> None:
    """A refused upload leaves no visible blob and no blob row."""
    assert not registry.store.exists(digest)
    with registry.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM blobs WHERE digest = :d"), {"d": digest}).scalar() == 0


def error_of(resp: Any, status: int, code: str) -> dict[str, Any]:
    """The first error of an envelope, after checking the status and code."""
    assert resp.status_code == status, (resp.status_code, resp.text[:500])
    body = resp.json()
    first = body["errors"][0]
    assert first["code"] == code, first
    assert ERRORS[code].status == status
    return first


def assert_known_refusal(resp: Any) -> None:
    """Never a 5xx; every error is an envelope with a code from the one table, at that code's status."""
    assert resp.status_code < 500, (resp.status_code, resp.text[:500])
    if resp.status_code >= 400:
        code = resp.json()["errors"][0]["code"]
        assert code in ERRORS, code
        assert ERRORS[code].status == resp.status_code, (code, resp.status_code)


class Pusher:
    """Uploads blobs with PUT /v1/adapters/{name}/blobs/{digest}, then commits POST /v1/adapters/{name}/versions."""

    def __init__(self, http: Any, adapter: Path):
        self.http = http
        self.files = {p.name: p.read_bytes() for p in sorted(adapter.iterdir()) if p.is_file()}

    @property
    def config(self) -> dict[str, Any]:
        return json.loads(self.files["adapter_config.json"])

    @property
    def weights(self) -> bytes:
        return self.files["adapter_model.safetensors"]

    def put_blob(self, data: bytes, digest: str | None = None, name: str = "org/x", **kwargs: Any) -> Any:
        return self.http.put(
            f"/v1/adapters/{name}/blobs/{digest or sha256(data)}",
            content=data,
            headers={"Content-Type": "application/octet-stream"},
            **kwargs,
        )

    def push(self, name: str = "org/x", *, weights: bytes | None = None, config: bytes | dict[str, Any] | None = None,
             files: dict[str, bytes] | None = None, **body: Any) -> Any:
        """Push the adapter with some files replaced: upload each blob, then commit.

        Returns the commit's response, or the first refused upload's (a check may move from the
        commit to the upload without changing what the client is told).
        """
        content = dict(self.files)
        if weights is not None:
            content["adapter_model.safetensors"] = weights
        if config is not None:
            content["adapter_config.json"] = config if isinstance(config, bytes) else json.dumps(config).encode()
        content.update(files or {})
        entries = []
        for path, data in content.items():
            up = self.put_blob(data, name=name)
            if up.status_code not in (200, 201):
                return up
            entries.append({"path": path, "size": len(data), "digest": sha256(data)})
        return self.http.post(f"/v1/adapters/{name}/versions", json={"files": entries, **body})


@pytest.fixture
def pusher(api: Any, client: Any, tiny_llama: dict[str, Path]) -> Pusher:
    """Raw pushes as admin, with the tiny LLaMA base registered."""
    return Pusher(api, tiny_llama["adapter"])
