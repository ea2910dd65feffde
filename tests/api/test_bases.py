"""Base models by content, validation on push against the base layout, lookup, inspect."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from sqlalchemy import func, select

from loreg.cli.client import RegistryClient
from loreg.registry import errors
from loreg.registry.db.models import Version
from tests import factories
from tests.support.adapters import variant


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Path]]:
    """Per family: a base checkpoint and a real PEFT adapter for it (plus special ones)."""
    root = tmp_path_factory.mktemp("families")
    out: dict[str, dict[str, Path]] = {}
    for fam in factories.FAMILIES:
        base = factories.make_base(root / fam / "base", fam)
        out[fam] = {"base": base, "adapter": factories.make_adapter(root / fam / "adapter", fam, base_dir=base)}
    out["llama"]["embed"] = factories.make_adapter(
        root / "llama" / "embed", "llama", base_dir=out["llama"]["base"], target_modules=["embed_tokens", "q_proj"]
    )
    out["llama"]["rank32"] = factories.make_adapter(root / "llama" / "r32", "llama", base_dir=out["llama"]["base"], r=32, lora_alpha=32)
    return out


def version_count(registry: Any) -> int:
    with registry.sessions.begin() as s:
        return int(s.scalar(select(func.count()).select_from(Version)) or 0)


def rewrite_tensor(adapter: Path, dest: Path, key_part: str, fn: Any) -> Path:
    shutil.copytree(adapter, dest)
    path = dest / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in sorted(tensors) if key_part in k)
    result = fn(key, tensors)
    save_file(result, path)
    return dest


def edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.mark.parametrize("family", factories.FAMILIES)
def test_good_adapter_of_each_family_validates_and_is_found_by_base(
    bare_client: RegistryClient, families: dict[str, dict[str, Path]], family: str
) -> None:
    base = bare_client.register_base(families[family]["base"], factories.base_name(family))
    out = bare_client.push(families[family]["adapter"], f"org/{family}-bot")
    assert out["created"] and out["base"]["weights_digest"] == base["weights_digest"]
    by_name = bare_client.list_all(base=factories.base_name(family))
    by_digest = bare_client.list_all(base=base["weights_digest"])
    assert [i["name"] for i in by_name] == [i["name"] for i in by_digest] == [f"org/{family}-bot"]
    assert by_name[0]["match"] == "validated"
    expected = set(factories.default_target_modules(family))
    assert set(out["facts"]["targets"]) == expected
    if family == "gpt2":
        assert set(out["facts"]["serving"]) == {"vllm"}


def test_gpt2_conv1d_and_llama_embedding_targets_validate(bare_client: RegistryClient, families: dict[str, dict[str, Path]]) -> None:
    bare_client.register_base(families["llama"]["base"], factories.base_name("llama"))
    out = bare_client.push(families["llama"]["embed"], "org/embed")
    assert out["facts"]["has_embedding"] is True
    assert "embed_tokens" in out["facts"]["targets"]


def _bad_cases(families: dict[str, dict[str, Path]], tmp: Path) -> dict[str, tuple[Path, str, str]]:
    llama = families["llama"]["adapter"]

    def in_plus_one(key: str, t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        a = t[key]
        t[key] = np.concatenate([a, np.zeros((a.shape[0], 1), a.dtype)], axis=1)
        return t

    def rank_differs(key: str, t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        b = t[key]
        t[key] = np.concatenate([b, b], axis=1)
        return t

    def drop(key: str, t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        del t[key]
        return t

    def rename(new: str) -> Any:
        def fn(key: str, t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            for k in [k for k in t if "layers.0.self_attn.q_proj" in k]:
                t[k.replace("layers.0.self_attn.q_proj", new)] = t.pop(k)
            return t

        return fn

    cases: dict[str, tuple[Path, str, str]] = {}
    other_arch = tmp / "other-arch"
    shutil.copytree(families["gpt2"]["adapter"], other_arch)
    edit_config(other_arch, base_model_name_or_path=factories.base_name("llama"))
    cases["other architecture"] = (other_arch, "UNKNOWN_MODULE", "transformer.h.0.attn.c_attn")
    cases["in_features off by one"] = (
        rewrite_tensor(llama, tmp / "in1", "layers.0.self_attn.q_proj.lora_A", in_plus_one),
        "SHAPE_MISMATCH", "layers.0.self_attn.q_proj.lora_A",
    )
    cases["rank differs between A and B"] = (
        rewrite_tensor(llama, tmp / "rab", "layers.0.self_attn.v_proj.lora_B", rank_differs),
        "RANK_MISMATCH", "layers.0.self_attn.v_proj",
    )
    r_cfg = tmp / "rcfg"
    shutil.copytree(llama, r_cfg)
    edit_config(r_cfg, r=16)
    cases["r differs from config"] = (r_cfg, "RANK_MISMATCH", "lora_A")
    cases["module absent from base"] = (
        rewrite_tensor(llama, tmp / "absent", "layers.0.self_attn.q_proj", rename("layers.0.self_attn.qq_proj")),
        "UNKNOWN_MODULE", "qq_proj",
    )
    cases["layer beyond the base"] = (
        rewrite_tensor(llama, tmp / "beyond", "layers.0.self_attn.q_proj", rename("layers.99.self_attn.q_proj")),
        "UNKNOWN_MODULE", "layers.99",
    )
    cases["missing lora_B"] = (
        rewrite_tensor(llama, tmp / "nob", "layers.1.self_attn.q_proj.lora_B", drop),
        "MISSING_TENSOR", "layers.1.self_attn.q_proj",
    )
    return cases


BAD = [
    "other architecture", "in_features off by one", "rank differs between A and B", "r differs from config",
    "module absent from base", "layer beyond the base", "missing lora_B",
]


@pytest.mark.parametrize("case", BAD)
def test_bad_adapter_is_refused_with_422_naming_the_key_and_nothing_stored(
    bare_client: RegistryClient, registry: Any, families: dict[str, dict[str, Path]], tmp_path: Path, case: str
) -> None:
    bare_client.register_base(families["llama"]["base"], factories.base_name("llama"))
    folder, code, key_part = _bad_cases(families, tmp_path)[case]
    before = version_count(registry)
    with pytest.raises(errors.LoregError) as info:
        bare_client.push(folder, "org/bad")
    err = info.value
    assert err.status == 422, err.to_dict()
    problems = err.detail["problems"]
    assert any(p["code"] == code for p in problems), problems
    assert any(key_part in (p.get("key") or "") for p in problems), problems
    assert version_count(registry) == before
    with pytest.raises(errors.AdapterNotFoundError):
        bare_client.adapter("org/bad")


def test_unknown_base_is_refused_with_a_hint_to_register_it(bare_client: RegistryClient, adapter_dir: Path, registry: Any) -> None:
    with pytest.raises(errors.BaseUnknownError) as info:
        bare_client.push(adapter_dir, "org/bot")
    assert "loreg base register" in (info.value.hint or "")
    assert version_count(registry) == 0


def test_nonfinite_values_are_refused_and_nothing_stored(client: RegistryClient, adapter_dir: Path, registry: Any, tmp_path: Path) -> None:
    def poison(key: str, t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        b = t[key].copy()
        b.flat[0] = np.nan
        b.flat[1] = np.inf
        t[key] = b
        return t

    folder = rewrite_tensor(adapter_dir, tmp_path / "nan", "lora_B", poison)
    with pytest.raises(errors.NonFiniteValuesError):
        client.push(folder, "org/nan")
    assert version_count(registry) == 0


def test_warnings_are_stored_and_shown(client: RegistryClient, families: dict[str, dict[str, Path]], tmp_path: Path, tiny_llama: dict[str, Path]) -> None:
    def zero(key: str, t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for k in t:
            if ".lora_B." in k:
                t[k] = np.zeros_like(t[k])
        return t

    folder = rewrite_tensor(tiny_llama["adapter"], tmp_path / "zero", "lora_B", zero)
    # an entry that matches no module of the base: PEFT ignores it, loreg warns (one matching k_proj is refused)
    edit_config(folder, target_modules=["q_proj", "v_proj", "not_a_module"])
    out = client.push(folder, "org/zero", base=factories.base_name("llama"))
    codes = {w["code"] for w in out["warnings"]}
    assert "ZERO_LORA_B" in codes
    assert any("not_a_module" in json.dumps(w) for w in out["warnings"])
    listed = client.list_all(namespace="org")
    assert listed[0]["warnings"] == out["warnings"]


def test_rank_above_16_gets_a_vllm_verdict(client: RegistryClient, families: dict[str, dict[str, Path]]) -> None:
    client.register_base(families["llama"]["base"], factories.base_name("llama"))
    out = client.push(families["llama"]["rank32"], "org/big")
    verdict = out["facts"]["serving"]["vllm"]
    assert verdict["loads"] is False and any("32" in r for r in verdict["reasons"])


def test_weights_digest_ignores_sharding_and_layout_digest_only_shape(tmp_path: Path, bare_client: RegistryClient) -> None:
    from loreg.cli.checkpoint import scan_checkpoint

    one = factories.make_base(tmp_path / "one", "llama")
    sharded = factories.make_base(tmp_path / "sharded", "llama", max_shard_size="20KB")
    assert len(list(sharded.glob("*.safetensors"))) >= 3
    a, b = scan_checkpoint(one), scan_checkpoint(sharded)
    assert a.weights_digest == b.weights_digest
    assert a.layout_digest == b.layout_digest

    changed = tmp_path / "changed"
    shutil.copytree(one, changed)
    tensors = load_file(changed / "model.safetensors")
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].copy()
    tensors[key].flat[0] += 1.0
    save_file(tensors, changed / "model.safetensors", metadata={"format": "pt"})
    c = scan_checkpoint(changed)
    assert c.weights_digest != a.weights_digest
    assert c.layout_digest == a.layout_digest

    other_seed = factories.make_base(tmp_path / "seed", "llama", seed=5)
    assert scan_checkpoint(other_seed).layout_digest == a.layout_digest
    bf16 = factories.make_base(tmp_path / "bf16", "llama", dtype="bfloat16")
    assert scan_checkpoint(bf16).layout_digest != a.layout_digest

    first = bare_client.register_base(one, "org/tiny")
    second = bare_client.register_base(sharded, "org/tiny-sharded")
    assert second["created"] is False and second["weights_digest"] == first["weights_digest"]
    assert sorted(second["names"]) == ["org/tiny", "org/tiny-sharded"]


class CountingStore:
    """Wraps a BlobStore and records every byte range read, per digest."""

    def __init__(self, inner: Any):
        self.inner = inner
        self.reads: list[tuple[str, int, int]] = []

    def read_range(self, digest: str, start: int, end: int) -> bytes:
        self.reads.append((digest, start, end))
        return self.inner.read_range(digest, start, end)

    def open(self, digest: str, start: int = 0, end: int | None = None) -> Any:
        self.reads.append((digest, start, -1 if end is None else end))
        return self.inner.open(digest, start, end)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_validation_reads_adapter_header_and_base_layout_never_base_weights(
    bare_client: RegistryClient, registry: Any, tiny_llama: dict[str, Path]
) -> None:
    base = bare_client.register_base(tiny_llama["base"], factories.base_name("llama"), upload_weights=True)
    base_digests = {f["digest"] for f in base["files"]}
    counting = CountingStore(registry.store)
    registry.store = counting
    try:
        out = bare_client.push(tiny_llama["adapter"], "org/bot")
    finally:
        registry.store = counting.inner
    assert out["created"]
    assert not [r for r in counting.reads if r[0] in base_digests], "validation read base weights"
    st = next(f for f in out["files"] if f["path"] == "adapter_model.safetensors")
    header_reads = [r for r in counting.reads if r[0] == st["digest"] and r[1] < 8 + 100_000]
    assert header_reads and header_reads[0][:3] == (st["digest"], 0, 8)


def test_lookup_filters_sort_and_paginate(client: RegistryClient, adapter_dir: Path, tmp_path: Path, families: dict[str, dict[str, Path]]) -> None:
    for i, loss in enumerate([1.5, 0.9, 1.2]):
        client.push(variant(adapter_dir, tmp_path / f"v{i}", seed=i), f"org/a{i}", metrics={"eval_loss": loss})
    ranked = client.list_all(metric="eval_loss", order="asc")
    assert [i["metrics"]["eval_loss"] for i in ranked] == [0.9, 1.2, 1.5]
    page = client.list(metric="eval_loss", order="desc", limit=2)
    assert len(page["items"]) == 2 and page["next_cursor"]
    rest = client.list(metric="eval_loss", order="desc", limit=2, cursor=page["next_cursor"])
    assert [i["metrics"]["eval_loss"] for i in page["items"] + rest["items"]] == [1.5, 1.2, 0.9]
    assert client.list_all(target="q_proj", max_rank=8) and not client.list_all(target="c_attn")
    assert not client.list_all(min_rank=9)
    assert [i["name"] for i in client.list_all(q="a1")] == ["org/a1"]
    assert client.list_all(metric="eval_loss", metric_max=1.0)[0]["name"] == "org/a1"


def test_adapters_of_a_same_layout_base_are_listed_apart(bare_client: RegistryClient, tmp_path: Path, tiny_llama: dict[str, Path]) -> None:
    bare_client.register_base(tiny_llama["base"], factories.base_name("llama"))
    other = factories.make_base(tmp_path / "other", "llama", seed=7)
    bare_client.register_base(other, "org/llama-finetune")
    bare_client.push(tiny_llama["adapter"], "org/bot")
    items = bare_client.list_all(base="org/llama-finetune")
    assert [(i["name"], i["match"]) for i in items] == [("org/bot", "layout")]
    via_route = bare_client.get_json("/v1/base-models/org/llama-finetune/adapters")["items"]
    assert [(i["name"], i["match"]) for i in via_route] == [("org/bot", "layout")]


def test_check_is_a_local_dry_run(client: RegistryClient, adapter_dir: Path, registry: Any, tmp_path: Path) -> None:
    out = client.check(adapter_dir)
    assert out["valid"] and set(out["facts"]["targets"]) == {"q_proj", "v_proj"}
    assert version_count(registry) == 0
    bad = tmp_path / "bad"
    shutil.copytree(adapter_dir, bad)
    edit_config(bad, r=4)
    with pytest.raises(errors.RankMismatchError):
        client.check(bad)


def test_inspect_ranks_modules_from_small_factors(bare_client: RegistryClient, tiny_llama: dict[str, Path]) -> None:
    import torch

    bare_client.register_base(tiny_llama["base"], factories.base_name("llama"), upload_weights=True)
    bare_client.push(tiny_llama["adapter"], "org/bot")
    out = bare_client.get_json("/v1/adapters/org/bot/versions/1/inspect")
    mods = out["modules"]
    assert len(mods) == 4 and out["base_weights"] is True
    assert [m["delta_norm"] for m in mods] == sorted((m["delta_norm"] for m in mods), reverse=True)
    tensors = load_file(tiny_llama["adapter"] / "adapter_model.safetensors")
    base = load_file(tiny_llama["base"] / "model.safetensors")
    cfg = json.loads((tiny_llama["adapter"] / "adapter_config.json").read_text())
    for m in mods:
        a = torch.from_numpy(tensors[f"base_model.model.{m['module']}.lora_A.weight"]).double()
        b = torch.from_numpy(tensors[f"base_model.model.{m['module']}.lora_B.weight"]).double()
        delta = (cfg["lora_alpha"] / cfg["r"]) * (b @ a)
        assert m["delta_norm"] == pytest.approx(float(torch.linalg.matrix_norm(delta)), rel=1e-6)
        assert m["effective_rank"] == int(torch.linalg.matrix_rank(delta, rtol=0.01))
        w = torch.from_numpy(base[m["base_tensor"]]).double()
        assert m["relative_change"] == pytest.approx(float(torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(w)), rel=1e-5)


def test_nonfinite_values_are_found_without_the_upload_scan_too(client: RegistryClient, adapter_dir: Path, registry: Any, tmp_path: Path) -> None:
    """Blobs stored without an upload-time scan (older uploads) are scanned by reading them at commit."""
    from loreg.cli.client import sha256_file
    from loreg.registry.db.models import BlobScan

    def poison(key: str, t: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        b = t[key].copy()
        b.flat[3] = -np.inf
        t[key] = b
        return t

    folder = rewrite_tensor(adapter_dir, tmp_path / "inf", "lora_B", poison)
    files = []
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        path = folder / name
        digest = sha256_file(path)
        client.upload_blob(path, digest, path.stat().st_size, name="org/inf")
        files.append({"path": name, "size": path.stat().st_size, "digest": digest})
    with registry.sessions.begin() as s:
        assert s.query(BlobScan).count() == 1  # the safetensors file was scanned while uploaded
        s.query(BlobScan).delete()
    with pytest.raises(errors.NonFiniteValuesError) as info:
        client.request("POST", "/v1/adapters/org/inf/versions", json={"files": files})
    assert info.value.detail["problems"][0]["nonfinite"] == 1
    assert version_count(registry) == 0
