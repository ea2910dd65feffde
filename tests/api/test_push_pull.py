"""Push and pull end to end through RegistryClient, on SQLite + folder and on Postgres + S3."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from loreg.cli import client as client_module
from loreg.cli import config
from loreg.cli.client import RegistryClient
from loreg.registry import errors
from tests.faults.test_corruption import flip_one_byte
from tests.support.adapters import variant
from tests.support.races import LosesEveryInsertRace, count_rows


def tree_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def stored_files(folder: Path) -> dict[str, str]:
    keep = {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    return {k: v for k, v in tree_digest(folder).items() if k in keep}


def test_push_then_pull_is_byte_identical(client: RegistryClient, adapter_dir: Path, tmp_path: Path) -> None:
    out = client.push(adapter_dir, "org/support-bot", metrics={"eval_loss": 1.21}, aliases=["staging"], message="first")
    assert out["created"] is True
    assert (out["name"], out["version"]) == ("org/support-bot", 1)
    assert out["digest"].startswith("sha256:")
    assert out["bytes_uploaded"] == sum(p.stat().st_size for p in adapter_dir.iterdir())
    assert out["aliases"] == ["staging"]
    assert out["metrics"] == {"eval_loss": 1.21}

    for ref in ("org/support-bot", "org/support-bot:1", "org/support-bot:staging", f"org/support-bot@{out['digest']}"):
        dest = tmp_path / ref.replace("/", "_").replace(":", "_").replace("@", "_")
        pulled = client.pull(ref, dest)
        assert pulled["version"] == 1
        assert tree_digest(dest) == stored_files(adapter_dir)


def test_second_pull_of_same_bytes_downloads_nothing(client: RegistryClient, adapter_dir: Path, tmp_path: Path) -> None:
    client.push(adapter_dir, "org/bot")
    first = client.pull("org/bot", tmp_path / "a")
    second = client.pull("org/bot", tmp_path / "b")
    assert first["bytes_downloaded"] > 0
    assert second["bytes_downloaded"] == 0
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")


def test_push_same_bytes_returns_existing_version(client: RegistryClient, adapter_dir: Path) -> None:
    first = client.push(adapter_dir, "org/bot")
    again = client.push(adapter_dir, "org/bot")
    assert again["created"] is False
    assert again["version"] == first["version"] == 1
    assert again["digest"] == first["digest"]
    assert again["bytes_uploaded"] == 0
    assert [v["version"] for v in client.adapter("org/bot")["versions"]] == [1]


def test_changing_one_file_uploads_only_that_file(client: RegistryClient, adapter_dir: Path) -> None:
    client.push(adapter_dir, "org/bot")
    readme = adapter_dir / "README.md"
    readme.write_text(readme.read_text() + "\nevaluated on the held-out set\n")
    out = client.push(adapter_dir, "org/bot")
    assert out["created"] is True and out["version"] == 2
    assert out["files_uploaded"] == ["README.md"]
    assert out["bytes_uploaded"] == readme.stat().st_size


def test_push_lists_skipped_trainer_files(client: RegistryClient, adapter_dir: Path) -> None:
    (adapter_dir / "training_args.bin").write_bytes(b"\x80\x04junk")
    (adapter_dir / "optimizer.pt").write_bytes(b"PK\x03\x04junk")
    (adapter_dir / "checkpoint-500").mkdir()
    out = client.push(adapter_dir, "org/bot")
    assert sorted(out["skipped"]) == ["checkpoint-500/", "optimizer.pt", "training_args.bin"]
    assert sorted(f["path"] for f in out["files"]) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]


def test_pickle_only_adapter_is_refused_with_conversion_hint(client: RegistryClient, adapter_dir: Path) -> None:
    (adapter_dir / "adapter_model.safetensors").unlink()
    (adapter_dir / "adapter_model.bin").write_bytes(b"\x80\x04\x95junk")
    with pytest.raises(errors.UnsupportedFormatError) as info:
        client.push(adapter_dir, "org/bot")
    assert "safetensors" in (info.value.hint or "")


def test_peft_loads_pulled_folder_with_same_outputs(client: RegistryClient, tiny_llama: dict[str, Path], tmp_path: Path) -> None:
    import torch

    from tests import factories

    client.push(tiny_llama["adapter"], "org/bot")
    client.pull("org/bot", tmp_path / "pulled")
    ids = torch.arange(12).reshape(1, 12) % 100
    with torch.no_grad():
        original = factories.load_adapter_model(tiny_llama["base"], tiny_llama["adapter"])(input_ids=ids).logits
        pulled = factories.load_adapter_model(tiny_llama["base"], tmp_path / "pulled")(input_ids=ids).logits
        plain = factories.load_base_model(tiny_llama["base"])(input_ids=ids).logits
    assert torch.equal(original, pulled)
    assert not torch.allclose(original, plain)  # the adapter really changes the outputs


def test_aliases_move_and_keep_history(client: RegistryClient, adapter_dir: Path, tmp_path: Path) -> None:
    client.push(adapter_dir, "org/bot", aliases=["prod"])
    client.push(variant(adapter_dir, tmp_path / "v2", seed=2), "org/bot")
    moved = client.set_alias("org/bot:2", "prod")
    assert moved["version"] == 2
    assert [e["version"] for e in moved["history"]] == [2, 1]
    assert client.version("org/bot:prod")["version"] == 2
    removed = client.remove_alias("org/bot", "prod")
    assert removed["version"] is None
    with pytest.raises(errors.AliasNotFoundError):
        client.version("org/bot:prod")


def test_metrics_are_appended_and_latest_wins(client: RegistryClient, adapter_dir: Path) -> None:
    client.push(adapter_dir, "org/bot", metrics={"eval_loss": 1.5})
    out = client.add_metrics("org/bot:1", {"eval_loss": 1.2, "bleu": 30.0})
    assert out["metrics"] == {"eval_loss": 1.2, "bleu": 30.0}
    assert [(m["key"], m["value"]) for m in out["metrics_history"]] == [("eval_loss", 1.5), ("eval_loss", 1.2), ("bleu", 30.0)]
    assert client.version("org/bot")["digest"] == out["digest"]  # the version itself never changes


def test_deleted_version_stops_resolving_and_number_is_never_reused(
    client: RegistryClient, adapter_dir: Path, tmp_path: Path
) -> None:
    first = client.push(adapter_dir, "org/bot", aliases=["prod"])
    client.delete("org/bot:1")
    with pytest.raises(errors.VersionNotFoundError):
        client.version("org/bot:1")
    with pytest.raises(errors.VersionNotFoundError):
        client.version(f"org/bot@{first['digest']}")
    with pytest.raises(errors.AliasNotFoundError):
        client.version("org/bot:prod")
    again = client.push(adapter_dir, "org/bot")
    assert again["created"] is True and again["version"] == 2


def test_list_and_show(client: RegistryClient, adapter_dir: Path, tmp_path: Path) -> None:
    client.push(adapter_dir, "org/a")
    client.push(variant(adapter_dir, tmp_path / "b", seed=3), "other/b")
    names = [i["name"] for i in client.list_all()]
    assert sorted(names) == ["org/a", "other/b"]
    assert [i["name"] for i in client.list_all(namespace="org")] == ["org/a"]
    v = client.version("org/a")
    assert v["facts"]["ranks"] == [8]
    assert sorted(v["facts"]["targets"]) == ["q_proj", "v_proj"]
    assert v["config"]["r"] == 8


def test_twenty_concurrent_pushes_get_numbers_one_to_twenty(
    live_server: str, admin_token: str, adapter_dir: Path, tmp_path: Path
) -> None:
    folders = [variant(adapter_dir, tmp_path / f"v{i}", seed=100 + i) for i in range(20)]

    def push(folder: Path) -> dict[str, Any]:
        with RegistryClient(live_server, admin_token) as c:
            return c.push(folder, "org/busy")

    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(push, folders))
    assert sorted(r["version"] for r in results) == list(range(1, 21))
    assert len({r["digest"] for r in results}) == 20
    with RegistryClient(live_server, admin_token) as c:
        assert sorted(v["version"] for v in c.adapter("org/busy")["versions"]) == list(range(1, 21))


def test_version_json_is_the_rest_resource(client: RegistryClient, api: Any, adapter_dir: Path) -> None:
    client.push(adapter_dir, "org/bot")
    rest = api.get("/v1/adapters/org/bot/versions/1").json()
    assert rest == json.loads(json.dumps(client.version("org/bot:1")))


def test_presigned_downloads_bypass_the_api_and_still_verify(
    client: RegistryClient, registry: Any, adapter_dir: Path, tmp_path: Path, backend: str, monkeypatch: Any
) -> None:
    client.push(adapter_dir, "org/bot")
    registry.settings.s3_presign_downloads = True
    with monkeypatch.context() as patch:
        if backend == "postgres":  # S3: the API must not stream the bytes itself
            def no_streaming(*_a: Any, **_k: Any) -> Any:
                raise AssertionError("the API streamed a file although presigned downloads are on")

            patch.setattr(registry.store, "open", no_streaming)
        out = client.pull("org/bot", tmp_path / "direct")
    assert tree_digest(tmp_path / "direct") == stored_files(adapter_dir)
    assert out["bytes_downloaded"] > 0

    # the bytes storage hands out are verified too: one flipped byte, and no file is placed
    digest = next(f["digest"] for f in out["files"] if f["path"] == "adapter_model.safetensors")
    flip_one_byte(registry, digest)
    shutil.rmtree(config.cache_dir())
    with pytest.raises((errors.DigestMismatchError, errors.ConnectionFailedError)):
        client.pull("org/bot", tmp_path / "rotten")
    assert not (tmp_path / "rotten" / "adapter_model.safetensors").exists()


def test_blob_upload_that_keeps_losing_the_insert_race_is_a_conflict_and_records_nothing(
    api: Any, registry: Any
) -> None:
    from loreg.registry.db import retry
    from loreg.registry.db.models import AdapterBlob, Blob

    data = b"bytes uploaded while another upload of them keeps winning"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    with LosesEveryInsertRace(registry, Blob) as race:
        resp = api.put(f"/v1/adapters/org/race/blobs/{digest}", content=data)
    assert resp.status_code == 409, resp.text
    assert resp.json()["errors"][0]["code"] == "CONFLICT"
    assert race.attempts == retry.ATTEMPTS
    assert count_rows(registry, Blob) == 0 and count_rows(registry, AdapterBlob) == 0
    assert api.post("/v1/adapters/org/race/blobs:check", json={"digests": [digest]}).json()["missing"] == [digest]


def test_a_file_the_version_does_not_hold_is_file_not_found(client: RegistryClient, api: Any, adapter_dir: Path) -> None:
    client.push(adapter_dir, "org/bot")
    resp = api.get("/v1/adapters/org/bot/versions/1/files/tokenizer.json")  # a legal name, not pushed
    assert resp.status_code == 404 and resp.json()["errors"][0]["code"] == "FILE_NOT_FOUND"
    assert api.get("/v1/adapters/org/bot/versions/9/files/tokenizer.json").json()["errors"][0]["code"] == "VERSION_NOT_FOUND"


def hashes_of(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files the client hashes from now on (each full sha256 pass over a local file)."""
    hashed: list[Path] = []
    real = client_module.sha256_file

    def counting(path: Path) -> str:
        hashed.append(Path(path))
        return real(path)

    monkeypatch.setattr(client_module, "sha256_file", counting)
    return hashed


