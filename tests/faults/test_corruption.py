"""Corruption at rest and GC racing pushes (TESTPLAN F10).

A stored blob with one flipped byte: the server verifies while it sends and breaks the connection
before the last chunk, the client verifies too and writes no file, `loreg fsck` reports it.
GC run over and over while pushes are in flight never takes a blob an acknowledged version needs.
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from loreg.cli.client import RegistryClient
from loreg.registry import errors
from loreg.registry.services.context import AppContext
from loreg.registry.services.maintenance import MaintenanceService
from tests.faults.conftest import assert_pullable, blob_rows, set_last_seen, sha256, tree, versions
from tests.support.adapters import variant
from tests.support.moto import REGION
from tests.support.server import env_with, loreg

WEIGHTS = "adapter_model.safetensors"


def flip_one_byte(registry: AppContext, digest: str) -> None:
    """Damage the stored object behind the registry's back (same size, one byte differs)."""
    store: Any = registry.store
    with store.open(digest) as f:
        data = bytearray(f.read())
    data[len(data) - 5] ^= 0x01
    path = store.local_path(digest)
    if path is not None:
        path.write_bytes(bytes(data))
    else:
        store._client.put_object(Bucket=store.bucket, Key=store._key(digest), Body=bytes(data))


def server_env(settings: Any, **more: str) -> dict[str, str]:
    env = env_with(LOREG_HOME=str(settings.home), LOREG_DATABASE_URL=settings.database_url,
                   LOREG_STORAGE_URL=settings.storage_url, **more)
    if settings.s3_endpoint_url:
        env.update(LOREG_S3_ENDPOINT_URL=settings.s3_endpoint_url, LOREG_S3_REGION=REGION)
    return env


@pytest.mark.slow
def test_flipped_byte_is_refused_by_pull_and_reported_by_fsck(
    live_server: str, admin_token: str, registry: AppContext, settings: Any, adapter_dir: Path, tmp_path: Path
) -> None:
    with RegistryClient(live_server, admin_token) as c:
        pushed = c.push(adapter_dir, "org/rot")
    digest = next(f["digest"] for f in pushed["files"] if f["path"] == WEIGHTS)
    flip_one_byte(registry, digest)

    target = tmp_path / "pulled"
    with RegistryClient(live_server, admin_token) as c:
        with pytest.raises((errors.DigestMismatchError, errors.ConnectionFailedError)):
            c.pull("org/rot:1", target)
    assert not (target / WEIGHTS).exists()
    assert not [p.name for p in target.iterdir() if WEIGHTS in p.name]  # no partial or temp file either

    # the CLI: non-zero exit, no file
    cli_target = tmp_path / "cli-pulled"
    done = loreg("pull", "org/rot:1", "-o", cli_target, check=False, cwd=tmp_path,
                 env=env_with(LOREG_HOME=str(tmp_path / "cli-home"), LOREG_URL=live_server, LOREG_TOKEN=admin_token))
    assert done.returncode != 0, done.stdout
    assert not (cli_target / WEIGHTS).exists()

    # fsck, in process and as `loreg fsck --json` on the server host
    report = MaintenanceService(registry).fsck()
    assert not report.ok
    assert [c["digest"] for c in report.corrupt] == [digest]
    assert report.corrupt[0]["actual"] != digest and report.missing == []
    done = loreg("fsck", "--json", env=server_env(settings), cwd=tmp_path, check=False)
    assert done.returncode == 1, done.stderr
    out = json.loads(done.stdout)
    assert out["ok"] is False and [c["digest"] for c in out["corrupt"]] == [digest]
    assert out["checked"] >= len(pushed["files"])


PUSHES = 10


@pytest.mark.slow
def test_online_gc_while_pushing_keeps_every_acknowledged_version(
    live_server: str, admin_token: str, registry: AppContext, adapter_dir: Path, tmp_path: Path
) -> None:
    """GC (default grace) runs in a loop while 10 pushes run. The pushes share files with blobs that
    are old enough for GC to take (an earlier push that never committed): a push that reports them
    present, uploads them or commits them must win against GC, or be refused and retried."""
    folders = [variant(adapter_dir, tmp_path / f"v{i}", seed=100 + i) for i in range(PUSHES)]
    # blobs the pushes will dedupe against, unseen for a month: GC may take them at any moment
    with RegistryClient(live_server, admin_token) as c:
        for path in sorted(adapter_dir.iterdir()):
            data = path.read_bytes()
            c.request("PUT", f"/v1/adapters/org/race/blobs/{sha256(data)}", content=data)
            set_last_seen(registry, sha256(data), datetime.now(UTC) - timedelta(days=30))
        junk = b'{"junk": 1}'
        c.request("PUT", f"/v1/adapters/org/race/blobs/{sha256(junk)}", content=junk)
        set_last_seen(registry, sha256(junk), datetime.now(UTC) - timedelta(days=30))

    stop = threading.Event()
    gc_runs: list[Any] = []
    gc_errors: list[BaseException] = []

    def collect() -> None:
        service = MaintenanceService(registry)
        while not stop.is_set():
            try:
                gc_runs.append(service.gc())
            except Exception as exc:  # noqa: BLE001 - reported below
                gc_errors.append(exc)
                return

    acknowledged: dict[int, int] = {}
    refused: list[BaseException] = []

    def push(i: int) -> None:
        with RegistryClient(live_server, admin_token) as c:
            for _attempt in range(3):  # a push GC raced with is refused; the client retries
                try:
                    acknowledged[i] = c.push(folders[i], "org/race")["version"]
                    return
                except (errors.BlobMissingError, errors.ConflictError) as exc:
                    refused.append(exc)

    collector = threading.Thread(target=collect, daemon=True)
    collector.start()
    pushers = [threading.Thread(target=push, args=(i,), daemon=True) for i in range(PUSHES)]
    for t in pushers:
        t.start()
    for t in pushers:
        t.join(300)
    stop.set()
    collector.join(120)
    assert not gc_errors, gc_errors
    assert len(gc_runs) >= 1
    assert sorted(acknowledged) == list(range(PUSHES)), refused
    assert sorted(acknowledged.values()) == list(range(1, PUSHES + 1))
    assert sha256(b'{"junk": 1}') not in blob_rows(registry)  # GC did run for real

    assert versions(registry, "org/race") == [("org/race", n) for n in range(1, PUSHES + 1)]
    assert_pullable(registry, "org/race")
    with RegistryClient(live_server, admin_token) as c:
        for i, number in acknowledged.items():
            c.pull(f"org/race:{number}", tmp_path / f"pulled-{i}")
            assert tree(tmp_path / f"pulled-{i}") == tree(folders[i])


