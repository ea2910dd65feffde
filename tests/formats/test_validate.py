"""Adapters against base layouts from safetensors headers (B9, B12, DESIGN §4 Validation)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from loreg.registry.errors import (
    AdapterInvalidError,
    ConfigInvalidError,
    DtypeUnsupportedError,
    DuplicateKeyError,
    EmptyTensorError,
    LoregError,
    RankMismatchError,
    ShapeMismatchError,
    UnknownModuleError,
)
from loreg.registry.formats.fingerprint import canonical_json
from loreg.registry.formats.peft import AdapterConfig, parse_adapter_config
from loreg.registry.formats.safetensors import Header, read_header_from_file
from loreg.registry.formats.validate import (
    BaseLayout,
    ValidationReport,
    base_layout_from_headers,
    describe_adapter,
    validate_adapter,
)
from tests import factories

Bases = dict[str, Path]
Layouts = dict[str, BaseLayout]

P = "base_model.model."
Q0 = "model.layers.0.self_attn.q_proj"


def layout_of(base_dir: Path) -> BaseLayout:
    headers = [read_header_from_file(p) for p in sorted(base_dir.glob("*.safetensors"))]
    return base_layout_from_headers(headers, json.loads((base_dir / "config.json").read_text()))


def load(adapter_dir: Path) -> tuple[AdapterConfig, Header]:
    config = parse_adapter_config((adapter_dir / "adapter_config.json").read_bytes())
    return config, read_header_from_file(adapter_dir / "adapter_model.safetensors")


def check(adapter_dir: Path, base: BaseLayout, **kwargs: Any) -> ValidationReport:
    config, header = load(adapter_dir)
    return validate_adapter(config, header, base, **kwargs)


def refused(adapter_dir: Path, base: BaseLayout, error: type[LoregError]) -> list[dict[str, Any]]:
    with pytest.raises(error) as info:
        check(adapter_dir, base)
    assert info.value.status == 422
    problems = info.value.detail["problems"]
    assert problems and info.value.detail["problem_count"] == len(problems)
    assert problems[0]["code"] == info.value.code or error is AdapterInvalidError
    return problems


def codes(report: ValidationReport) -> set[str]:
    return {w["code"] for w in report.warnings}


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> Bases:
    root = tmp_path_factory.mktemp("bases")
    return {family: factories.make_base(root / family, family) for family in factories.FAMILIES}


@pytest.fixture(scope="module")
def layouts(bases: Bases) -> Layouts:
    return {family: layout_of(path) for family, path in bases.items()}


@pytest.fixture(scope="module")
def llama_adapter(tmp_path_factory: pytest.TempPathFactory, bases: Bases) -> Path:
    return factories.make_adapter(tmp_path_factory.mktemp("ad") / "llama", "llama", base_dir=bases["llama"])


def edit(src: Path, dest: Path, tensors: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
         config: dict[str, Any] | None = None) -> Path:
    return factories.edit_adapter(src, dest, tensors=tensors, config=config)


def rename_keys(old: str, new: str) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    return lambda t: {k.replace(old, new): v for k, v in t.items()}


# -- good adapters --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", factories.FAMILIES)
def test_good_adapter_validates_against_its_base(
    tmp_path: Path, bases: Bases, layouts: Layouts, family: str
) -> None:
    adapter = factories.make_adapter(tmp_path / "ad", family, base_dir=bases[family])
    report = check(adapter, layouts[family], base_name=factories.base_name(family))
    _, header = load(adapter)
    assert set(report.key_map) == set(header.tensors)
    assert all(name in layouts[family].tensors for name in report.mapping.values())
    assert set(report.mapping) == set(report.facts.modules)
    assert report.facts.ranks == [8] and report.facts.r == 8
    assert all(s == 2.0 for s in report.scalings.values())
    assert report.serving["vllm"]["loads"] is True
    assert report.warnings == []
    canonical_json(report.to_dict())  # JSON-able, finite


def test_vit_adapter_in_transformers_5_names_maps_to_checkpoint_names(
    tmp_path: Path, bases: Bases, layouts: Layouts
) -> None:
    adapter = factories.make_adapter(tmp_path / "ad", "vit", base_dir=bases["vit"], target_modules=["q_proj", "v_proj"])
    report = check(adapter, layouts["vit"])
    assert report.variant == "as-is+renamed"
    assert report.mapping["vit.layers.1.attention.v_proj"] == "vit.encoder.layer.1.attention.attention.value.weight"


def test_vit_adapter_in_checkpoint_names_maps_as_is(
    tmp_path: Path, bases: Bases, layouts: Layouts
) -> None:
    # what PEFT on transformers 4 wrote for the same modules
    adapter = factories.make_adapter(tmp_path / "ad", "vit", base_dir=bases["vit"])
    old = edit(adapter, tmp_path / "old", lambda t: {
        k.replace("vit.layers.", "vit.encoder.layer.").replace("attention.q_proj", "attention.attention.query")
        .replace("attention.v_proj", "attention.attention.value"): v for k, v in t.items()
    }, config={"target_modules": ["query", "value"]})
    report = check(old, layouts["vit"])
    assert report.variant == "as-is"
    assert "vit.encoder.layer.0.attention.attention.query" in report.mapping


def test_gpt2_conv1d_layers_are_decided_by_architecture(
    tmp_path: Path, bases: Bases, layouts: Layouts
) -> None:
    adapter = factories.make_adapter(
        tmp_path / "ad", "gpt2", base_dir=bases["gpt2"], target_modules=["c_attn", "c_proj", "c_fc"]
    )
    report = check(adapter, layouts["gpt2"])
    assert set(report.layer_types.values()) == {"conv1d"}
    # attn.c_proj is square: only the architecture tells it is Conv1D; a wrong flag does not change that
    wrong_flag = edit(adapter, tmp_path / "flag", config={"fan_in_fan_out": False})
    report = check(wrong_flag, layouts["gpt2"])
    assert report.layer_types["transformer.h.0.attn.c_proj"] == "conv1d"
    assert "FAN_IN_FAN_OUT_IGNORED" in codes(report)


def test_gpt2_adapter_transposed_like_linear_is_refused(
    tmp_path: Path, bases: Bases, layouts: Layouts
) -> None:
    adapter = factories.make_adapter(tmp_path / "ad", "gpt2", base_dir=bases["gpt2"], target_modules=["c_fc"])
    # A written as if c_fc were nn.Linear [out=128, in=32]: in_features 128
    bad = edit(adapter, tmp_path / "bad", lambda t: {
        k: (torch.zeros(8, 128) if k.endswith("h.0.mlp.c_fc.lora_A.weight") else v) for k, v in t.items()
    })
    problems = refused(bad, layouts["gpt2"], ShapeMismatchError)
    assert problems[0]["key"] == P + "transformer.h.0.mlp.c_fc.lora_A.weight"
    assert (problems[0]["expected"], problems[0]["actual"]) == ([8, 32], [8, 128])


def test_embedding_targets_validate(tmp_path: Path, bases: Bases, layouts: Layouts) -> None:
    adapter = factories.make_adapter(
        tmp_path / "ad", "llama", base_dir=bases["llama"], target_modules=["embed_tokens", "lm_head", "q_proj"]
    )
    report = check(adapter, layouts["llama"])
    assert report.layer_types["model.embed_tokens"] == "embedding"
    assert report.layer_types["lm_head"] == "linear"
    assert report.key_map[P + "model.embed_tokens.base_layer.weight"] == "model.embed_tokens.weight"
    assert report.facts.has_embedding


def test_gpt2_embedding_and_tied_lm_head(tmp_path: Path, bases: Bases, layouts: Layouts) -> None:
    wte = factories.make_adapter(tmp_path / "wte", "gpt2", base_dir=bases["gpt2"], target_modules=["wte"])
    assert check(wte, layouts["gpt2"]).layer_types == {"transformer.wte": "embedding"}
    head = factories.make_adapter(tmp_path / "head", "gpt2", base_dir=bases["gpt2"], target_modules=["lm_head"])
    assert "lm_head.weight" not in layouts["gpt2"].tensors
    report = check(head, layouts["gpt2"])
    assert report.mapping == {"lm_head": "transformer.wte.weight"}
    assert report.layer_types == {"lm_head": "linear"}
    assert "TIED_REDIRECT" in codes(report)


def test_dora_validates_and_is_not_served_by_vllm(
    tmp_path: Path, bases: Bases, layouts: Layouts
) -> None:
    adapter = factories.make_adapter(tmp_path / "ad", "llama", base_dir=bases["llama"], use_dora=True)
    report = check(adapter, layouts["llama"])
    assert report.facts.use_dora
    assert report.key_map[P + Q0 + ".lora_magnitude_vector"] == Q0 + ".weight"
    assert report.serving["vllm"]["loads"] is False
    assert any("DoRA" in r for r in report.serving["vllm"]["reasons"])
    assert "SERVING_UNSUPPORTED" in codes(report)


def test_dora_on_conv_and_conv1d(tmp_path: Path, bases: Bases, layouts: Layouts) -> None:
    vit = factories.make_adapter(
        tmp_path / "vit", "vit", base_dir=bases["vit"], target_modules=["projection", "q_proj"], use_dora=True
    )
    report = check(vit, layouts["vit"])
    assert report.layer_types["vit.embeddings.patch_embeddings.projection"] == "conv"
    _, header = load(vit)
    assert header.tensors[P + "vit.embeddings.patch_embeddings.projection.lora_magnitude_vector"].shape == (1, 32, 1, 1)
    gpt2 = factories.make_adapter(
        tmp_path / "gpt2", "gpt2", base_dir=bases["gpt2"], target_modules=["c_fc"], use_dora=True
    )
    assert set(check(gpt2, layouts["gpt2"]).layer_types.values()) == {"conv1d"}


def test_rank_and_alpha_patterns_validate(tmp_path: Path, bases: Bases, layouts: Layouts) -> None:
    adapter = factories.make_adapter(
        tmp_path / "ad", "llama", base_dir=bases["llama"], target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={r"layers\.1\.self_attn\.v_proj": 4, "down_proj": 32}, alpha_pattern={"q_proj": 3.5},
    )
    report = check(adapter, layouts["llama"])
    assert report.facts.ranks == [4, 8, 32]
    assert report.scalings["model.layers.1.self_attn.v_proj"] == 16 / 4
    assert report.scalings[Q0] == 3.5 / 8
    assert report.scalings["model.layers.0.mlp.down_proj"] == 16 / 32
    assert report.serving["vllm"]["loads"] is False
    assert report.serving["vllm"]["max_lora_rank"] == 32


def test_modules_to_save_bias_and_trainable_tokens_validate(
    tmp_path: Path, bases: Bases, layouts: Layouts
) -> None:
    mts = factories.make_adapter(tmp_path / "mts", "llama", base_dir=bases["llama"], modules_to_save=["lm_head"])
    report = check(mts, layouts["llama"])
    assert report.key_map[P + "lm_head.weight"] == "lm_head.weight"
    assert report.facts.modules_to_save == ["lm_head"]
    assert any("modules_to_save" in r for r in report.serving["vllm"]["reasons"])

    cls = factories.make_adapter(tmp_path / "cls", "bert", base_dir=bases["bert"], bias="all", task_type="SEQ_CLS")
    report = check(cls, layouts["bert"])
    assert report.key_map[P + "classifier.original_module.bias"] is None
    assert report.key_map[P + "classifier.modules_to_save.bias"] == "classifier.bias"
    assert report.key_map[P + "bert.encoder.layer.0.attention.self.query.base_layer.bias"] == (
        "bert.encoder.layer.0.attention.self.query.bias"
    )
    assert report.facts.has_bias and report.facts.modules_to_save == ["classifier"]

    vit = factories.make_adapter(tmp_path / "vit", "vit", base_dir=bases["vit"], modules_to_save=["classifier"])
    assert check(vit, layouts["vit"]).key_map[P + "classifier.weight"] == "classifier.weight"

    lora_bias = factories.make_adapter(tmp_path / "lb", "bert", base_dir=bases["bert"], lora_bias=True)
    report = check(lora_bias, layouts["bert"])
    assert report.key_map[P + "bert.encoder.layer.1.attention.self.value.lora_B.bias"] == (
        "bert.encoder.layer.1.attention.self.value.bias"
    )

    tt = factories.make_adapter(tmp_path / "tt", "llama", base_dir=bases["llama"], trainable_token_indices=[1, 5, 7])
    report = check(tt, layouts["llama"])
    assert report.key_map[P + "model.embed_tokens.token_adapter.trainable_tokens_delta"] == "model.embed_tokens.weight"
    assert report.facts.has_trainable_tokens


def test_headless_adapter_and_sharded_bf16_base(tmp_path: Path, bases: Bases) -> None:
    sharded = factories.make_base(tmp_path / "sharded", "llama", dtype="bfloat16", max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    layout = layout_of(sharded)
    assert {d for d, _ in layout.tensors.values()} == {"BF16"}
    assert {n: s for n, (_, s) in layout.tensors.items()} == {
        n: s for n, (_, s) in layout_of(bases["llama"]).tensors.items()
    }
    headless = factories.make_adapter(tmp_path / "headless", "llama", headless=True)
    report = check(headless, layout)
    assert report.variant == "add:model"
    assert report.mapping["layers.0.self_attn.q_proj"] == "model.layers.0.self_attn.q_proj.weight"
    unprefixed = edit(headless, tmp_path / "unprefixed", rename_keys(P, ""))
    assert check(unprefixed, layout).variant == "add:model"


# -- bad adapters (B12) ------------------------------------------------------------------------------


def test_adapter_of_another_architecture_is_refused(
    tmp_path: Path, bases: Bases, layouts: Layouts
) -> None:
    bert = factories.make_adapter(tmp_path / "bert", "bert", base_dir=bases["bert"])
    problems = refused(bert, layouts["llama"], UnknownModuleError)
    _, header = load(bert)
    assert {p["key"] for p in problems} == set(header.tensors)
    assert {p["code"] for p in problems} == {"UNKNOWN_MODULE"}


def test_in_features_off_by_one_is_a_shape_mismatch(
    tmp_path: Path, llama_adapter: Path, layouts: Layouts
) -> None:
    key = P + Q0 + ".lora_A.weight"
    bad = edit(llama_adapter, tmp_path / "bad", lambda t: {**t, key: torch.zeros(8, 33)})
    problems = refused(bad, layouts["llama"], ShapeMismatchError)
    assert problems == [{
        "key": key, "code": "SHAPE_MISMATCH", "expected": [8, 32], "actual": [8, 33], "message": problems[0]["message"],
    }]


def test_a_and_b_ranks_differ(tmp_path: Path, llama_adapter: Path, layouts: Layouts) -> None:
    key = P + Q0 + ".lora_B.weight"
    bad = edit(llama_adapter, tmp_path / "bad", lambda t: {**t, key: torch.zeros(32, 16)})
    problems = refused(bad, layouts["llama"], RankMismatchError)
    assert [(p["key"], p["expected"], p["actual"]) for p in problems] == [(key, [8], [16])]


def test_tensor_rank_differs_from_config_r(tmp_path: Path, llama_adapter: Path, layouts: Layouts) -> None:
    bad = edit(llama_adapter, tmp_path / "bad", config={"r": 16})
    problems = refused(bad, layouts["llama"], RankMismatchError)
    _, header = load(bad)
    assert {p["key"] for p in problems} == set(header.tensors)
    assert all((p["expected"], p["actual"]) == ([16], [8]) for p in problems)


def test_rank_pattern_disagreeing_with_tensors(tmp_path: Path, llama_adapter: Path, layouts: Layouts) -> None:
    bad = edit(llama_adapter, tmp_path / "bad", config={"rank_pattern": {r"layers\.1\.self_attn\.v_proj": 4}})
    problems = refused(bad, layouts["llama"], RankMismatchError)
    assert {p["key"] for p in problems} == {
        P + "model.layers.1.self_attn.v_proj.lora_A.weight", P + "model.layers.1.self_attn.v_proj.lora_B.weight"
    }
    assert "rank_pattern" in problems[0]["message"]


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("layers.1.self_attn.v_proj", "layers.1.self_attn.x_proj"),  # module absent from the base
        ("layers.1.self_attn.v_proj", "layers.99.self_attn.v_proj"),  # layer index beyond the base
    ],
)
def test_module_absent_from_base_is_unknown(
    tmp_path: Path, llama_adapter: Path, layouts: Layouts, old: str, new: str
) -> None:
    bad = edit(llama_adapter, tmp_path / "bad", rename_keys(old, new))
    problems = refused(bad, layouts["llama"], UnknownModuleError)
    assert {p["key"] for p in problems} == {f"{P}model.{new}.lora_A.weight", f"{P}model.{new}.lora_B.weight"}


def test_missing_lora_b(tmp_path: Path, llama_adapter: Path, layouts: Layouts) -> None:
    key = P + Q0 + ".lora_B.weight"
    bad = edit(llama_adapter, tmp_path / "bad", lambda t: {k: v for k, v in t.items() if k != key})
    problems = refused(bad, layouts["llama"], AdapterInvalidError)
    assert [(p["key"], p["code"]) for p in problems] == [(key, "MISSING_TENSOR")]


def test_every_problem_is_listed_and_the_first_decides_the_class(
    tmp_path: Path, llama_adapter: Path, layouts: Layouts
) -> None:
    shape_key = P + Q0 + ".lora_A.weight"
    bad = edit(llama_adapter, tmp_path / "bad", lambda t: {
        **rename_keys("layers.1.", "layers.7.")(t), shape_key: torch.zeros(8, 31)
    })
    problems = refused(bad, layouts["llama"], UnknownModuleError)
    assert [p["code"] for p in problems] == ["UNKNOWN_MODULE"] * 4 + ["SHAPE_MISMATCH"]
    assert problems[-1]["key"] == shape_key


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_non_float_lora_tensor_is_refused(
    tmp_path: Path, llama_adapter: Path, layouts: Layouts, dtype: torch.dtype
) -> None:
    key = P + Q0 + ".lora_A.weight"
    bad = edit(llama_adapter, tmp_path / "bad", lambda t: {**t, key: torch.zeros(8, 32, dtype=dtype)})
    problems = refused(bad, layouts["llama"], DtypeUnsupportedError)
    assert (problems[0]["key"], problems[0]["code"]) == (key, "DTYPE_UNSUPPORTED")


def test_zero_element_tensor_is_refused(tmp_path: Path, llama_adapter: Path, layouts: Layouts) -> None:
    a, b = P + Q0 + ".lora_A.weight", P + Q0 + ".lora_B.weight"
    bad = edit(llama_adapter, tmp_path / "bad", lambda t: {**t, a: torch.zeros(0, 32), b: torch.zeros(32, 0)})
    problems = refused(bad, layouts["llama"], EmptyTensorError)
    assert [(p["key"], p["actual"]) for p in problems[:2]] == [(a, [0, 32]), (b, [32, 0])]


def test_unknown_key_suffix_is_refused(tmp_path: Path, llama_adapter: Path, layouts: Layouts) -> None:
    key = P + Q0 + ".lora_A.default.weight"
    bad = edit(llama_adapter, tmp_path / "bad", rename_keys(Q0 + ".lora_A.weight", Q0 + ".lora_A.default.weight"))
    problems = refused(bad, layouts["llama"], AdapterInvalidError)
    assert (problems[0]["key"], problems[0]["code"]) == (key, "UNKNOWN_KEY")


def test_lora_b_bias_needs_a_base_bias(tmp_path: Path, llama_adapter: Path, layouts: Layouts) -> None:
    key = P + Q0 + ".lora_B.bias"
    bad = edit(llama_adapter, tmp_path / "bad", lambda t: {**t, key: torch.zeros(32)}, config={"lora_bias": True})
    problems = refused(bad, layouts["llama"], AdapterInvalidError)
    assert [(p["key"], p["code"]) for p in problems] == [(key, "BASE_BIAS_MISSING")]


def test_modules_to_save_shape_must_equal_the_base(
    tmp_path: Path, bases: Bases, layouts: Layouts
) -> None:
    adapter = factories.make_adapter(tmp_path / "ad", "vit", base_dir=bases["vit"], modules_to_save=["classifier"])
    key = P + "classifier.weight"
    bad = edit(adapter, tmp_path / "bad", lambda t: {**t, key: torch.zeros(3, 32)})  # 3 labels, base has 2
    problems = refused(bad, layouts["vit"], ShapeMismatchError)
    assert [(p["key"], p["expected"], p["actual"]) for p in problems] == [(key, [2, 32], [3, 32])]


def test_dora_magnitude_missing_or_misshapen(tmp_path: Path, bases: Bases, layouts: Layouts) -> None:
    adapter = factories.make_adapter(tmp_path / "ad", "llama", base_dir=bases["llama"], use_dora=True)
    key = P + Q0 + ".lora_magnitude_vector"
    missing = edit(adapter, tmp_path / "missing", lambda t: {k: v for k, v in t.items() if k != key})
    assert [(p["key"], p["code"]) for p in refused(missing, layouts["llama"], AdapterInvalidError)] == [
        (key, "MISSING_TENSOR")
    ]
    wrong = edit(adapter, tmp_path / "wrong", lambda t: {**t, key: torch.ones(16)})
    problems = refused(wrong, layouts["llama"], ShapeMismatchError)
    assert [(p["key"], p["expected"], p["actual"]) for p in problems] == [(key, [32], [16])]


def test_dora_factors_on_a_base_weight_without_an_output_axis_are_a_shape_mismatch(
    tmp_path: Path, bases: Bases, layouts: Layouts
) -> None:
    # embedding factors on the 1-D model.norm.weight: the magnitude's shape cannot be read off W (was an IndexError)
    adapter = factories.make_adapter(tmp_path / "ad", "llama", base_dir=bases["llama"], use_dora=True)
    norm = P + "model.norm"
    bad = edit(adapter, tmp_path / "bad", lambda t: {
        **t, norm + ".lora_embedding_A": torch.ones(8, 32), norm + ".lora_embedding_B": torch.ones(32, 8),
        norm + ".lora_magnitude_vector": torch.ones(32),
    })
    problems = refused(bad, layouts["llama"], ShapeMismatchError)
    assert [(p["key"], p["code"]) for p in problems] == [(norm + ".lora_embedding_A", "SHAPE_MISMATCH")]
    assert "a embedding LoRA, but base model.norm.weight is [32]" in problems[0]["message"]


def test_trainable_token_index_beyond_vocab(tmp_path: Path, bases: Bases, layouts: Layouts) -> None:
    adapter = factories.make_adapter(
        tmp_path / "ad", "llama", base_dir=bases["llama"], trainable_token_indices=[1, 5, 7]
    )
    bad = edit(adapter, tmp_path / "bad", config={"trainable_token_indices": [1, 5, 500]})
    problems = refused(bad, layouts["llama"], AdapterInvalidError)
    assert [(p["code"], p["actual"]) for p in problems] == [("INDEX_OUT_OF_RANGE", [500])]


def test_target_parameters_are_not_supported_yet(tmp_path: Path, llama_adapter: Path, layouts: Layouts) -> None:
    bad = edit(llama_adapter, tmp_path / "bad", config={"target_parameters": ["mlp.experts.gate_up_proj"]})
    assert refused(bad, layouts["llama"], AdapterInvalidError)[0]["code"] == "UNSUPPORTED"


# -- warnings, facts, serving -------------------------------------------------------------------------


def test_target_module_matching_nothing_in_the_base_is_a_warning(
    tmp_path: Path, llama_adapter: Path, layouts: Layouts
) -> None:
    adapter = edit(llama_adapter, tmp_path / "ad", config={"target_modules": ["q_proj", "v_proj", "not_a_module"]})
    warnings = [w for w in check(adapter, layouts["llama"]).warnings if w["code"] == "TARGET_MODULE_UNUSED"]
    assert [w["target"] for w in warnings] == ["not_a_module"]


# -- target_modules as PEFT evaluates them (TESTPLAN B18) ------------------------------------------


LLAMA_QV = sorted(f"model.layers.{i}.self_attn.{m}_proj" for i in (0, 1) for m in "qv")


def test_target_modules_selecting_other_modules_than_the_tensors_is_refused(
    tmp_path: Path, llama_adapter: Path, layouts: Layouts
) -> None:
    """PEFT would load k_proj adapters (fresh, B = 0) and ignore the stored q/v tensors."""
    adapter = edit(llama_adapter, tmp_path / "ad", config={"target_modules": ["k_proj"]})
    problems = refused(adapter, layouts["llama"], AdapterInvalidError)
    assert [p["code"] for p in problems] == ["TARGET_MISMATCH"]
    assert problems[0]["targeted_without_tensors"] == ["model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj"]
    assert problems[0]["tensors_not_targeted"] == LLAMA_QV
    assert "model.layers.0.self_attn.k_proj" in problems[0]["message"]
    assert "model.layers.0.self_attn.q_proj" in problems[0]["message"]


@pytest.mark.parametrize("pattern, missing, extra", [
    (r".*q_proj", [], [m for m in LLAMA_QV if "v_proj" in m]),  # PEFT drops the v_proj half
    ("(a+)+$", [], LLAMA_QV),  # matches nothing: PEFT refuses to load
    (r".*\.(q|k|v)_proj", ["model.layers.0.self_attn.k_proj", "model.layers.1.self_attn.k_proj"], []),
    (r".*\.mlp", ["model.layers.0.mlp", "model.layers.1.mlp"], LLAMA_QV),  # a container: PEFT fails to wrap it
])
def test_regex_target_modules_is_evaluated_on_the_base_modules(
    tmp_path: Path, llama_adapter: Path, layouts: Layouts, pattern: str, missing: list[str], extra: list[str]
) -> None:
    adapter = edit(llama_adapter, tmp_path / "ad", config={"target_modules": pattern})
    problems = refused(adapter, layouts["llama"], AdapterInvalidError)
    assert problems[0]["code"] == "TARGET_MISMATCH"
    assert problems[0]["targeted_without_tensors"] == missing
    assert problems[0]["tensors_not_targeted"] == extra


@pytest.mark.parametrize("field, pattern, reason", [
    ("target_modules", "(?=.*q_proj).*", "lookaround"),
    ("target_modules", r"(?P<m>q)_proj|(?P=m)", "backreference"),
    ("target_modules", r"(.*)\1", "backreference"),
    ("target_modules", "(a{1000}){1000}", "repetition"),
    ("target_modules", r".*_proj{,2}", "{,n}"),
    ("exclude_modules", "(?!.*q_proj).*", "lookaround"),
])
def test_regex_loreg_cannot_evaluate_with_pythons_meaning_is_refused(
    tmp_path: Path, llama_adapter: Path, layouts: Layouts, field: str, pattern: str, reason: str
) -> None:
    adapter = edit(llama_adapter, tmp_path / "ad", config={field: pattern})
    with pytest.raises(ConfigInvalidError) as info:
        check(adapter, layouts["llama"])
    assert info.value.status == 422
    assert info.value.detail["field"] == field and info.value.detail["pattern"] == pattern
    assert reason in info.value.detail["reason"]
    assert "Python regex" in str(info.value)


def test_user_regexes_run_on_re2_only(
    tmp_path: Path, llama_adapter: Path, layouts: Layouts, monkeypatch: pytest.MonkeyPatch
) -> None:
    import re

    adapter = edit(llama_adapter, tmp_path / "ad", config={"target_modules": r".*\.(q|v)_proj",
                                                         "exclude_modules": r".*\.mlp\..*"})
    config, header = load(adapter)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a user regex went to Python's re")

    for name in ("compile", "match", "fullmatch", "search"):
        monkeypatch.setattr(re, name, refuse)
    report = validate_adapter(config, header, layouts["llama"])
    assert report.facts.modules == LLAMA_QV


def _peft_adapted(base_dir: Path, adapter_dir: Path) -> list[str]:
    """Modules the real PEFT library adapts when it loads the folder (the ground truth)."""
    from peft.tuners.lora import LoraLayer

    model = factories.load_adapter_model(base_dir, adapter_dir)
    return sorted(
        n.removeprefix(P) for n, m in model.named_modules()
        if isinstance(m, LoraLayer) and ("default" in m.lora_A or "default" in m.lora_embedding_A)
    )


@pytest.mark.parametrize("family, kwargs", [
    ("llama", {"target_modules": r".*\.(q|v)_proj"}),
    ("llama", {"target_modules": r"model\.layers\.1\..*\.(gate|down)_proj"}),
    ("llama", {"target_modules": ["q_proj", "k_proj", "v_proj"], "exclude_modules": ["model.layers.1.self_attn.k_proj"]}),
    ("llama", {"target_modules": ["q_proj", "o_proj"], "exclude_modules": r".*layers\.0\..*"}),
    ("llama", {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1]}),
    ("llama", {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": 0, "layers_pattern": "layers"}),
    ("llama", {"target_modules": "all-linear"}),
    ("llama", {"target_modules": ["q_proj", "v_proj", "lm_head"], "modules_to_save": ["embed_tokens"]}),
    ("gpt2", {"target_modules": ["c_attn", "lm_head"]}),
    ("bert", {"target_modules": ["query", "value", "dense"], "task_type": "SEQ_CLS"}),
    ("vit", {"target_modules": ["q_proj", "v_proj", "projection"]}),
])
def test_real_peft_selections_are_accepted_with_the_modules_peft_loads(
    tmp_path: Path, bases: Bases, layouts: Layouts, family: str, kwargs: dict[str, Any]
) -> None:
    adapter = factories.make_adapter(tmp_path / "ad", family, base_dir=bases[family], **kwargs)
    report = check(adapter, layouts[family])
    assert report.facts.modules == _peft_adapted(bases[family], adapter)


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LLaMA base whose lm_head is tied to embed_tokens (not in the checkpoint, as transformers saves it)."""
    from safetensors.numpy import load_file, save_file

    base = factories.make_base(tmp_path_factory.mktemp("tied") / "llama", "llama")
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    tensors = load_file(base / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    return base


@pytest.mark.parametrize("kwargs", [
    {"target_modules": ["embed_tokens", "q_proj"], "ensure_weight_tying": True},
    {"target_modules": ["lm_head", "q_proj"], "ensure_weight_tying": True},
    {"target_modules": r".*(embed_tokens|q_proj)", "ensure_weight_tying": True},
    {"target_modules": ["lm_head", "q_proj"]},
])
def test_tied_embedding_targets_are_accepted_with_the_modules_peft_loads(
    tmp_path: Path, tied_llama: Path, kwargs: dict[str, Any]
) -> None:
    """ensure_weight_tying: PEFT adds the input embedding to the targets and adapts the tied lm_head with it."""
    adapter = factories.make_adapter(tmp_path / "ad", "llama", base_dir=tied_llama, **kwargs)
    report = check(adapter, layout_of(tied_llama))
    assert report.facts.modules == _peft_adapted(tied_llama, adapter)
    assert "lm_head" in report.facts.modules


def test_lora_tensors_peft_ignores_on_load_are_refused(tmp_path: Path, bases: Bases, layouts: Layouts) -> None:
    """GPT-2's wte is no embedding name for ensure_weight_tying: PEFT reloads without the saved lm_head LoRA."""
    adapter = factories.make_adapter(
        tmp_path / "ad", "gpt2", base_dir=bases["gpt2"], target_modules=["lm_head", "c_attn"], ensure_weight_tying=True
    )
    with pytest.warns(UserWarning, match="no tied modules are added"):
        assert "lm_head" not in _peft_adapted(bases["gpt2"], adapter)
    problems = refused(adapter, layouts["gpt2"], AdapterInvalidError)
    assert problems[0]["code"] == "TARGET_MISMATCH" and problems[0]["tensors_not_targeted"] == ["lm_head"]


def test_base_name_mismatch_is_a_warning(llama_adapter: Path, layouts: Layouts) -> None:
    assert check(llama_adapter, layouts["llama"], base_name="loreg-test/tiny-llama").warnings == []
    report = check(llama_adapter, layouts["llama"], base_name="Org/Other-Model")
    [warning] = report.warnings
    assert (warning["code"], warning["expected"], warning["actual"]) == (
        "BASE_NAME_MISMATCH", "Org/Other-Model", "loreg-test/tiny-llama"
    )


@pytest.mark.parametrize(
    ("kwargs", "loads", "reason"),
    [
        ({}, True, None),
        ({"r": 16}, True, None),
        ({"r": 32}, False, "max_lora_rank"),
        ({"bias": "all"}, False, "bias"),
        ({"modules_to_save": ["lm_head"]}, False, "modules_to_save"),
    ],
)
def test_vllm_serving_verdict(
    tmp_path: Path, bases: Bases, layouts: Layouts, kwargs: dict[str, Any], loads: bool,
    reason: str | None,
) -> None:
    adapter = factories.make_adapter(tmp_path / "ad", "llama", base_dir=bases["llama"], **kwargs)
    report = check(adapter, layouts["llama"])
    verdict = report.serving["vllm"]
    assert verdict["loads"] is loads
    assert ("SERVING_UNSUPPORTED" in codes(report)) is (not loads)
    if reason:
        assert any(reason in r for r in verdict["reasons"])


def test_facts_describe_the_adapter_without_a_base(llama_adapter: Path) -> None:
    config, header = load(llama_adapter)
    facts = describe_adapter(config, header)
    _, tensors = factories.read_adapter(llama_adapter)
    assert facts.parameter_count == sum(t.numel() for t in tensors.values())
    assert facts.size_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert facts.modules == sorted(
        f"model.layers.{i}.self_attn.{m}" for i in (0, 1) for m in ("q_proj", "v_proj")
    )
    assert (facts.dtype, facts.dtypes, facts.ranks, facts.tensor_count) == ("F32", ["F32"], [8], 8)
    assert (facts.use_dora, facts.use_rslora, facts.bias, facts.task_type) == (False, False, "none", None)
    assert facts.base_model_name_or_path == "loreg-test/tiny-llama"
    assert facts.targets == ["q_proj", "v_proj"]  # what lookup by target matches, same on server and client
    assert json.loads(canonical_json(facts.to_dict()))["r"] == 8


def test_base_layout_reads_config_facts(layouts: Layouts) -> None:
    gpt2, llama = layouts["gpt2"], layouts["llama"]
    assert (gpt2.model_type, gpt2.architectures, gpt2.tie_word_embeddings) == ("gpt2", ("GPT2LMHeadModel",), True)
    assert (llama.model_type, llama.tie_word_embeddings) == ("llama", False)
    assert llama.tensors["model.layers.0.self_attn.v_proj.weight"] == ("F32", (16, 32))


def test_a_tensor_in_two_shards_is_refused(bases: Bases) -> None:
    header = read_header_from_file(bases["llama"] / "model.safetensors")
    with pytest.raises(DuplicateKeyError):
        base_layout_from_headers([header, header], {})


def test_resized_vocab_copy_is_a_warning_and_sets_the_embedding_rows(
    tmp_path: Path, bases: Bases, layouts: Layouts
) -> None:
    adapter = factories.make_adapter(tmp_path / "ad", "llama", base_dir=bases["llama"], target_modules=["embed_tokens"])
    emb = P + "model.embed_tokens"

    def grow(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        t = dict(t)
        t[emb + ".base_layer.weight"] = torch.cat([t[emb + ".base_layer.weight"], torch.zeros(2, 32)])
        t[emb + ".lora_embedding_A"] = torch.cat([t[emb + ".lora_embedding_A"], torch.zeros(8, 2)], dim=1)
        return t

    report = check(edit(adapter, tmp_path / "grown", grow), layouts["llama"])
    [warning] = [w for w in report.warnings if w["code"] == "RESIZED_VOCAB"]
    assert (warning["expected"], warning["actual"]) == ([128, 32], [130, 32])
    # A_e must follow the copy's rows, not the base's
    short = edit(adapter, tmp_path / "short", lambda t: {**grow(t), emb + ".lora_embedding_A": torch.zeros(8, 128)})
    problems = refused(short, layouts["llama"], ShapeMismatchError)
    assert [(p["key"], p["expected"]) for p in problems] == [(emb + ".lora_embedding_A", [8, 130])]


def test_conv_kernel_mismatch(tmp_path: Path, bases: Bases, layouts: Layouts) -> None:
    adapter = factories.make_adapter(tmp_path / "ad", "vit", base_dir=bases["vit"], target_modules=["projection"])
    key = P + "vit.embeddings.patch_embeddings.projection.lora_A.weight"
    bad = edit(adapter, tmp_path / "bad", lambda t: {**t, key: torch.zeros(8, 3, 4, 4)})
    problems = refused(bad, layouts["vit"], ShapeMismatchError)
    assert [(p["key"], p["expected"], p["actual"]) for p in problems] == [(key, [8, 3, 8, 8], [8, 3, 4, 4])]
