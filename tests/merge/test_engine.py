"""The merge engine against PEFT's own merge_and_unload on tiny real models (PEFT_FORMAT.md §4-§5, DESIGN §4)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from loreg.registry.errors import MergeUnsupportedError, NonFiniteValuesError
from loreg.registry.formats.peft import parse_adapter_config
from loreg.registry.formats.safetensors import parse_header, read_header_from_file
from loreg.registry.formats.validate import base_layout_from_headers, validate_adapter
from loreg.registry.merge.engine import (
    INDEX_NAME,
    AdapterInput,
    BaseShard,
    OutputFile,
    merge_to_dir,
    plan_merge,
    write_index,
)
from tests import factories

REPO = Path(__file__).resolve().parents[2]

# (family, base, LoRA config overrides)
CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama-plain": ("llama", "llama", {}),
    "llama-all-linear": ("llama", "llama", {"target_modules": "all-linear"}),
    "llama-rslora": ("llama", "llama", {"use_rslora": True, "r": 4, "lora_alpha": 12}),
    "llama-rank-alpha-pattern": ("llama", "llama", {
        "target_modules": ["q_proj", "v_proj", "o_proj"],
        "rank_pattern": {"v_proj": 4, r"layers\.1\.self_attn\.q_proj": 2},
        "alpha_pattern": {"o_proj": 32, "v_proj": 3},
    }),
    "llama-dora": ("llama", "llama", {"use_dora": True, "target_modules": ["q_proj", "v_proj", "embed_tokens"]}),
    "llama-embedding": ("llama", "llama", {"target_modules": ["embed_tokens", "q_proj"]}),
    "llama-modules-to-save": ("llama", "llama", {"modules_to_save": ["lm_head"]}),
    "llama-trainable-tokens": ("llama", "llama", {"trainable_token_indices": [1, 5, 77]}),
    "gpt2-conv1d": ("gpt2", "gpt2", {"target_modules": ["c_attn", "c_proj", "c_fc"]}),
    "gpt2-dora": ("gpt2", "gpt2", {"target_modules": ["c_attn", "c_fc"], "use_dora": True}),
    "gpt2-tied-lm-head": ("gpt2", "gpt2", {"target_modules": ["c_attn", "lm_head"]}),
    "bert-bias-all-seq-cls": ("bert", "bert", {"bias": "all", "task_type": "SEQ_CLS"}),
    "bert-lora-bias": ("bert", "bert", {"target_modules": ["query", "value", "dense"], "lora_bias": True}),
    "vit-conv": ("vit", "vit", {"target_modules": ["q_proj", "v_proj", "projection"]}),
    "vit-conv-dora": ("vit", "vit", {"target_modules": ["projection", "q_proj"], "use_dora": True}),
}
BF16_CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama-bf16-embedding": ("llama", "llama-bf16", {"target_modules": ["q_proj", "v_proj", "embed_tokens"]}),
    "llama-bf16-dora": ("llama", "llama-bf16", {"target_modules": ["q_proj", "down_proj"], "use_dora": True}),
}

# Known warnings of PEFT / transformers while loading and merging the tiny models built here.
_QUIET = (
    r"fan_in_fan_out is set to (True|False) but the target module is",
    r"Model (has|with) `tie_word_embeddings=True` and (a tied layer is|the tied_target_modules=.*) part of the adapter",
    r"Already unmerged\. Nothing to do",
)


@contextmanager
def _quiet() -> Iterator[None]:
    with warnings.catch_warnings():
        for message in _QUIET:
            warnings.filterwarnings("ignore", message=message)
        yield


@dataclass
class Merged:
    base_dir: Path
    adapter_dirs: list[Path]
    out_dir: Path
    outputs: list[OutputFile]
    touched: frozenset[str]


def shards_of(base_dir: Path) -> list[BaseShard]:
    return [BaseShard(p.name, p, read_header_from_file(p)) for p in sorted(base_dir.glob("*.safetensors"))]


def adapter_input(base_dir: Path, adapter_dir: Path, weight: float = 1.0) -> AdapterInput:
    shards = shards_of(base_dir)
    layout = base_layout_from_headers([s.header for s in shards], json.loads((base_dir / "config.json").read_text()))
    config = parse_adapter_config((adapter_dir / "adapter_config.json").read_bytes())
    header = read_header_from_file(adapter_dir / "adapter_model.safetensors")
    report = validate_adapter(config, header, layout)
    return AdapterInput(config, header, adapter_dir / "adapter_model.safetensors", report, weight)


def merge(base_dir: Path, adapter_dirs: list[Path], out_dir: Path, weights: list[float] | None = None,
          **kwargs: Any) -> Merged:
    weights = weights or [1.0] * len(adapter_dirs)
    inputs = [adapter_input(base_dir, d, w) for d, w in zip(adapter_dirs, weights, strict=True)]
    shards = shards_of(base_dir)
    touched = plan_merge(shards, inputs, dtype=kwargs.get("dtype")).touched
    kwargs.setdefault("device", "cpu")
    outputs = merge_to_dir(shards, inputs, out_dir, **kwargs)
    shutil.copy(base_dir / "config.json", out_dir / "config.json")
    return Merged(base_dir, adapter_dirs, out_dir, outputs, touched)


def peft_merged(base_dir: Path, adapter_dir: Path, dtype: str | None = None) -> Any:
    from peft import PeftModel

    base = factories.load_base_model(base_dir, dtype=dtype)
    with _quiet():
        return PeftModel.from_pretrained(base, str(adapter_dir)).eval().merge_and_unload()


def load_merged(out_dir: Path) -> Any:
    return factories.load_base_model(out_dir)


def logits(model: Any, family: str) -> torch.Tensor:
    with torch.no_grad():
        if family == "vit":
            pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
            return model(pixel_values=pixels).logits
        ids = torch.tensor([[1, 5, 77, 9, 3, 2, 100, 64]])
        return model(input_ids=ids).logits


def tensor_bytes(path: Path) -> dict[str, bytes]:
    raw = path.read_bytes()
    header = parse_header(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    return {n: raw[header.data_offset + i.start : header.data_offset + i.end] for n, i in header.tensors.items()}


def sha256(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    _, exponent = torch.frexp(x.float())
    return torch.ldexp(torch.ones_like(x, dtype=torch.float32), exponent - 8).clamp_min(2.0**-126)


# ------------------------------------------------------------------------------------------------
# fixtures: every base and adapter is built once for the module


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("merge")


@pytest.fixture(scope="module")
def bases(root: Path) -> dict[str, Path]:
    out = {family: factories.make_base(root / f"base-{family}", family) for family in factories.FAMILIES}
    out["llama-bf16"] = factories.make_base(root / "base-llama-bf16", "llama", dtype="bfloat16")
    out["llama-sharded"] = factories.make_base(root / "base-llama-sharded", "llama", max_shard_size="24KB")
    return out


def _random_embedding_a(tensors: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    # PEFT initialises lora_embedding_A to zeros and make_adapter randomises only the B side: without this the
    # embedding delta would be zero and prove nothing
    gen = torch.Generator().manual_seed(seed)
    for key, value in tensors.items():
        if key.endswith(".lora_embedding_A") and not value.any():
            tensors[key] = torch.randn(value.shape, generator=gen, dtype=torch.float32).to(value.dtype)
    return tensors


class Cache:
    def __init__(self, root: Path, bases: dict[str, Path]):
        self.root, self.bases = root, bases
        self.adapters: dict[str, Path] = {}
        self.merged: dict[str, Merged] = {}

    def adapter(self, case: str, family: str, base: str, seed: int = 1, **kwargs: Any) -> Path:
        if case not in self.adapters:
            made = factories.make_adapter(
                self.root / f"made-{case}", family, base_dir=self.bases[base], seed=seed, **kwargs
            )
            self.adapters[case] = factories.edit_adapter(
                made, self.root / f"adapter-{case}", tensors=lambda t: _random_embedding_a(t, seed)
            )
        return self.adapters[case]

    def merge(self, case: str) -> Merged:
        if case not in self.merged:
            family, base, kwargs = {**CASES, **BF16_CASES}[case]
            adapter = self.adapter(case, family, base, **kwargs)
            self.merged[case] = merge(self.bases[base], [adapter], self.root / f"merged-{case}")
        return self.merged[case]


@pytest.fixture(scope="module")
def cache(root: Path, bases: dict[str, Path]) -> Cache:
    return Cache(root, bases)


# ------------------------------------------------------------------------------------------------
# one adapter: the same weights and logits as PEFT


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_equals_peft_merge_and_unload(cache: Cache, case: str) -> None:
    family = CASES[case][0]
    merged = cache.merge(case)
    reference = peft_merged(merged.base_dir, merged.adapter_dirs[0])
    ours = load_merged(merged.out_dir)
    ref_state, our_state = reference.state_dict(), ours.state_dict()
    assert ref_state.keys() == our_state.keys()
    for name, expected in ref_state.items():
        torch.testing.assert_close(our_state[name], expected, rtol=1e-6, atol=1e-8, msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(logits(ours, family), logits(reference, family), rtol=1e-5, atol=1e-6)
    assert merged.touched, "the adapter changed nothing"


@pytest.mark.parametrize("base", ["llama", "llama-bf16"])
def test_row_blocked_linear_merge_is_bit_identical_to_the_whole_tensor_merge(
    cache: Cache, root: Path, base: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CPU path merges big Linear weights in blocks of rows; on the tiny models the 64-row MLP
    weights take it only when the block is forced down to ROW_TAIL rows."""
    import loreg.registry.merge.ops as ops

    adapter = cache.adapter(f"rows-{base}", "llama", base, target_modules="all-linear")
    monkeypatch.setattr(ops, "ROW_BLOCK", 1)  # blocks of ROW_TAIL (32) rows: 2 blocks per MLP weight
    blocked = merge(cache.bases[base], [adapter], root / f"rows-blocked-{base}")
    monkeypatch.setattr(ops, "ROW_TAIL", 1 << 30)  # the whole-tensor path for every weight
    whole = merge(cache.bases[base], [adapter], root / f"rows-whole-{base}")
    assert blocked.touched == whole.touched and any("mlp" in t for t in blocked.touched)
    for a, b in zip(sorted(blocked.out_dir.glob("*.safetensors")), sorted(whole.out_dir.glob("*.safetensors"))):
        assert sha256(a) == sha256(b)


