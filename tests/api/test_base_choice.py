"""How a push picks its base: --base (recorded, no name warning), the config's name, or a local base
folder named by base_model_name_or_path and matched by content (weights first, then layout)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from loreg.cli import client as client_module
from loreg.cli.client import RegistryClient
from loreg.registry import errors
from loreg.registry.db.models import Version
from tests import factories

BASE = factories.base_name("llama")
INSTRUCT = "loreg-test/tiny-llama-instruct"


@pytest.fixture(scope="module")
def instruct(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A second base with the tiny LLaMA's layout and other weights (as an instruct model is), an
    adapter trained on it, and a third same-layout base nobody registers."""
    root = tmp_path_factory.mktemp("instruct")
    base = factories.make_base(root / "base", "llama", seed=7)
    return {
        "base": base,
        "adapter": factories.make_adapter(root / "adapter", "llama", base_dir=base),
        "unregistered": factories.make_base(root / "unregistered", "llama", seed=9),
    }


def naming(adapter: Path, dest: Path, base: str) -> Path:
    """A copy of ``adapter`` whose config names ``base`` as base_model_name_or_path."""
    return factories.edit_adapter(adapter, dest, config={"base_model_name_or_path": base})


def version_count(registry: Any) -> int:
    with registry.sessions.begin() as s:
        return int(s.scalar(select(func.count()).select_from(Version)) or 0)


def nothing_uploaded(client: RegistryClient, folder: Path) -> bool:
    digests = [client_module.sha256_file(folder / f) for f in ("adapter_config.json", "adapter_model.safetensors")]
    return sorted(client.missing_blobs(digests)) == sorted(digests)


def warning_codes(out: dict[str, Any]) -> set[str]:
    return {w["code"] for w in out["warnings"]}


def test_a_local_base_folder_is_matched_by_its_weights(
    bare_client: RegistryClient, tiny_llama: dict[str, Path], instruct: dict[str, Path], tmp_path: Path
) -> None:
    llama = bare_client.register_base(tiny_llama["base"], BASE)
    inst = bare_client.register_base(instruct["base"], INSTRUCT)
    for adapter, base_dir, want in ((tiny_llama["adapter"], tiny_llama["base"], llama), (instruct["adapter"], instruct["base"], inst)):
        folder = naming(adapter, tmp_path / want["names"][0].replace("/", "_"), str(base_dir))
        out = bare_client.push(folder, "org/bot")
        assert out["base"]["weights_digest"] == want["weights_digest"]
        assert out["base_match"] == {"ref": want["weights_digest"], "by": "weights", "name": want["names"][0], "path": str(base_dir)}
        assert out["facts"]["base_source"] == "weights"
        assert "BASE_NAME_MISMATCH" not in warning_codes(out)
        checked = bare_client.check(folder)
        assert checked["base"]["weights_digest"] == want["weights_digest"]
        assert checked["base_match"] == out["base_match"]


def test_a_local_base_folder_matches_the_only_base_of_its_layout(
    bare_client: RegistryClient, tiny_llama: dict[str, Path], instruct: dict[str, Path], tmp_path: Path
) -> None:
    inst = bare_client.register_base(instruct["base"], INSTRUCT)
    folder = naming(tiny_llama["adapter"], tmp_path / "a", str(tiny_llama["base"]))
    out = bare_client.push(folder, "org/bot")
    assert out["base"]["weights_digest"] == inst["weights_digest"]
    assert (out["base_match"]["by"], out["facts"]["base_source"]) == ("layout", "layout")


def test_several_bases_of_the_folder_layout_and_no_weights_match_is_refused_listing_them(
    bare_client: RegistryClient, tiny_llama: dict[str, Path], instruct: dict[str, Path], tmp_path: Path, registry: Any
) -> None:
    bare_client.register_base(tiny_llama["base"], BASE)
    bare_client.register_base(instruct["base"], INSTRUCT)
    folder = naming(tiny_llama["adapter"], tmp_path / "a", str(instruct["unregistered"]))
    with pytest.raises(errors.BaseUnknownError) as pushed:
        bare_client.push(folder, "org/bot")
    err = pushed.value
    assert sorted(n for c in err.detail["candidates"] for n in c["names"]) == sorted([BASE, INSTRUCT])
    assert f"--base {BASE}" in (err.hint or "") and f"--base {INSTRUCT}" in (err.hint or "")
    assert BASE in err.message and INSTRUCT in err.message
    with pytest.raises(errors.BaseUnknownError) as checked:
        bare_client.check(folder)
    assert checked.value.to_dict() == err.to_dict()
    assert version_count(registry) == 0 and nothing_uploaded(bare_client, folder)


