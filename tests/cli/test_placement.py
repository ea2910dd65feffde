"""Where pulled and exported files land: the user's own copies (or, asked for, links to the cache),
placed atomically, leaving nothing else in the folder. Both backends."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from loreg.cli import config
from loreg.cli.client import BlobCache, RegistryClient
from loreg.registry.merge.worker import ExportWorker
from tests import factories
from tests.support.adapters import variant

STORED = ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())  # dot-files included: nothing may be left behind


def cache_file(version: dict[str, Any], path: str) -> tuple[Path, str]:
    digest = next(f["digest"] for f in version["files"] if f["path"] == path)
    return BlobCache(config.cache_dir()).path(digest), digest


def test_pulling_twice_into_one_folder_leaves_only_the_files(client: RegistryClient, adapter_dir: Path, tmp_path: Path) -> None:
    client.push(adapter_dir, "org/bot")
    for link in (False, False, True, True, False):
        client.pull("org/bot", tmp_path / "out", link=link)
        assert listing(tmp_path / "out") == STORED, link


def test_pulled_files_are_the_users_own_and_the_cache_stays_intact(
    client: RegistryClient, adapter_dir: Path, tmp_path: Path
) -> None:
    # two adapters whose README.md has the same bytes (one blob, one cache entry)
    client.push(adapter_dir, "org/summarizer")
    client.push(variant(adapter_dir, tmp_path / "other", seed=5), "org/adapter")
    first = client.pull("org/summarizer", tmp_path / "summarizer")
    second = client.pull("org/adapter", tmp_path / "adapter")
    cached, digest = cache_file(first, "README.md")
    assert cache_file(second, "README.md")[1] == digest
    original = (tmp_path / "adapter" / "README.md").read_bytes()

    with open(tmp_path / "summarizer" / "README.md", "a") as f:
        f.write("\nmy notes\n")

    assert (tmp_path / "adapter" / "README.md").read_bytes() == original
    assert "sha256:" + hashlib.sha256(cached.read_bytes()).hexdigest() == digest
    assert BlobCache(config.cache_dir()).get(digest, len(original)) == cached  # still verifies
    for folder in ("summarizer", "adapter"):
        for name in STORED:
            assert (tmp_path / folder / name).stat().st_ino != cache_file(first if folder == "summarizer" else second, name)[0].stat().st_ino
    assert client.pull("org/adapter", tmp_path / "again")["bytes_downloaded"] == 0  # the cache serves


def test_link_gives_files_that_share_the_cache_inode(client: RegistryClient, adapter_dir: Path, tmp_path: Path) -> None:
    client.push(adapter_dir, "org/bot")
    copied = client.pull("org/bot", tmp_path / "out")  # a copy first: --link then replaces it by a link
    out = client.pull("org/bot", tmp_path / "out", link=True)
    for name in STORED:
        cached, _ = cache_file(out, name)
        assert (tmp_path / "out" / name).stat().st_ino == cached.stat().st_ino
        assert (tmp_path / "out" / name).read_bytes() == (adapter_dir / name).read_bytes()
    assert copied["digest"] == out["digest"]
    assert listing(tmp_path / "out") == STORED


@pytest.fixture(scope="module")
def mergeable(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("placement-llama")
    base = factories.make_base(root / "base", "llama", max_shard_size="20KB")
    return {"base": base, "adapter": factories.make_adapter(root / "a", "llama", base_dir=base, seed=11)}


def test_export_into_one_folder_twice_copies_by_default_and_links_when_asked(
    bare_client: RegistryClient, registry: Any, mergeable: dict[str, Path], tmp_path: Path
) -> None:
    bare_client.register_base(mergeable["base"], factories.base_name("llama"), upload_weights=True)
    bare_client.push(mergeable["adapter"], "org/a")
    bare_client.request("POST", "/v1/exports", json={"adapters": [{"ref": "org/a:1"}]})
    worker = ExportWorker(registry, device="cpu")
    while worker.run_once():
        pass
    dest = tmp_path / "merged"
    out = bare_client.export(["org/a:1"], dest)
    files = sorted(f["path"] for f in out["files"])
    again = bare_client.export(["org/a:1"], dest)
    assert again["bytes_downloaded"] == 0
    assert listing(dest) == files
    for f in out["files"]:
        assert (dest / f["path"]).stat().st_ino != BlobCache(config.cache_dir()).path(f["digest"]).stat().st_ino

    for _ in range(2):
        bare_client.export(["org/a:1"], dest, link=True)
        assert listing(dest) == files
    for f in out["files"]:
        assert (dest / f["path"]).stat().st_ino == BlobCache(config.cache_dir()).path(f["digest"]).stat().st_ino