def test_pushing_a_folder_again_does_not_hash_its_files_again(
    client: RegistryClient, adapter_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module.DigestCache, "MARGIN_NS", 0)  # the test's files were written just now
    hashed = hashes_of(monkeypatch)
    first = client.push(adapter_dir, "org/bot")
    assert len(hashed) == len(first["files"])
    hashed.clear()
    again = client.push(adapter_dir, "org/bot", aliases=["prod"])
    assert hashed == []
    assert again["version"] == first["version"] and again["digest"] == first["digest"]


def test_a_file_written_since_it_was_hashed_is_hashed_and_pushed_again(
    client: RegistryClient, adapter_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module.DigestCache, "MARGIN_NS", 0)
    client.push(adapter_dir, "org/bot")
    weights = adapter_dir / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-2] ^= 0x01  # same size, a low bit of the last value: still a valid adapter
    weights.write_bytes(bytes(data))
    hashed = hashes_of(monkeypatch)
    second = client.push(adapter_dir, "org/bot")
    assert weights in hashed
    assert second["version"] == 2 and second["files_uploaded"] == ["adapter_model.safetensors"]
    pulled = client.pull("org/bot:2", tmp_path / "pulled")
    assert (Path(pulled["path"]) / "adapter_model.safetensors").read_bytes() == bytes(data)