@pytest.mark.parametrize("case", sorted(CASES))
def test_only_touched_tensors_change_and_the_rest_is_copied_verbatim(cache: Cache, case: str) -> None:
    merged = cache.merge(case)
    for output in merged.outputs:
        base_file, out_file = merged.base_dir / output.name, merged.out_dir / output.name
        base_raw, out_raw = base_file.read_bytes(), out_file.read_bytes()
        n = int.from_bytes(base_raw[:8], "little")
        assert out_raw[: 8 + n] == base_raw[: 8 + n]
        assert (output.size, output.digest) == (len(out_raw), sha256(out_file))
        base_tensors, out_tensors = tensor_bytes(base_file), tensor_bytes(out_file)
        assert list(out_tensors) == list(base_tensors)
        changed = {name for name, data in base_tensors.items() if out_tensors[name] != data}
        assert changed == merged.touched & set(base_tensors)  # every adapter tensor here changes what it feeds
        assert output.changed == (out_raw != base_raw)


# ------------------------------------------------------------------------------------------------
# bf16 base


@pytest.mark.parametrize("case", sorted(BF16_CASES))
def test_bf16_base_is_within_one_ulp_of_the_float32_merge(cache: Cache, case: str) -> None:
    merged = cache.merge(case)
    reference32 = peft_merged(merged.base_dir, merged.adapter_dirs[0], dtype="float32").state_dict()
    reference16 = peft_merged(merged.base_dir, merged.adapter_dirs[0])
    ours = load_merged(merged.out_dir)
    our_state = ours.state_dict()
    for name, expected in reference32.items():
        got = our_state[name]
        assert got.dtype == torch.bfloat16
        error = (got.float() - expected).abs()
        assert bool((error <= bf16_ulp(expected)).all()), f"{name}: {error.max().item()}"
    # PEFT's own bf16 merge rounds once as well, except for embeddings: bf16(W + bf16(Δ)) (PEFT_FORMAT.md §5),
    # which is tens of ulps off where W and Δ cancel; the float32 comparison above covers those
    for name, expected in reference16.state_dict().items():
        if "embed_tokens" not in name:
            error = (our_state[name].float() - expected.float()).abs()
            assert bool((error <= bf16_ulp(expected)).all()), name
    torch.testing.assert_close(logits(ours, "llama"), logits(reference16, "llama"), rtol=0.02, atol=0.02)


