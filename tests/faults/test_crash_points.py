"""Crash points (TESTPLAN F2, F3): `loreg serve` dies with os._exit(137) at a chosen point of a push.

The server is a subprocess on the embedded default (SQLite + folder in LOREG_HOME) started with
LOREG_FAULT (registry/faults.py, a testing hook), then restarted on the same LOREG_HOME without it.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from loreg.cli.client import RegistryClient
from loreg.registry import errors
from loreg.registry.services.context import open_registry
from loreg.registry.services.maintenance import MaintenanceService
from loreg.registry.settings import Settings
from tests import factories
from tests.faults.conftest import (
    assert_pullable,
    blob_rows,
    staging_leftovers,
    store_objects,
    tree,
    versions,
)
from tests.support.server import env_with, serving, token_for

pytestmark = pytest.mark.slow


def crashed_push(home: Path, cwd: Path, fault: str, folder: Path, name: str, base: Path | None = None) -> None:
    """Push ``folder`` to a server that dies at ``fault``; the client sees a connection error."""
    with serving(env_with(LOREG_HOME=str(home), LOREG_FAULT=fault), cwd) as (url, proc):
        with RegistryClient(url, token_for(home, url)) as c:
            if base is not None:
                c.register_base(base, factories.base_name("llama"))
            with pytest.raises(errors.ConnectionFailedError):
                c.push(folder, name)
        assert proc.wait(timeout=30) == 137


def test_crash_after_blob_put_leaves_an_orphan_that_gc_takes_after_grace(
    tmp_path: Path, tiny_llama: dict[str, Path]
) -> None:
    """F2: the blob is in the store, its row and the version are not."""
    home = tmp_path / "home"
    folder = shutil.copytree(tiny_llama["adapter"], tmp_path / "adapter")
    wanted = tree(folder)
    # the base is registered first: a push is validated against it before any upload
    crashed_push(home, tmp_path, "after_blob_put", folder, "org/f2", base=tiny_llama["base"])

    registry = open_registry(Settings(home=home))
    try:
        assert versions(registry) == []  # I1: nothing visible
        orphans = [d for d in store_objects(registry) if d not in blob_rows(registry)]
        assert len(orphans) == 1 and orphans[0] in wanted.values(), orphans
        orphan = orphans[0]
        assert staging_leftovers(registry.store) == []  # the crash came after the rename

        # GC within the grace period keeps it (a push may still reference it) ...
        report = MaintenanceService(registry).gc(grace=timedelta(hours=1))
        assert report.stray_deleted == [] and registry.store.exists(orphan)
    finally:
        registry.close()

    # ... and with the clock past the grace period deletes it (on a copy of the server's state,
    # so that the retry below still finds the orphan in place)
    copy = shutil.copytree(home, tmp_path / "home-copy")
    aged = open_registry(Settings(home=copy))
    try:
        report = MaintenanceService(aged).gc(grace=timedelta(hours=1), now=datetime.now(UTC) + timedelta(hours=2))
        assert report.stray_deleted == [orphan]
        assert not aged.store.exists(orphan) and store_objects(aged) == []
        assert versions(aged) == []
    finally:
        aged.close()

    # the retry succeeds and writes the orphan's key again (content address: still one object)
    with serving(env_with(LOREG_HOME=str(home)), tmp_path) as (url, _proc):
        with RegistryClient(url, token_for(home, url)) as c:
            c.register_base(tiny_llama["base"], factories.base_name("llama"))
            out = c.push(folder, "org/f2")
            assert (out["created"], out["version"]) == (True, 1)
            pulled = c.pull("org/f2:1", tmp_path / "pulled")
            assert pulled["version"] == 1
    assert tree(tmp_path / "pulled") == wanted

    registry = open_registry(Settings(home=home))
    try:
        objects = store_objects(registry)
        assert sorted(objects) == sorted(set(wanted.values()))  # one object per digest, the orphan's reused
        assert orphan in blob_rows(registry)
        assert versions(registry) == [("org/f2", 1)]
        assert staging_leftovers(registry.store) == []
        assert_pullable(registry, "org/f2")
    finally:
        registry.close()


def test_crash_after_commit_before_response_then_retry_is_idempotent(
    tmp_path: Path, tiny_llama: dict[str, Path]
) -> None:
    """F3: the version is committed but the client never hears of it; the retry gets it (200)."""
    home = tmp_path / "home"
    folder = shutil.copytree(tiny_llama["adapter"], tmp_path / "adapter")
    wanted = tree(folder)
    crashed_push(home, tmp_path, "after_commit", folder, "org/f3", base=tiny_llama["base"])

    with serving(env_with(LOREG_HOME=str(home)), tmp_path) as (url, _proc):
        with RegistryClient(url, token_for(home, url)) as c:
            out = c.push(folder, "org/f3")  # the same bytes again
            assert (out["created"], out["version"]) == (False, 1)
            assert out["bytes_uploaded"] == 0  # every blob was stored before the crash
            assert [v["version"] for v in c.adapter("org/f3")["versions"]] == [1]
            c.pull("org/f3:1", tmp_path / "pulled")
    assert tree(tmp_path / "pulled") == wanted  # I5: the exact bytes

    registry = open_registry(Settings(home=home))
    try:
        assert versions(registry) == [("org/f3", 1)]  # I4: exactly one version row
        assert_pullable(registry, "org/f3")
        assert staging_leftovers(registry.store) == []
    finally:
        registry.close()
