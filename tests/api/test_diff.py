"""GET /v1/adapters/{ns}/{name}/versions/{ref}/diff/{other}: per-module comparison of two versions.

Every number is checked against a direct numpy computation that forms ΔW the way PEFT merges it
(PEFT_FORMAT.md §4: transposed for Conv1D and embeddings) from the files the factories saved.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from safetensors.numpy import load_file

from loreg.cli.client import RegistryClient
from loreg.registry import errors
from tests import factories

PREFIX = "base_model.model."
SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_embedding_A": "A", ".lora_embedding_B": "B"}
TOL = 1e-6


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, tiny_llama: dict[str, Path]) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("diff")
    base = tiny_llama["base"]
    gpt2_base = factories.make_base(root / "gpt2-base", "gpt2")
    out = {
        "one": tiny_llama["adapter"],  # r=8 on q_proj, v_proj
        # r=4, alpha 8, rsLoRA, on q_proj and k_proj: v_proj removed, k_proj added
        "two": factories.make_adapter(root / "two", "llama", base_dir=base, seed=2, r=4, lora_alpha=8,
                                      use_rslora=True, target_modules=["q_proj", "k_proj"]),
        "embed1": factories.make_adapter(root / "e1", "llama", base_dir=base, seed=3, target_modules=["embed_tokens", "q_proj"]),
        "embed2": factories.make_adapter(root / "e2", "llama", base_dir=base, seed=4, r=6, target_modules=["embed_tokens", "q_proj"]),
        "gpt2_base": gpt2_base,
        "gpt2_1": factories.make_adapter(root / "g1", "gpt2", base_dir=gpt2_base, seed=5),
        "gpt2_2": factories.make_adapter(root / "g2", "gpt2", base_dir=gpt2_base, seed=6, r=4, lora_alpha=4),
    }
    out["left"] = orthogonal_half(tiny_llama["adapter"], root / "left", first_half=True)
    out["right"] = orthogonal_half(tiny_llama["adapter"], root / "right", first_half=False)
    return out


def orthogonal_half(src: Path, dest: Path, *, first_half: bool) -> Path:
    """A's rows only on one half of the input coordinates, B's columns only on one half of the output ones."""

    def keep_half(t: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for key, v in t.items():
            v = v.clone()
            axis = 1 if key.endswith("lora_A.weight") else 0
            n = v.shape[axis]
            lo, hi = (0, n // 2) if first_half else (n // 2, n)
            mask = [i for i in range(n) if not lo <= i < hi]
            if axis == 1:
                v[:, mask] = 0
            else:
                v[mask, :] = 0
            out[key] = v
        return out

    return factories.edit_adapter(src, dest, tensors=keep_half)


def thin_factors(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in load_file(folder / "adapter_model.safetensors").items():
        for suffix, kind in SUFFIXES.items():
            if key.endswith(suffix):
                pairs.setdefault(key[len(PREFIX): -len(suffix)], {})[kind] = value.astype(np.float64)
    scale = cfg["lora_alpha"] / (np.sqrt(cfg["r"]) if cfg.get("use_rslora") else cfg["r"])
    return {m: (p["A"], p["B"], scale) for m, p in pairs.items()}


def formed_delta(a: np.ndarray, b: np.ndarray, scale: float, transposed: bool) -> np.ndarray:
    """ΔW as PEFT adds it to the stored weight: [out, in] for Linear, [in, out] for Conv1D / embeddings."""
    delta = scale * (b @ a)
    return delta.T if transposed else delta


def phi(u1: np.ndarray, u2: np.ndarray, n: int) -> list[float]:
    return [float(np.linalg.norm(u1[:, :i].T @ u2[:, :i]) ** 2 / i) for i in range(1, n + 1)]


def expected(f1: Path, f2: Path, module: str, transposed: bool) -> dict[str, Any]:
    a1, b1, s1 = thin_factors(f1)[module]
    a2, b2, s2 = thin_factors(f2)[module]
    d1, d2 = formed_delta(a1, b1, s1, transposed), formed_delta(a2, b2, s2, transposed)
    u1, _, v1t = np.linalg.svd(d1)
    u2, _, v2t = np.linalg.svd(d2)
    # the layer's input side is the stored ΔW's column space when ΔW is stored transposed
    in1, in2 = (u1, u2) if transposed else (v1t.T, v2t.T)
    out1, out2 = (v1t.T, v2t.T) if transposed else (u1, u2)
    n = min(a1.shape[0], a2.shape[0])
    return {
        "relative_change": float(np.linalg.norm(d2 - d1) / np.linalg.norm(d1)),
        "cosine": float((d1 * d2).sum() / (np.linalg.norm(d1) * np.linalg.norm(d2))),
        "norm_a": float(np.linalg.norm(d1)),
        "norm_b": float(np.linalg.norm(d2)),
        "curve_in": phi(in1, in2, n),
        "curve_out": phi(out1, out2, n),
    }


def assert_matches(got: dict[str, Any], want: dict[str, Any]) -> None:
    for key in ("relative_change", "cosine", "norm_a", "norm_b"):
        assert got[key] == pytest.approx(want[key], abs=TOL, rel=TOL), (got["module"], key)
    for key in ("curve_in", "curve_out"):
        assert got[key] == pytest.approx(want[key], abs=TOL), (got["module"], key)
        assert got[key.replace("curve", "similarity")] == pytest.approx(want[key][-1], abs=TOL)


def diff(http: Any, first: str, second: str) -> Any:
    ns_name, _, tag = first.partition(":")
    return http.get(f"/v1/adapters/{ns_name}/versions/{tag}/diff/{second}")


def test_diff_equals_numpy_on_formed_deltas_across_ranks_with_added_and_removed(
    client: RegistryClient, folders: dict[str, Path]
) -> None:
    client.push(folders["one"], "org/bot")
    client.push(folders["two"], "org/bot")
    out = client.diff("org/bot:1", "org/bot:2")
    assert (out["first"]["version"], out["second"]["version"], out["base_match"]) == (1, 2, "weights")
    assert out["added"] == [f"model.layers.{i}.self_attn.k_proj" for i in range(2)]
    assert out["removed"] == [f"model.layers.{i}.self_attn.v_proj" for i in range(2)]
    assert [m["module"] for m in out["modules"]] == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    for m in out["modules"]:
        assert (m["rank_a"], m["rank_b"], m["layer_type"], m["dora"]) == (8, 4, "linear", False)
        assert len(m["curve_in"]) == 4
        assert_matches(m, expected(folders["one"], folders["two"], m["module"], transposed=False))
        assert 0 < m["similarity_in"] < 1 and 0 < m["similarity_out"] < 1


@pytest.mark.parametrize("pair", [("embed1", "embed2"), ("gpt2_1", "gpt2_2")])
def test_diff_of_transposed_layouts_equals_numpy(
    client: RegistryClient, folders: dict[str, Path], pair: tuple[str, str]
) -> None:
    """Embeddings and GPT-2 Conv1D store ΔW transposed: the input side is still lora_A's row space."""
    if pair[0].startswith("gpt2"):
        client.register_base(folders["gpt2_base"], factories.base_name("gpt2"))
    client.push(folders[pair[0]], "org/x")
    client.push(folders[pair[1]], "org/x")
    out = client.diff("org/x:1", "org/x:2")
    layers = {m["module"]: m["layer_type"] for m in out["modules"]}
    assert {"embedding", "conv1d"} & set(layers.values()), layers
    for m in out["modules"]:
        assert_matches(m, expected(folders[pair[0]], folders[pair[1]], m["module"], m["layer_type"] != "linear"))