# ------------------------------------------------------------------------------------------------
# several adapters


def test_two_adapters_merge_to_base_plus_weighted_deltas(cache: Cache, root: Path) -> None:
    base_dir = cache.bases["llama"]
    first = cache.adapter("weighted-1", "llama", "llama", seed=11,
                          target_modules=["q_proj", "v_proj", "embed_tokens"])
    second = cache.adapter("weighted-2", "llama", "llama", seed=12, r=4, use_rslora=True,
                           target_modules=["q_proj", "k_proj", "embed_tokens", "down_proj"])
    merged = merge(base_dir, [first, second], root / "merged-weighted", weights=[0.7, -0.3])

    base = factories.load_base_model(base_dir).state_dict()
    deltas = [
        {k: v.double() - base[k].double() for k, v in peft_merged(base_dir, d).state_dict().items()}
        for d in (first, second)
    ]
    ours = load_merged(merged.out_dir).state_dict()
    touched = 0
    for name, w in base.items():
        expected = w.double() + 0.7 * deltas[0][name] - 0.3 * deltas[1][name]
        torch.testing.assert_close(ours[name].double(), expected, rtol=1e-6, atol=1e-7, msg=name)
        touched += not torch.equal(ours[name], w)
    assert touched == len(merged.touched) == 2 + 2 + 1 + 2 + 2  # q x2, v x2, embed, k x2, down x2


