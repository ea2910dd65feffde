"""Garbage collection (DESIGN.md §5): what goes, what stays, with the clock injected.

A blob goes when no version, base model or export references it and it was last uploaded or
reported present (blobs:check) longer ago than the grace period; store objects with no row,
staging files and multipart uploads go once older than the grace period.
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from loreg.cli.client import RegistryClient
from loreg.registry.db.models import Export, ExportFile
from loreg.registry.services.context import AppContext
from loreg.registry.services.maintenance import MaintenanceService
from tests import factories
from tests.faults.conftest import SQLITE_ONLY, blob_rows, set_last_seen, sha256, staging_leftovers
from tests.support.server import env_with, loreg

OCTET = {"Content-Type": "application/octet-stream"}
LONG_AGO = datetime.now(UTC) - timedelta(days=30)


def put(api: Any, data: bytes) -> str:
    digest = sha256(data)
    resp = api.put(f"/v1/adapters/org/gc/blobs/{digest}", content=data, headers=OCTET)
    assert resp.status_code in (200, 201), resp.text
    return digest


def add_export(registry: AppContext, base_id: int, digest: str, size: int) -> None:
    """An export result referencing ``digest`` (rows only: no merge needed to test GC)."""
    with registry.sessions.begin() as session:
        export = Export(id=uuid.uuid4().hex, request_digest=sha256(os.urandom(8)),
                        content_digest=sha256(os.urandom(8)), base_model_id=base_id, request={}, dtype="float32",
                        state="done", loreg_version="test")
        session.add(export)
        session.flush()
        session.add(ExportFile(export_id=export.id, path="model.safetensors", size=size, digest=digest))


def base_id(registry: AppContext) -> int:
    from sqlalchemy import text

    with registry.engine.connect() as conn:
        return int(conn.execute(text("SELECT min(id) FROM base_models")).scalar_one())


def test_gc_takes_only_unreferenced_blobs_unseen_for_the_grace_period(
    api: Any, bare_client: RegistryClient, registry: AppContext, adapter_dir: Path, tiny_llama: dict[str, Path]
) -> None:
    base = bare_client.register_base(tiny_llama["base"], factories.base_name("llama"), upload_weights=True)
    pushed = bare_client.push(adapter_dir, "org/gc")
    version_blobs = {f["digest"] for f in pushed["files"]}
    base_blobs = {f["digest"] for f in base["files"]}
    assert base_blobs and base_blobs <= blob_rows(registry)
    export_blob = put(api, b'{"export": 1}' + os.urandom(64))
    add_export(registry, base_id(registry), export_blob, 77)
    referenced = version_blobs | base_blobs | {export_blob}

    recent = put(api, b'{"recent": 1}' + os.urandom(64))  # unreferenced, just uploaded
    aged = put(api, b'{"aged": 1}' + os.urandom(64))  # unreferenced, unseen for 30 days
    touched = put(api, b'{"touched": 1}' + os.urandom(64))  # unreferenced, old, then reported present
    stray = registry.store.put(_stream(b'{"stray": 1}'), sha256(b'{"stray": 1}')).digest  # object, no row
    for digest in referenced | {aged, touched}:
        set_last_seen(registry, digest, LONG_AGO)  # references protect, not recency
    check = api.post("/v1/adapters/org/gc/blobs:check", json={"digests": [touched]})
    assert check.json()["missing"] == []  # present, and now seen again

    service = MaintenanceService(registry)
    dry = service.gc(dry_run=True)
    assert dry.deleted == [aged] and registry.store.exists(aged) and aged in blob_rows(registry)

    report = service.gc()  # the real clock, the default grace (a day)
    assert report.deleted == [aged]
    assert report.stray_deleted == []  # the stray object is new
    assert not registry.store.exists(aged) and aged not in blob_rows(registry)
    for digest in referenced | {recent, touched, stray}:
        assert registry.store.exists(digest), digest

    grace = timedelta(seconds=registry.settings.gc_grace_seconds)
    later = service.gc(now=datetime.now(UTC) + grace + timedelta(minutes=1))
    assert sorted(later.deleted) == sorted([recent, touched])
    assert later.stray_deleted == [stray]
    assert later.bytes_freed > 0
    for digest in (recent, touched, stray):
        assert not registry.store.exists(digest), digest
    rows = blob_rows(registry)
    for digest in referenced:
        assert registry.store.exists(digest) and digest in rows, digest  # never: versions, bases, exports
    assert staging_leftovers(registry.store) == []


def _stream(data: bytes) -> Any:
    import io

    return io.BytesIO(data)


@SQLITE_ONLY
def test_gc_removes_staging_files_older_than_the_grace_period(registry: AppContext) -> None:
    uploads = registry.store.root / "uploads"  # type: ignore[attr-defined]
    uploads.mkdir(parents=True, exist_ok=True)
    old, new = uploads / uuid.uuid4().hex, uploads / uuid.uuid4().hex
    old.write_bytes(b"left by a crashed put")
    new.write_bytes(b"a put in progress")
    two_days_ago = (datetime.now(UTC) - timedelta(days=2)).timestamp()
    os.utime(old, (two_days_ago, two_days_ago))
    report = MaintenanceService(registry).gc()
    assert report.staging_removed == 1
    assert not old.exists() and new.exists()


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_gc_aborts_multipart_uploads_older_than_the_grace_period(registry: AppContext) -> None:
    store: Any = registry.store
    key = store._key(sha256(b"never finished"))
    store._client.create_multipart_upload(Bucket=store.bucket, Key=key)
    service = MaintenanceService(registry)
    assert staging_leftovers(store) == [key]
    # (that one within the grace period is kept cannot be shown on moto: its ListMultipartUploads
    # reports every upload as initiated on 2010-11-10)
    grace = timedelta(seconds=registry.settings.gc_grace_seconds)
    assert service.gc(now=datetime.now(UTC) + grace + timedelta(minutes=1)).multipart_aborted == 1
    assert staging_leftovers(store) == []


@pytest.mark.slow
@SQLITE_ONLY
def test_loreg_gc_dry_run_deletes_nothing(api: Any, registry: AppContext, settings: Any, tmp_path: Path) -> None:
    orphan = put(api, b'{"orphan": 1}' + os.urandom(64))
    env = env_with(LOREG_HOME=str(settings.home), LOREG_DATABASE_URL=settings.database_url,
                   LOREG_STORAGE_URL=settings.storage_url)
    dry = json.loads(loreg("gc", "--dry-run", "--grace", "0", "--json", env=env, cwd=tmp_path).stdout)
    assert dry["dry_run"] is True and dry["deleted"] == [orphan]
    assert registry.store.exists(orphan) and orphan in blob_rows(registry)

    real = json.loads(loreg("gc", "--grace", "0", "--json", env=env, cwd=tmp_path).stdout)
    assert real["deleted"] == [orphan]
    assert not registry.store.exists(orphan) and orphan not in blob_rows(registry)
