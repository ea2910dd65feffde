"""Deleting a whole adapter over REST: every version and alias goes, numbers are never given again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from loreg.cli.client import RegistryClient
from loreg.registry import errors
from tests.support.adapters import variant


def test_delete_adapter_removes_versions_and_aliases_and_keeps_the_counter(
    client: RegistryClient, adapter_dir: Path, tmp_path: Path
) -> None:
    client.push(adapter_dir, "org/bot", aliases=["prod"])
    client.push(variant(adapter_dir, tmp_path / "v2", seed=2), "org/bot")
    client.push(adapter_dir, "org/other")

    assert client.delete_adapter("org/bot") == {"name": "org/bot", "versions": [1, 2], "deleted": True}
    with pytest.raises(errors.VersionNotFoundError):
        client.version("org/bot")
    with pytest.raises(errors.AliasNotFoundError):
        client.version("org/bot:prod")
    assert [i["name"] for i in client.list_all()] == ["org/other"]
    assert client.version("org/other")["version"] == 1

    pushed = client.push(adapter_dir, "org/bot")  # the same bytes as the deleted version 1
    assert (pushed["version"], pushed["created"]) == (3, True)
    with pytest.raises(errors.AdapterNotFoundError):
        client.delete_adapter("org/never")


def test_delete_adapter_needs_write_on_its_namespace(
    client: RegistryClient, adapter_dir: Path, app: Any, make_token: Any
) -> None:
    client.push(adapter_dir, "org/bot")
    with TestClient(app, base_url="http://testserver", raise_server_exceptions=False) as http:
        for token in (make_token("read"), make_token("write", ["team-a/*"])):
            got = http.delete("/v1/adapters/org/bot", headers={"Authorization": f"Bearer {token}"})
            assert got.status_code == 403, got.text
    assert client.version("org/bot")["version"] == 1