def test_dora_cannot_be_combined_with_another_adapter(cache: Cache, root: Path) -> None:
    base_dir = cache.bases["llama"]
    dora = cache.adapter("llama-dora", *CASES["llama-dora"][:2], **CASES["llama-dora"][2])
    plain = cache.adapter("llama-plain", *CASES["llama-plain"][:2], **CASES["llama-plain"][2])
    out = root / "refused-dora"
    with pytest.raises(MergeUnsupportedError, match="DoRA"):
        merge(base_dir, [dora, plain], out)
    with pytest.raises(MergeUnsupportedError, match="DoRA"):
        merge(base_dir, [dora], out, weights=[0.5])
    assert not out.exists() or not any(out.iterdir())


def test_modules_to_save_needs_a_single_full_weight_adapter(cache: Cache, root: Path) -> None:
    base_dir = cache.bases["llama"]
    mts = cache.adapter("llama-modules-to-save", "llama", "llama", **CASES["llama-modules-to-save"][2])
    other = cache.adapter("mts-2", "llama", "llama", seed=5, modules_to_save=["lm_head"])
    out = root / "refused-mts"
    with pytest.raises(MergeUnsupportedError, match="lm_head.weight is replaced"):
        merge(base_dir, [mts, other], out)
    with pytest.raises(MergeUnsupportedError, match="weight is not 1.0"):
        merge(base_dir, [mts], out, weights=[2.0])
    assert not out.exists() or not any(out.iterdir())