def test_a_file_written_just_before_it_was_hashed_keeps_no_digest(
    client: RegistryClient, adapter_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a write in the same timestamp tick as the hash would leave size, mtime and ctime as they were
    client.push(adapter_dir, "org/bot")
    hashed = hashes_of(monkeypatch)
    second = client.push(adapter_dir, "org/bot")
    assert len(hashed) == len(second["files"])


def test_a_stale_digest_is_refused_by_the_server_and_forgotten(
    client: RegistryClient, adapter_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(client_module.DigestCache, "MARGIN_NS", 0)
    weights = adapter_dir / "adapter_model.safetensors"
    cache = client_module.DigestCache(config.cache_dir() / "digests")
    wrong = "sha256:" + hashlib.sha256(b"other bytes").hexdigest()
    entry = cache._entry(os.stat(weights))  # as if the file changed in the tick it was hashed
    entry.parent.mkdir(parents=True)
    entry.write_text(wrong)
    with pytest.raises(errors.DigestMismatchError) as info:
        client.push(adapter_dir, "org/bot")
    assert "push again" in (info.value.hint or "")
    assert not entry.exists()
    with pytest.raises((errors.AdapterNotFoundError, errors.VersionNotFoundError)):
        client.version("org/bot:1")
    assert client.push(adapter_dir, "org/bot")["version"] == 1


def test_a_fresh_pull_writes_the_users_copy_while_downloading(
    client: RegistryClient, adapter_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not copied from the cache afterwards (a second pass over the file, and an fsync after the
    download instead of during it); a file already cached is still copied."""
    client.push(adapter_dir, "org/bot")
    real = client_module._copy_contents
    copied: list[str] = []

    def counting(inp: Any, out: Any) -> None:
        copied.append(Path(inp.name).name)
        real(inp, out)

    monkeypatch.setattr(client_module, "_copy_contents", counting)
    client.pull("org/bot:1", tmp_path / "a")
    assert copied == []
    assert tree_digest(tmp_path / "a") == stored_files(adapter_dir)
    assert [p.name for p in (tmp_path / "a").iterdir() if p.name.startswith(".")] == []
    client.pull("org/bot:1", tmp_path / "b")
    assert len(copied) == len(stored_files(adapter_dir))
    assert tree_digest(tmp_path / "b") == stored_files(adapter_dir)
