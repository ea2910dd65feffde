"""The server killed with SIGKILL in the middle of an upload: nothing becomes visible, a retry succeeds.

`loreg serve` runs as a subprocess on the embedded default (SQLite + folder in a temporary
LOREG_HOME). The push is the real RegistryClient.push; its progress callback (called before each
chunk goes out) holds the upload of a 64 MiB file once half of it has been sent, so the kill lands
mid-upload at a point the test controls.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import threading
from datetime import timedelta
from pathlib import Path

import pytest

from loreg.cli.client import RegistryClient
from loreg.registry import errors
from loreg.registry.services.context import open_registry
from loreg.registry.services.maintenance import MaintenanceService
from loreg.registry.settings import Settings
from tests import factories
from tests.support.server import DEADLINE_S, env_with, poll_until, serving, token_for

pytestmark = pytest.mark.slow

BIG_FILE = "tokenizer.json"
BIG_SIZE = 64 * 1024 * 1024


def big_adapter(src: Path, dest: Path) -> Path:
    """The real PEFT adapter plus a 64 MiB tokenizer.json (valid JSON), which push uploads too."""
    shutil.copytree(src, dest)
    payload = base64.b64encode(os.urandom(BIG_SIZE * 3 // 4 - 64)).decode()
    text = json.dumps({"version": "1.0", "padding": payload})
    (dest / BIG_FILE).write_text(text + " " * (BIG_SIZE - len(text)))
    assert (dest / BIG_FILE).stat().st_size == BIG_SIZE
    return dest


def staged_bytes(home: Path) -> int:
    uploads = home / "store" / "uploads"
    if not uploads.is_dir():
        return 0
    return max((p.stat().st_size for p in uploads.iterdir() if p.is_file()), default=0)


def test_sigkill_mid_upload_leaves_nothing_visible_and_retry_gets_version_one(
    tmp_path: Path, tiny_llama: dict[str, Path]
) -> None:
    home = tmp_path / "home"
    folder = big_adapter(tiny_llama["adapter"], tmp_path / "adapter")
    big_digest = "sha256:" + hashlib.sha256((folder / BIG_FILE).read_bytes()).hexdigest()

    sent = 0
    half_sent = threading.Event()
    release = threading.Event()

    def progress(label: str, n: int, total: int) -> None:
        nonlocal sent
        if label != BIG_FILE:
            return
        sent += n
        if sent >= BIG_SIZE // 2 and not half_sent.is_set():
            half_sent.set()
            release.wait(DEADLINE_S)  # hold the upload here until the server is dead

    failure: list[BaseException] = []

    with serving(env_with(LOREG_HOME=str(home)), tmp_path) as (url, proc):
        with RegistryClient(url, token_for(home, url)) as c:
            c.register_base(tiny_llama["base"], factories.base_name("llama"))

        def push() -> None:
            try:
                with RegistryClient(url, token_for(home, url)) as c:
                    c.push(folder, "org/big", progress=progress)
            except BaseException as exc:  # noqa: BLE001 - inspected by the test thread
                failure.append(exc)

        pusher = threading.Thread(target=push, daemon=True)
        pusher.start()
        try:
            assert half_sent.wait(DEADLINE_S), "the push never reached half of the big file"
            # the server has written a good part of what was sent into its staging file
            poll_until(lambda: staged_bytes(home) >= BIG_SIZE // 4, "the server to stage a quarter of the file")
            proc.kill()  # SIGKILL: no cleanup, no shutdown hooks
            assert proc.wait(timeout=30) == -9
        finally:
            release.set()
            pusher.join(DEADLINE_S)
        assert not pusher.is_alive()
        assert len(failure) == 1 and isinstance(failure[0], errors.ConnectionFailedError), failure

    # restart on the same LOREG_HOME: nothing of the interrupted push is visible
    with serving(env_with(LOREG_HOME=str(home)), tmp_path) as (url, _proc):
        with RegistryClient(url, token_for(home, url)) as c:
            assert c.list_all() == []
            with pytest.raises(errors.AdapterNotFoundError):
                c.adapter("org/big")
            with pytest.raises(errors.AdapterNotFoundError):
                c.version("org/big:1")
            assert c.missing_blobs([big_digest]) == [big_digest]  # the partial upload never became a blob
            # the staging file of the killed upload may remain; GC with grace 0 removes it
            registry = open_registry(Settings(home=home))
            try:
                report = MaintenanceService(registry).gc(grace=timedelta(0))
            finally:
                registry.close()
            assert report.staging_removed >= 1 and staged_bytes(home) == 0
            assert not any((home / "store" / "uploads").iterdir())

            out = c.push(folder, "org/big")
            assert (out["created"], out["version"]) == (True, 1)
            assert BIG_FILE in out["files_uploaded"]
            assert [v["version"] for v in c.adapter("org/big")["versions"]] == [1]
            assert [i["name"] for i in c.list_all()] == ["org/big"]

            pulled = c.pull("org/big:1", tmp_path / "pulled")
            assert pulled["version"] == 1
            assert hashlib.sha256((tmp_path / "pulled" / BIG_FILE).read_bytes()).hexdigest() == big_digest.removeprefix(
                "sha256:"
            )