def test_differing_base_layer_copies_fail_mid_merge_and_leave_nothing(cache: Cache, root: Path) -> None:
    base_dir = cache.bases["llama-sharded"]
    first = cache.adapter("lm-head-sharded", "llama", "llama-sharded", target_modules=["q_proj", "lm_head"])
    key = "base_model.model.lm_head.base_layer.weight"

    def perturb(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        tensors[key] = tensors[key] + 1.0
        return tensors

    second = factories.edit_adapter(first, root / "adapter-edited-base-layer", tensors=perturb)
    out = root / "refused-base-layer"
    out.mkdir()
    (out / "config.json").write_text("{}")
    calls: list[tuple[int, int, int, int]] = []
    with pytest.raises(MergeUnsupportedError, match="adapter 1: .* replaces lm_head.weight with different values"):
        merge(base_dir, [first, second], out, weights=[0.5, 0.5], progress=lambda *a: calls.append(a))
    assert calls[-1][0] > 0  # lm_head sits in the last shard: earlier shards were written, then removed
    assert [p.name for p in out.iterdir()] == ["config.json"]  # the caller's files stay, ours are gone


def test_adapter_validated_against_another_base_is_refused(cache: Cache, root: Path) -> None:
    gpt2 = cache.adapter("gpt2-conv1d", "gpt2", "gpt2", **CASES["gpt2-conv1d"][2])
    adapter = adapter_input(cache.bases["gpt2"], gpt2)
    out = root / "refused-layout"
    with pytest.raises(MergeUnsupportedError, match="not in the base shards"):
        merge_to_dir(shards_of(cache.bases["llama"]), [adapter], out, device="cpu")
    assert not out.exists()


def test_full_copy_through_tied_embeddings_is_refused(cache: Cache, root: Path) -> None:
    tied = cache.adapter("gpt2-mts-lm-head", "gpt2", "gpt2", modules_to_save=["lm_head"])
    with pytest.raises(MergeUnsupportedError, match="ties to transformer.wte.weight"):
        merge(cache.bases["gpt2"], [tied], root / "refused-tied")
    assert not (root / "refused-tied").exists()


def test_lora_b_bias_without_lora_bias_is_refused(cache: Cache, root: Path) -> None:
    src = cache.adapter("bert-lora-bias", "bert", "bert", **CASES["bert-lora-bias"][2])
    edited = factories.edit_adapter(src, root / "adapter-bias-flag-off", config={"lora_bias": False})
    with pytest.raises(MergeUnsupportedError, match="lora_bias is false"):
        merge(cache.bases["bert"], [edited], root / "refused-bias-flag")
    assert not (root / "refused-bias-flag").exists()


# ------------------------------------------------------------------------------------------------
# layout: shards, index, dtype change, progress


def test_sharded_base_keeps_its_split_and_untouched_shards_keep_their_digest(cache: Cache, root: Path) -> None:
    base_dir = cache.bases["llama-sharded"]
    adapter = cache.adapter("sharded", "llama", "llama-sharded", target_modules=["q_proj"], layers_to_transform=[1])
    merged = merge(base_dir, [adapter], root / "merged-sharded")
    base_files = sorted(p.name for p in base_dir.glob("*.safetensors"))
    assert len(base_files) >= 3
    assert [o.name for o in merged.outputs] == base_files
    unchanged = [o for o in merged.outputs if not o.changed]
    assert unchanged and len(unchanged) < len(merged.outputs)
    for output in merged.outputs:
        base_file = base_dir / output.name
        assert output.digest == sha256(merged.out_dir / output.name)
        assert (output.digest == sha256(base_file)) == (not output.changed)
        assert output.data_size == read_header_from_file(base_file).data_size

    index_raw = (base_dir / INDEX_NAME).read_bytes()
    index = write_index(merged.out_dir, merged.outputs, index_raw)
    assert (merged.out_dir / INDEX_NAME).read_bytes() == index_raw
    assert (index.digest, index.changed) == (sha256(base_dir / INDEX_NAME), False)

    reference = peft_merged(base_dir, adapter)
    ours = load_merged(merged.out_dir)
    torch.testing.assert_close(logits(ours, "llama"), logits(reference, "llama"), rtol=1e-5, atol=1e-6)


def test_dtype_change_writes_bf16_shards_that_transformers_loads(cache: Cache, root: Path) -> None:
    base_dir = cache.bases["llama-sharded"]
    adapter = cache.adapter("dtype", "llama", "llama-sharded", target_modules=["q_proj", "v_proj", "embed_tokens"])
    merged = merge(base_dir, [adapter], root / "merged-dtype", dtype="bfloat16")
    config = json.loads((merged.out_dir / "config.json").read_text())
    (merged.out_dir / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))  # as export does
    assert all(o.changed for o in merged.outputs)
    for output in merged.outputs:
        header = read_header_from_file(merged.out_dir / output.name)
        base_header = read_header_from_file(base_dir / output.name)
        assert {i.dtype for i in header.tensors.values()} == {"BF16"}
        assert [(n, i.shape) for n, i in header.tensors.items()] == [
            (n, i.shape) for n, i in base_header.tensors.items()
        ]
        assert header.metadata == base_header.metadata
        assert header.data_offset % 8 == 0 and output.data_size == header.data_size

    base_index = json.loads((base_dir / INDEX_NAME).read_text())
    write_index(merged.out_dir, merged.outputs, base_index)
    index = json.loads((merged.out_dir / INDEX_NAME).read_text())
    assert index["weight_map"] == base_index["weight_map"]
    assert index["metadata"]["total_size"] == base_index["metadata"]["total_size"] // 2

    reference = peft_merged(base_dir, adapter).state_dict()
    ours = load_merged(merged.out_dir)
    for name, value in ours.state_dict().items():
        assert value.dtype == torch.bfloat16
        assert torch.equal(value, reference[name].to(torch.bfloat16)), name  # one rounding of the float32 merge
    ref_logits = logits(peft_merged(base_dir, adapter), "llama")
    torch.testing.assert_close(logits(ours, "llama").float(), ref_logits, rtol=0.05, atol=0.05)