class DeleteHook:
    """The store as GC sees it: delete() of one digest first runs ``before(digest)``."""

    def __init__(self, store: Any, digest: str, before: Any):
        self._store, self._digest, self._before = store, digest, before

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def delete(self, digest: str) -> None:
        if digest == self._digest:
            self._before(digest)
        self._store.delete(digest)


HOLD_S = 3.0  # how long GC's delete waits for the push to get ahead (only a correct server makes it wait that long)


def race_gc_with_a_push(
    live_server: str, token: str, app: Any, registry: AppContext, folder: Path, digest: str, monkeypatch: Any, **gc: Any
) -> None:
    """The worst interleaving, made deterministic with hooks: GC has decided to delete blob
    ``digest``; just before it deletes the object, a push of ``folder`` uploads those bytes again
    (recorded as present) and its commit checks the blob; then GC deletes the object; then the
    commit goes on. A correct server makes the push wait for GC (HOLD_S passes) and refuses or
    repairs it. Either way: no acknowledged version may lack a blob (I1), and a retry succeeds."""
    import dataclasses

    recorded, checked, deleted = threading.Event(), threading.Event(), threading.Event()
    blobs = app.state.blobs
    real_record, real_stat = blobs.record, registry.store.stat

    def record(d: str, *args: Any, **kwargs: Any) -> Any:
        out = real_record(d, *args, **kwargs)
        if d == digest:
            recorded.set()
        return out

    def stat(d: str) -> Any:  # the commit checks each blob with stat()
        out = real_stat(d)
        if d == digest and recorded.is_set() and not checked.is_set():
            checked.set()
            deleted.wait(HOLD_S + 30)  # the commit goes on once GC deleted the object
        return out

    monkeypatch.setattr(blobs, "record", record)
    monkeypatch.setattr(registry.store, "stat", stat)
    outcome: dict[str, Any] = {}

    def push() -> None:
        with RegistryClient(live_server, token) as c:
            try:
                outcome["version"] = c.push(folder, "org/race")["version"]
            except errors.LoregError as exc:
                outcome["error"] = exc

    pusher = threading.Thread(target=push, daemon=True)

    def before_delete(_d: str) -> None:
        pusher.start()
        checked.wait(HOLD_S)

    report = MaintenanceService(dataclasses.replace(registry, store=DeleteHook(registry.store, digest, before_delete))).gc(**gc)
    deleted.set()
    pusher.join(120)
    assert not pusher.is_alive()
    assert digest in report.deleted + report.stray_deleted or not pusher.ident, report
    if "error" in outcome:  # refused: the client is told to retry
        assert isinstance(outcome["error"], (errors.BlobMissingError, errors.ConflictError)), outcome
        with RegistryClient(live_server, token) as c:
            outcome["version"] = c.push(folder, "org/race")["version"]
    assert outcome["version"] == 1
    assert_pullable(registry, "org/race")


@pytest.mark.slow
def test_gc_racing_a_push_that_uploads_an_old_blob_again(
    live_server: str, admin_token: str, app: Any, registry: AppContext, adapter_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An unreferenced blob unseen for a month (a push that never committed); GC takes it."""
    data = (adapter_dir / "README.md").read_bytes()  # a file the commit checks but does not read
    digest = sha256(data)
    with RegistryClient(live_server, admin_token) as c:
        c.request("PUT", f"/v1/adapters/org/race/blobs/{digest}", content=data)
    set_last_seen(registry, digest, datetime.now(UTC) - timedelta(days=30))
    race_gc_with_a_push(live_server, admin_token, app, registry, adapter_dir, digest, monkeypatch)


@pytest.mark.slow
def test_gc_racing_a_push_that_uploads_a_stray_object_again(
    live_server: str, admin_token: str, app: Any, registry: AppContext, adapter_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An object with no row (a server crashed after writing it, F2); GC past the grace period takes it."""
    import io

    data = (adapter_dir / "README.md").read_bytes()
    digest = sha256(data)
    registry.store.put(io.BytesIO(data), digest)
    grace = timedelta(seconds=registry.settings.gc_grace_seconds)
    race_gc_with_a_push(live_server, admin_token, app, registry, adapter_dir, digest, monkeypatch,
                        now=datetime.now(UTC) + grace + timedelta(minutes=1))
