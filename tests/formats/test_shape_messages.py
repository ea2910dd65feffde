"""SHAPE_MISMATCH on real adapters trained for another hidden size: each key once with its expected
and found shapes, a message that only counts them, and a hint read from the pattern."""

from __future__ import annotations

from pathlib import Path

import pytest

from loreg.registry.errors import ShapeMismatchError
from loreg.registry.formats.validate import BaseLayout
from tests import factories
from tests.formats.test_validate import check, layout_of, load


@pytest.fixture(scope="module")
def wider(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Adapters trained on a tiny LLaMA of hidden size 64 (the registered one has 32)."""
    root = tmp_path_factory.mktemp("wider")
    base = factories.make_base(root / "base", "llama", hidden=64)
    return {
        "small": factories.make_base(root / "small", "llama"),
        "q_v": factories.make_adapter(root / "q_v", "llama", base_dir=base),
        "q_o": factories.make_adapter(root / "q_o", "llama", base_dir=base, target_modules=["q_proj", "o_proj"]),
    }


def refusal(adapter: Path, base: BaseLayout) -> ShapeMismatchError:
    with pytest.raises(ShapeMismatchError) as info:
        check(adapter, base)
    return info.value


def test_each_key_is_named_once_with_its_shapes_and_the_message_counts_them(wider: dict[str, Path]) -> None:
    err = refusal(wider["q_v"], layout_of(wider["small"]))
    _, header = load(wider["q_v"])
    problems = err.detail["problems"]
    assert err.message == f"{len(header.tensors)} adapter tensors do not fit the base's shapes"
    assert sorted(p["key"] for p in problems) == sorted(header.tensors)
    for p in problems:
        assert p["message"] == f"expected {p['expected']}, found {p['actual']}"
        assert list(header.tensors[p["key"]].shape) == p["actual"]
    q_a = next(p for p in problems if p["key"].endswith("layers.0.self_attn.q_proj.lora_A.weight"))
    assert (q_a["expected"], q_a["actual"]) == ([8, 32], [8, 64])


def test_one_hidden_size_throughout_says_so(wider: dict[str, Path]) -> None:
    err = refusal(wider["q_o"], layout_of(wider["small"]))
    assert err.hint == "every mismatch is hidden size 32 vs 64: trained for another base? pass --base"


def test_gqa_projections_still_point_at_the_hidden_size(wider: dict[str, Path]) -> None:
    # v_proj's output is kv_heads x head_dim (16 vs 32 here): the hidden size is the pair that explains it
    err = refusal(wider["q_v"], layout_of(wider["small"]))
    assert err.hint == "the adapter's shapes fit hidden size 64, the base's is 32: trained for another base? pass --base"