def test_an_adapter_against_itself_has_similarity_one_and_no_change(client: RegistryClient, folders: dict[str, Path]) -> None:
    client.push(folders["one"], "org/a", aliases=["prod"])
    client.push(folders["one"], "team/b")  # the same bytes under another name
    for first, second in (("org/a:1", "org/a:prod"), ("org/a:1", "team/b:1")):
        out = client.diff(first, second)
        assert out["added"] == [] and out["removed"] == [] and len(out["modules"]) == 4
        for m in out["modules"]:
            assert m["relative_change"] == pytest.approx(0, abs=TOL)
            assert m["cosine"] == pytest.approx(1, abs=TOL)
            assert m["curve_in"] == pytest.approx([1.0] * 8, abs=TOL)
            assert m["curve_out"] == pytest.approx([1.0] * 8, abs=TOL)


def test_adapters_on_orthogonal_subspaces_have_similarity_zero(client: RegistryClient, folders: dict[str, Path]) -> None:
    client.push(folders["left"], "org/o")
    client.push(folders["right"], "org/o")
    out = client.diff("org/o:1", "org/o:2")
    assert len(out["modules"]) == 4
    for m in out["modules"]:
        assert m["similarity_in"] == pytest.approx(0, abs=TOL)
        assert m["similarity_out"] == pytest.approx(0, abs=TOL)
        assert max(m["curve_in"] + m["curve_out"]) == pytest.approx(0, abs=TOL)
        assert m["cosine"] == pytest.approx(0, abs=TOL)
        # orthogonal deltas: ||Δ2 − Δ1||² = ||Δ1||² + ||Δ2||²
        assert m["relative_change"] == pytest.approx(np.hypot(m["norm_a"], m["norm_b"]) / m["norm_a"], rel=TOL)
        assert_matches(m, expected(folders["left"], folders["right"], m["module"], transposed=False))