def test_progress_is_monotonic_and_ends_at_the_totals(cache: Cache, root: Path) -> None:
    base_dir = cache.bases["llama-sharded"]
    adapter = cache.adapter("sharded", "llama", "llama-sharded", target_modules=["q_proj"], layers_to_transform=[1])
    calls: list[tuple[int, int, int, int]] = []
    merged = merge(base_dir, [adapter], root / "merged-progress", progress=lambda *a: calls.append(a), device="auto")
    tensors_total = sum(len(read_header_from_file(p).tensors) for p in base_dir.glob("*.safetensors"))
    bytes_total = sum(o.size for o in merged.outputs)
    assert calls[0] == (0, tensors_total, 0, bytes_total)
    assert calls[-1] == (tensors_total, tensors_total, bytes_total, bytes_total)
    assert all(a[0] <= b[0] and a[2] <= b[2] for a, b in zip(calls, calls[1:]))


def test_plan_knows_every_output_header_before_reading_weights(cache: Cache) -> None:
    base_dir = cache.bases["llama-sharded"]
    adapter = adapter_input(base_dir, cache.adapter("sharded", "llama", "llama-sharded", target_modules=["q_proj"],
                                                    layers_to_transform=[1]))
    plan = plan_merge(shards_of(base_dir), [adapter], dtype="bf16")
    for planned in plan.files:
        header = parse_header(planned.header_bytes[8:])
        assert planned.size == header.file_size and planned.rebuilt
    assert plan.dtype == "BF16"
    assert plan.touched == {"model.layers.1.self_attn.q_proj.weight"}


