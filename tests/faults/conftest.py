"""Helpers of the fault and load suite: what a registry holds, looked at behind the API's back.

The invariants every fault test ends with (TESTPLAN I1, I2, I4, I5):
  * no partial version: ``versions(registry)`` lists exactly the acknowledged ones;
  * no leaked staging: ``staging_leftovers`` empty (after GC where the case allows GC to clean up);
  * acknowledged versions intact: ``assert_pullable`` re-reads every file and checks its digest.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

MiB = 1024 * 1024

SQLITE_ONLY = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)
POSTGRES_ONLY = pytest.mark.parametrize("backend", ["postgres"], indirect=True)


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def versions(registry: Any, name: str | None = None) -> list[tuple[str, int]]:
    """Every committed version as (namespace/name, number), read with plain SQL."""
    sql = ("SELECT a.namespace || '/' || a.name AS ref, v.number FROM versions v "
           "JOIN adapters a ON a.id = v.adapter_id ORDER BY ref, v.number")
    with registry.engine.connect() as conn:
        rows = [(str(r[0]), int(r[1])) for r in conn.execute(text(sql))]
    return [r for r in rows if name is None or r[0] == name]


def blob_rows(registry: Any) -> set[str]:
    with registry.engine.connect() as conn:
        return set(conn.execute(text("SELECT digest FROM blobs")).scalars())


def set_last_seen(registry: Any, digest: str, when: datetime) -> None:
    """Age a blob row (as if last uploaded or reported present at ``when``)."""
    from sqlalchemy import update

    from loreg.registry.db.models import Blob

    with registry.sessions.begin() as session:
        session.execute(update(Blob).where(Blob.digest == digest).values(last_seen_at=when, created_at=when))


def store_objects(registry: Any) -> list[str]:
    """Every blob object in the store (a content address appears once, by construction)."""
    return [s.digest for s in registry.store.iter_digests()]


def staging_leftovers(store: Any) -> list[str]:
    """Staging files (local uploads/) or open multipart uploads (S3) the store holds."""
    uploads = getattr(store, "_uploads", None)
    if isinstance(uploads, Path):
        return sorted(p.name for p in uploads.iterdir()) if uploads.exists() else []
    listing = store._client.list_multipart_uploads(Bucket=store.bucket)
    return sorted(u["Key"] for u in listing.get("Uploads", []))


def assert_pullable(registry: Any, name: str) -> None:
    """Every version of ``name``: every file's blob exists with the recorded size and sha256 (I1/I5)."""
    sql = ("SELECT f.digest, f.size FROM version_files f JOIN versions v ON v.id = f.version_id "
           "JOIN adapters a ON a.id = v.adapter_id WHERE a.namespace || '/' || a.name = :n")
    with registry.engine.connect() as conn:
        files = [(str(d), int(s)) for d, s in conn.execute(text(sql), {"n": name})]
    assert files, f"{name} has no files"
    for digest, size in files:
        with registry.store.open(digest) as f:
            data = f.read()
        assert len(data) == size and sha256(data) == digest, f"{name}: blob {digest} is damaged"


def tree(folder: Path) -> dict[str, str]:
    return {p.name: file_digest(p) for p in sorted(folder.iterdir()) if p.is_file()}


def big_adapter(src: Path, dest: Path, size: int) -> Path:
    """The real PEFT adapter plus a ``size``-byte tokenizer.json (valid JSON), which push uploads too."""
    shutil.copytree(src, dest)
    payload = os.urandom(size // 2 - 64).hex()
    doc = json.dumps({"version": "1.0", "padding": payload})
    (dest / "tokenizer.json").write_text(doc + " " * (size - len(doc)))
    assert (dest / "tokenizer.json").stat().st_size == size
    return dest
