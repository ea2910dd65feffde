"""`loreg diff REF REF [--json]` against a live server, both backends."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import factories
from tests.cli.test_cli import Loreg, loreg, ok, rest  # noqa: F401 - the fixtures, shared with test_cli


@pytest.fixture(scope="module")
def rank4(tmp_path_factory: pytest.TempPathFactory, tiny_llama: dict[str, Path]) -> Path:
    """r=4 on q_proj and k_proj: q_proj in common with the session adapter, v_proj removed, k_proj added."""
    root = tmp_path_factory.mktemp("cli-diff")
    return factories.make_adapter(root / "r4", "llama", base_dir=tiny_llama["base"], seed=2, r=4, lora_alpha=8,
                                  target_modules=["q_proj", "k_proj"])


def test_diff_json_is_the_api_answer(loreg: Loreg, rest: object, adapter_dir: Path, rank4: Path) -> None:
    ok(loreg("push", adapter_dir, "org/bot"))
    ok(loreg("push", rank4, "org/bot"))
    doc = ok(loreg("diff", "org/bot:1", "org/bot:latest", "--json")).json()
    api = rest.get("/v1/adapters/org/bot/versions/1/diff/org/bot:2").json()  # type: ignore[attr-defined]
    assert doc == api
    assert [m["module"] for m in doc["modules"]] == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    assert [(m["rank_a"], m["rank_b"]) for m in doc["modules"]] == [(8, 4), (8, 4)]
    assert doc["added"] == [f"model.layers.{i}.self_attn.k_proj" for i in range(2)]
    assert doc["removed"] == [f"model.layers.{i}.self_attn.v_proj" for i in range(2)]


def test_diff_prints_a_table_with_every_module_and_the_added_and_removed(loreg: Loreg, adapter_dir: Path, rank4: Path) -> None:
    ok(loreg("push", adapter_dir, "org/bot"))
    ok(loreg("push", rank4, "org/bot"))
    doc = ok(loreg("diff", "org/bot:1", "org/bot:2", "--json")).json()
    text = ok(loreg("diff", "org/bot:1", "org/bot:2")).stdout
    assert "org/bot:1 -> org/bot:2" in text
    for header in ("module", "rel change", "cosine", "φ_in", "φ_out"):
        assert header in text
    for m in doc["modules"]:
        row = next(line for line in text.splitlines() if m["module"] in line)
        for key in ("cosine", "similarity_in", "similarity_out"):
            assert f"{m[key]:.4f}" in row, (key, row)
        assert f"{m['relative_change']:.4g}" in row
    assert "added (only in the second): model.layers.0.self_attn.k_proj, model.layers.1.self_attn.k_proj" in text
    assert "removed (only in the first): model.layers.0.self_attn.v_proj, model.layers.1.self_attn.v_proj" in text


def test_diff_of_versions_on_different_bases_exits_1_with_the_code(
    loreg: Loreg, live_server: str, adapter_dir: Path, tmp_path: Path
) -> None:
    gpt2 = factories.make_base(tmp_path / "gpt2", "gpt2")
    ok(loreg("base", "register", gpt2, "--name", factories.base_name("gpt2")))
    ok(loreg("push", factories.make_adapter(tmp_path / "g", "gpt2", base_dir=gpt2), "org/g"))
    ok(loreg("push", adapter_dir, "org/bot"))
    run = loreg("diff", "org/bot:1", "org/g:1")
    assert run.code == 1 and run.stdout == ""
    assert "[BASE_MISMATCH]" in run.stderr and "loreg show" in run.stderr
    bad = loreg("diff", "org/bot:1", "../etc")
    assert bad.code != 0 and "NAME_INVALID" in bad.stderr