def test_empty_shards_zero_size_and_integer_tensors_survive_a_dtype_change(root: Path) -> None:
    from safetensors.torch import save_file

    base_dir = root / "base-synthetic"
    base_dir.mkdir()
    tensors = {"a": torch.randn(4, 4), "ids": torch.arange(3), "empty": torch.zeros(0, 4)}
    save_file(tensors, base_dir / "one.safetensors", metadata={"format": "pt"})
    save_file({}, base_dir / "two.safetensors", metadata={"format": "pt", "note": "no tensors"})
    shards = shards_of(base_dir)

    same = merge_to_dir(shards, [], root / "synthetic-same", device="cpu")
    assert [(o.name, o.changed) for o in same] == [("one.safetensors", False), ("two.safetensors", False)]
    assert [o.digest for o in same] == [sha256(s.path) for s in shards]

    cast = merge_to_dir(shards, [], root / "synthetic-bf16", dtype="bf16", device="cpu")
    assert [o.changed for o in cast] == [True, False]  # nothing to cast in a shard without tensors
    out = load_file(root / "synthetic-bf16" / "one.safetensors")
    assert torch.equal(out["a"], tensors["a"].to(torch.bfloat16))
    assert torch.equal(out["ids"], tensors["ids"]) and out["empty"].shape == (0, 4)
    assert out["empty"].dtype == torch.bfloat16
    assert read_header_from_file(root / "synthetic-bf16" / "two.safetensors").metadata == {
        "format": "pt", "note": "no tensors"
    }

    with pytest.raises(MergeUnsupportedError, match="one of the merge's inputs"):
        merge_to_dir(shards, [], base_dir, device="cpu")
    assert [sha256(s.path) for s in shards] == [o.digest for o in same]


# ------------------------------------------------------------------------------------------------
# imports and the GPU check script


# ------------------------------------------------------------------------------------------------
# non-finite results (TESTPLAN B19): the job fails naming the tensor, never a model full of infinities