def test_a_folder_too_large_to_hash_is_matched_by_layout_alone(
    bare_client: RegistryClient, tiny_llama: dict[str, Path], instruct: dict[str, Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, registry: Any,
) -> None:
    bare_client.register_base(tiny_llama["base"], BASE)
    bare_client.register_base(instruct["base"], INSTRUCT)
    monkeypatch.setattr(client_module, "BASE_HASH_LIMIT", 0)
    folder = naming(tiny_llama["adapter"], tmp_path / "a", str(tiny_llama["base"]))
    with pytest.raises(errors.BaseUnknownError) as info:
        bare_client.push(folder, "org/bot")
    assert "too large to hash" in info.value.message and "--base" in (info.value.hint or "")
    assert version_count(registry) == 0
    out = bare_client.push(folder, "org/bot", base=BASE)  # the hint works
    assert out["facts"]["base_source"] == "explicit"


@pytest.mark.parametrize("missing", ["/nonexistent/models/llama", "./out/base-model", "~/no-such-folder/llama"])
def test_a_missing_base_folder_is_base_unknown_with_the_base_hint_from_push_and_check(
    client: RegistryClient, adapter_dir: Path, tmp_path: Path, registry: Any, missing: str
) -> None:
    folder = naming(adapter_dir, tmp_path / "a", missing)
    with pytest.raises(errors.BaseUnknownError) as pushed:
        client.push(folder, "org/bot")
    assert "--base" in (pushed.value.hint or "")
    with pytest.raises(errors.BaseUnknownError) as checked:
        client.check(folder)
    assert checked.value.to_dict() == pushed.value.to_dict()
    assert version_count(registry) == 0 and nothing_uploaded(client, folder)


def test_an_unregistered_base_name_is_the_same_error_from_push_and_check(
    bare_client: RegistryClient, adapter_dir: Path, registry: Any
) -> None:
    with pytest.raises(errors.BaseUnknownError) as pushed:
        bare_client.push(adapter_dir, "org/bot")
    with pytest.raises(errors.BaseUnknownError) as checked:
        bare_client.check(adapter_dir)
    assert checked.value.to_dict() == pushed.value.to_dict()
    assert "loreg base register" in (checked.value.hint or "")
    assert version_count(registry) == 0


def test_a_folder_of_an_unregistered_layout_says_to_register_it(
    client: RegistryClient, adapter_dir: Path, tmp_path: Path
) -> None:
    gpt2 = factories.make_base(tmp_path / "gpt2", "gpt2")
    folder = naming(adapter_dir, tmp_path / "a", str(gpt2))
    with pytest.raises(errors.BaseUnknownError) as info:
        client.push(folder, "org/bot")
    assert f"loreg base register {gpt2}" in (info.value.hint or "") and "--base" in (info.value.hint or "")


def test_an_explicit_base_is_recorded_and_gives_no_name_warning(
    client: RegistryClient, adapter_dir: Path, tmp_path: Path
) -> None:
    folder = naming(adapter_dir, tmp_path / "a", "someone/llama-finetune-dir")
    out = client.push(folder, "org/bot", base=BASE)
    assert out["facts"]["base_source"] == "explicit"
    assert "BASE_NAME_MISMATCH" not in warning_codes(out)
    assert client.version("org/bot:1")["warnings"] == out["warnings"]
    assert "BASE_NAME_MISMATCH" not in warning_codes(client.check(folder, base=BASE))


def test_a_base_taken_from_the_config_is_recorded_as_such(
    client: RegistryClient, adapter_dir: Path, api: Any
) -> None:
    out = client.push(adapter_dir, "org/bot")
    assert out["facts"]["base_source"] == "config"
    assert "base_match" not in out
    # another manifest of blobs org/bot holds (no README), so the commit reaches the base choice
    files = [{"path": f["path"], "size": f["size"], "digest": f["digest"]} for f in out["files"] if f["path"] != "README.md"]
    assert len(files) < len(out["files"])
    body = {"files": files, "base_source": "weights"}
    refused = api.post("/v1/adapters/org/bot/versions", content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert refused.status_code == 400, refused.text
    assert refused.json()["errors"][0]["message"] == "base_source needs base"