def test_versions_on_different_bases_are_refused(client: RegistryClient, folders: dict[str, Path], tiny_llama: dict[str, Path], tmp_path: Path) -> None:
    client.register_base(folders["gpt2_base"], factories.base_name("gpt2"))
    other_weights = factories.make_base(tmp_path / "llama-b", "llama", seed=7)
    client.register_base(other_weights, "loreg-test/tiny-llama-b")
    client.push(folders["one"], "org/l")
    client.push(folders["one"], "org/l2", base="loreg-test/tiny-llama-b")
    client.push(folders["gpt2_1"], "org/g")
    # other weights, same layout: comparable
    assert client.diff("org/l:1", "org/l2:1")["base_match"] == "layout"
    with pytest.raises(errors.BaseMismatchError) as info:
        client.diff("org/l:1", "org/g:1")
    assert info.value.status == 422
    assert info.value.detail["first"]["name"] == "org/l" and info.value.detail["second"]["name"] == "org/g"
    assert "loreg show" in (info.value.hint or "") and "same base" in str(info.value)


def test_diff_answers_like_every_read_for_tokens_and_missing_versions(
    app: Any, api: TestClient, client: RegistryClient, folders: dict[str, Path], make_token: Any
) -> None:
    client.push(folders["one"], "team-a/x")
    client.push(folders["two"], "team-b/x")
    team_a = make_token("read", ["team-a/*"])
    with TestClient(app, raise_server_exceptions=False, headers={"Authorization": f"Bearer {team_a}"}) as http:
        for first, second in (("team-a/x:1", "team-b/x:1"), ("team-b/x:1", "team-a/x:1"), ("team-a/x:1", "team-b/ghost:1")):
            resp = diff(http, first, second)
            assert resp.status_code == 403, (first, second, resp.text)
            assert resp.json()["errors"][0]["code"] == "DENIED"
        assert diff(http, "team-a/x:1", "team-a/x:latest").status_code == 200
    cases = {
        ("team-a/x:1", "team-a/x:9"): (404, "VERSION_NOT_FOUND"),
        ("team-a/x:1", "team-a/nope:1"): (404, "ADAPTER_NOT_FOUND"),
        ("team-a/x:9", "team-b/x:1"): (404, "VERSION_NOT_FOUND"),
        ("team-a/x:1", "team-a/x:nope"): (404, "ALIAS_NOT_FOUND"),
        # percent-encoded, so that the HTTP client does not fold the dots away first
        ("team-a/x:1", "..%2F..%2Fetc%2Fpasswd"): (400, "NAME_INVALID"),
        ("team-a/x:1", "team-a/x:1%2F..%2F2"): (400, "VERSION_INVALID"),
        ("team-a/x:1", "Team-A/x:1"): (400, "NAME_INVALID"),
        ("team-a/x:1", "team-a/x@sha256:12"): (400, "REFERENCE_INVALID"),
    }
    for (first, second), (status, code) in cases.items():
        resp = diff(api, first, second)
        assert (resp.status_code, resp.json()["errors"][0]["code"]) == (status, code), (second, resp.text)
    assert api.get("/v1/adapters/team-a/x/versions/1/diff/team-a/x:1").json()["modules"]
    anon = TestClient(app, raise_server_exceptions=False).get("/v1/adapters/team-a/x/versions/1/diff/team-a/x:1")
    assert anon.status_code == 401