def _merge_path(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    import loreg.registry.merge.ops as ops

    if path == "whole":  # the whole-tensor path for every weight (CPU Linear weights take the row path by default)
        monkeypatch.setattr(ops, "ROW_TAIL", 1 << 30)
    else:
        monkeypatch.setattr(ops, "ROW_BLOCK", 1)  # several blocks of rows per weight


@pytest.mark.parametrize("path", ["rows", "whole"])
def test_merge_that_is_not_finite_in_float32_fails_naming_the_tensor_and_leaves_nothing(
    cache: Cache, root: Path, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _merge_path(monkeypatch, path)
    adapter = cache.adapter("finite-all-linear", "llama", "llama", target_modules="all-linear")
    out = root / f"refused-inf-{path}"
    message = r"the merged tensor model\.layers\.0\..*holds NaN or inf values in float32"
    with pytest.raises(NonFiniteValuesError, match=message) as err:
        merge(cache.bases["llama"], [adapter], out, weights=[1e300])
    assert err.value.detail["tensor"].endswith("_proj.weight")
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("path", ["rows", "whole"])
def test_merge_that_overflows_at_the_cast_to_float16_fails_and_float32_output_keeps_the_values(
    cache: Cache, root: Path, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _merge_path(monkeypatch, path)
    adapter = cache.adapter("finite-all-linear", "llama", "llama", target_modules="all-linear")
    out = root / f"refused-f16-{path}"
    with pytest.raises(NonFiniteValuesError, match="overflows F16: finite in float32, inf after the cast") as err:
        merge(cache.bases["llama"], [adapter], out, weights=[1e6], dtype="float16")
    assert err.value.detail["dtype"] == "F16" and err.value.detail["tensor"].endswith("_proj.weight")
    assert not out.exists() or not any(out.iterdir())
    wide = merge(cache.bases["llama"], [adapter], root / f"f32-{path}", weights=[1e6])  # float32 holds them
    merged = {}
    for p in wide.out_dir.glob("*.safetensors"):
        merged.update(load_file(p))
    largest = merged[err.value.detail["tensor"]].abs().max().item()
    assert 65504 < largest < float("inf")


def test_dtype_change_that_overflows_an_untouched_base_tensor_fails_naming_it(cache: Cache, root: Path) -> None:
    from safetensors.torch import save_file

    base_dir = root / "base-huge-norm"
    shutil.copytree(cache.bases["llama"], base_dir)
    for p in base_dir.glob("*.safetensors"):
        tensors = load_file(p)
        if "model.norm.weight" in tensors:
            tensors["model.norm.weight"] = tensors["model.norm.weight"] * 1e6
            save_file(tensors, p, metadata={"format": "pt"})
    adapter = cache.adapter("finite-q", "llama", "llama", target_modules=["q_proj"])
    out = root / "refused-norm-f16"
    with pytest.raises(NonFiniteValuesError, match=r"the base tensor model\.norm\.weight overflows F16"):
        merge(base_dir, [adapter], out, dtype="float16")
    assert not out.exists() or not any(out.iterdir())
    merge(base_dir, [adapter], root / "norm-bf16", dtype="bfloat16")  # bfloat16 has float32's range


def test_huge_but_finite_merged_values_pass_the_check_whose_sum_overflows(cache: Cache, root: Path) -> None:
    """The check sums each block first (cheap); a sum that overflows on finite values must not refuse them."""
    from safetensors.torch import save_file

    name = "model.layers.0.self_attn.q_proj.weight"
    base_dir = root / "base-huge-q"
    shutil.copytree(cache.bases["llama"], base_dir)
    for p in base_dir.glob("*.safetensors"):
        tensors = load_file(p)
        if name in tensors:
            tensors[name] = torch.full_like(tensors[name], 1e38)
            save_file(tensors, p, metadata={"format": "pt"})
    adapter = cache.adapter("finite-q", "llama", "llama", target_modules=["q_proj"])
    merged = merge(base_dir, [adapter], root / "huge-q-f32")
    out = {}
    for p in merged.out_dir.glob("*.safetensors"):
        out.update(load_file(p))
    assert name in merged.touched and torch.isfinite(out[name]).all() and out[name].min() > 9e37
    with pytest.raises(NonFiniteValuesError, match=f"{name} overflows F16"):
        merge(base_dir, [adapter], root / "huge-q-f16", dtype="float16")


def _run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=120,
                          cwd=REPO)


def test_importing_the_engine_does_not_import_torch() -> None:
    result = _run_python(
        "import sys, loreg.registry.merge.engine\n"
        "print(sorted(m for m in ('torch', 'transformers', 'peft', 'pydantic', 're2', 'fastapi', 'sqlalchemy')"
        " if m in sys.modules))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_gpu_check_script_runs_on_cpu_without_the_web_or_hf_stack() -> None:
    blocked = ("transformers", "peft", "fastapi", "sqlalchemy", "pydantic", "re2", "httpx", "boto3")
    code = (
        "import runpy, sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None\n"
        "sys.argv = ['check_merge_gpu.py', '--cpu-only']\n"
        "runpy.run_path('tests/gpu/check_merge_gpu.py', run_name='__main__')\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_merge_equals_cpu_merge(cache: Cache, root: Path) -> None:
    base_dir = cache.bases["llama-bf16"]
    family, base, kwargs = BF16_CASES["llama-bf16-dora"]
    adapter = adapter_input(base_dir, cache.adapter("llama-bf16-dora", family, base, **kwargs))
    cpu = merge_to_dir(shards_of(base_dir), [adapter], root / "cuda-cpu", device="cpu")
    gpu = merge_to_dir(shards_of(base_dir), [adapter], root / "cuda-gpu", device="cuda")
    assert [o.name for o in cpu] == [o.name for o in gpu]
    for output in cpu:
        a, b = load_file(root / "cuda-cpu" / output.name), load_file(root / "cuda-gpu" / output.name)
        for name, value in a.items():
            assert bool(((b[name].float() - value.float()).abs() <= bf16_ulp(value)).all()), name
