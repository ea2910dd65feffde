"""adapter_config.json strictness (B13), tensor-key mapping, rank/alpha patterns on re2 (B14)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from loreg.registry.errors import AdapterInvalidError, ConfigInvalidError, ConfigTooLargeError
from loreg.registry.formats import lora
from loreg.registry.formats.lora import TensorKeyError, parse_tensor_key, scaling
from loreg.registry.formats.peft import parse_adapter_config
from loreg.registry.formats.safetensors import read_header_from_file
from tests import factories

LLAMA_Q = "model.layers.0.self_attn.q_proj"


def _config(**fields: object) -> bytes:
    return json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, **fields}).encode()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("peft-adapters")
    return {
        family: factories.make_adapter(root / family, family) for family in factories.FAMILIES
    } | {
        "patterns": factories.make_adapter(
            root / "patterns",
            "llama",
            target_modules=["q_proj", "v_proj", "down_proj"],
            rank_pattern={r"layers\.1\.self_attn\.v_proj": 4, "down_proj": 16},
            alpha_pattern={"q_proj": 3.5, r"model\.layers\.0\.mlp\.down_proj": 7},
        ),
        "everything": factories.make_adapter(
            root / "everything",
            "bert",
            bias="all",
            task_type="SEQ_CLS",
            trainable_token_indices=[3, 4],
        ),
        "dora": factories.make_adapter(root / "dora", "llama", use_dora=True),
        "lora_bias": factories.make_adapter(root / "lora_bias", "bert", lora_bias=True),
    }


# -- config: real files ------------------------------------------------------------------------


@pytest.mark.parametrize("family", factories.FAMILIES)
def test_real_adapter_config_parses_with_its_fields(adapters: dict[str, Path], family: str) -> None:
    raw = (adapters[family] / "adapter_config.json").read_bytes()
    config = parse_adapter_config(raw)
    assert config.peft_type == "LORA"
    assert (config.r, config.lora_alpha) == (8, 16)
    assert sorted(config.target_modules) == sorted(factories.default_target_modules(family))
    assert config.base_model_name_or_path == factories.base_name(family)
    assert config.raw == json.loads(raw)


def test_unknown_config_keys_are_kept_in_raw() -> None:
    config = parse_adapter_config(_config(some_future_field={"a": [1, 2]}, peft_version="9.9.9"))
    assert config.raw["some_future_field"] == {"a": [1, 2]}
    assert config.peft_version == "9.9.9"


def test_float_alpha_is_accepted() -> None:
    # PiSSA -> LoRA conversion with rslora writes alpha * sqrt(2)
    config = parse_adapter_config(_config(lora_alpha=16 * math.sqrt(2), use_rslora=True))
    assert config.lora_alpha == pytest.approx(22.627, abs=1e-3)


def test_missing_optional_fields_take_peft_defaults() -> None:
    config = parse_adapter_config(b'{"peft_type": "LORA"}')
    assert (config.r, config.lora_alpha, config.bias, config.use_dora) == (8, 8, "none", False)
    assert config.rank_pattern == {} and config.alpha_pattern == {}


# -- config: B13 ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"this is not json", None),
        (b"", None),
        (b"[1, 2]", None),
        (b'{"peft_type": "LORA", "r": 8, "r": 16}', "r"),
        (b'{"peft_type": "LORA", "r": Infinity}', "r"),
        (b'{"peft_type": "LORA", "r": -Infinity}', "r"),
        (b'{"peft_type": "LORA", "r": NaN}', "r"),
        (b'{"peft_type": "LORA", "r": 1e400}', "r"),
        (b'{"peft_type": "LORA", "lora_alpha": 1e400}', "lora_alpha"),
        (b'{"peft_type": "LORA", "alpha_pattern": {"q_proj": NaN}}', "alpha_pattern.q_proj"),
        (b'{"peft_type": "LORA", "r": 0}', "r"),
        (b'{"peft_type": "LORA", "r": -1}', "r"),
        (b'{"peft_type": "LORA", "r": "8"}', "r"),
        (b'{"peft_type": "LORA", "r": 8.0}', "r"),
        (b'{"peft_type": "LORA", "r": true}', "r"),
        (b'{"peft_type": "LORA", "r": 1000000000}', "r"),
        (b'{"peft_type": "LORA", "r": 123456789012345678901234567890}', "r"),
        (b'{"peft_type": "PREFIX_TUNING"}', "peft_type"),
        (b'{"peft_type": "ADALORA", "r": 8}', "peft_type"),
        (b'{"r": 8}', "peft_type"),
        (b'{"peft_type": "LORA", "lora_alpha": 0}', "lora_alpha"),
        (b'{"peft_type": "LORA", "lora_alpha": -16}', "lora_alpha"),
        (b'{"peft_type": "LORA", "lora_alpha": "16"}', "lora_alpha"),
        (b'{"peft_type": "LORA", "target_modules": ["q_proj", 3]}', "target_modules.1"),
        (b'{"peft_type": "LORA", "rank_pattern": {"q_proj": "4"}}', "rank_pattern.q_proj"),
        (b'{"peft_type": "LORA", "rank_pattern": {"q_proj": 0}}', "rank_pattern.q_proj"),
        (b'{"peft_type": "LORA", "use_dora": "yes"}', "use_dora"),
        (b'{"peft_type": "LORA", "bias": "some"}', "bias"),
        (b'{"peft_type": "LORA", "note": "\\ud800"}', "note"),
    ],
)
def test_invalid_config_is_refused_naming_the_field(raw: bytes, field: str | None) -> None:
    with pytest.raises(ConfigInvalidError) as info:
        parse_adapter_config(raw)
    assert info.value.status == 422
    assert info.value.detail["field"] == field
    if field is not None:
        assert field.split(".")[0] in info.value.message


def test_config_that_is_not_utf8_is_refused() -> None:
    with pytest.raises(ConfigInvalidError):
        parse_adapter_config(b'{"peft_type": "LORA", "note": "\xff"}')


def test_deeply_nested_config_is_refused_not_crashed() -> None:
    with pytest.raises(ConfigInvalidError):
        parse_adapter_config(b'{"x": ' + b"[" * 30_000 + b"]" * 30_000 + b"}")


def test_config_over_64_kib_is_too_large() -> None:
    raw = _config(padding="x" * (65 * 1024))
    with pytest.raises(ConfigTooLargeError) as info:
        parse_adapter_config(raw)
    assert info.value.status == 413
    assert info.value.detail["limit"] == 64 * 1024


def test_config_just_under_the_limit_parses() -> None:
    raw = _config(padding="")
    raw = raw[:-1] + b" " * (64 * 1024 - len(raw)) + b"}"
    assert len(raw) == 64 * 1024
    parse_adapter_config(raw)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("layer_replication", [[0, 2], [1, 2]]),
        ("megatron_config", {"tensor_model_parallel_size": 2}),
        ("alora_invocation_tokens", [1, 2, 3]),
        ("use_qalora", True),
        ("velora_config", {"a": 1}),
        ("monteclora_config", {"a": 1}),
        ("arrow_config", {"a": 1}),
        ("use_bdlora", {"a": 1}),
        ("kasa_config", {"a": 1}),
    ],
)
def test_unsupported_lora_variants_are_refused(field: str, value: object) -> None:
    with pytest.raises(ConfigInvalidError) as info:
        parse_adapter_config(_config(**{field: value}))
    assert info.value.detail["field"] == field


def test_unsupported_variant_fields_left_at_their_defaults_are_fine() -> None:
    parse_adapter_config(
        _config(layer_replication=None, megatron_config=None, use_qalora=False, megatron_core="megatron.core")
    )


# -- rank / alpha patterns ----------------------------------------------------------------------


MODULES = [
    "model.layers.0.self_attn.q_proj",
    "model.layers.0.self_attn.v_proj",
    "model.layers.1.self_attn.v_proj",
    "model.layers.10.self_attn.v_proj",
    "model.layers.1.mlp.down_proj",
    "q_proj",
    "transformer.h.0.attn.c_attn",
]
PATTERNS = [
    r"layers\.1\.self_attn\.v_proj",
    "v_proj",
    "q_proj",
    "model.layers.0.self_attn.q_proj",
    "proj",
    r"layers\.\d+\.mlp\..*",
    "c_attn|down_proj",
    "h.0.attn.c_attn",
    "attn.c_attn",
]


@pytest.mark.parametrize("order", [PATTERNS, PATTERNS[::-1]])
def test_rank_pattern_resolution_matches_peft(order: list[str]) -> None:
    from peft.utils.other import get_pattern_key

    rank_pattern = {p: i + 1 for i, p in enumerate(order)}
    alpha_pattern = {p: (i + 1) * 2.5 for i, p in enumerate(order)}
    config = parse_adapter_config(_config(r=64, lora_alpha=128, rank_pattern=rank_pattern, alpha_pattern=alpha_pattern))
    for module in MODULES:
        key = get_pattern_key(list(rank_pattern), module)
        assert config.rank_for(module) == rank_pattern.get(key, 64), module
        assert config.alpha_for(module) == alpha_pattern.get(key, 128), module


def test_real_adapter_rank_pattern_matches_its_tensors(adapters: dict[str, Path]) -> None:
    config = parse_adapter_config((adapters["patterns"] / "adapter_config.json").read_bytes())
    header = read_header_from_file(adapters["patterns"] / "adapter_model.safetensors")
    seen = set()
    for key, info in header.tensors.items():
        tk = parse_tensor_key(key)
        if tk.kind == lora.LORA_A:
            assert info.shape[0] == config.rank_for(tk.module), key
            seen.add(info.shape[0])
    assert seen == {4, 8, 16}


def test_real_adapter_scalings_match_peft(adapters: dict[str, Path], tmp_path: Path) -> None:
    config = parse_adapter_config((adapters["patterns"] / "adapter_config.json").read_bytes())
    model = factories.load_adapter_model(factories.make_base(tmp_path / "base", "llama"), adapters["patterns"])
    checked = 0
    for name, module in model.base_model.model.named_modules():
        if isinstance(getattr(module, "scaling", None), dict):
            assert config.scaling_for(name) == pytest.approx(module.scaling["default"], rel=0, abs=0), name
            checked += 1
    assert checked == 6


def test_scaling_plain_and_rslora() -> None:
    assert scaling(8, 16, False) == 2.0
    assert scaling(16, 16, True) == 4.0
    assert scaling(4, 3.5, False) == 0.875


@pytest.mark.parametrize("pattern", [r"(a)\1", r"(?=q)q_proj", r"(?<=\.)q_proj", "a{1001}", "[unclosed"])
def test_rank_pattern_re2_cannot_compile_is_refused(pattern: str) -> None:
    with pytest.raises(ConfigInvalidError) as info:
        parse_adapter_config(_config(rank_pattern={pattern: 4}))
    assert info.value.detail["field"] == "rank_pattern"
    assert info.value.detail["pattern"] == pattern


@pytest.mark.parametrize("pattern, reason", [("v_proj{,2}", "{,n}"), ("[[:alpha:]_]+proj", "POSIX")])
def test_rank_pattern_re2_would_read_differently_from_python_is_refused(pattern: str, reason: str) -> None:
    """RE2 compiles these, but not with the meaning PEFT's ``re`` gives them: the rank would be resolved wrongly."""
    with pytest.raises(ConfigInvalidError) as info:
        parse_adapter_config(_config(alpha_pattern={pattern: 4}))
    assert info.value.detail["field"] == "alpha_pattern"
    assert reason in info.value.detail["reason"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("pattern", ["(a+)+$", "(.*a){20}", "(x+x+)+y", "(.*){1,32}(.*){1,32}q_proj"])
def test_catastrophic_rank_pattern_is_matched_in_bounded_time(pattern: str) -> None:
    # These take exponential time under stdlib re; re2 is linear in the key length.
    config = parse_adapter_config(_config(rank_pattern={pattern: 4}, alpha_pattern={pattern: 2}))
    keys = ["model.layers.0.self_attn." + "a" * 40 + "!", "x" * 60, "model." + "a" * 56]
    for key in keys:
        assert config.rank_for(key) in (4, 8)
        assert config.alpha_for(key) in (2, 16)


def test_regex_target_modules_is_stored_not_compiled(monkeypatch: pytest.MonkeyPatch) -> None:
    import re2

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a user regex was compiled")

    for name in ("compile", "match", "fullmatch", "search"):
        monkeypatch.setattr(re, name, refuse)
        monkeypatch.setattr(re2, name, refuse)
    config = parse_adapter_config(_config(target_modules="(a+)+$", exclude_modules="(.*a){20}"))
    assert config.target_modules == "(a+)+$"
    assert config.exclude_modules == "(.*a){20}"


# -- tensor keys --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("suffix", "kind", "param"),
    [
        (".lora_A.weight", lora.LORA_A, None),
        (".lora_B.weight", lora.LORA_B, None),
        (".lora_B.bias", lora.LORA_B_BIAS, "bias"),
        (".lora_embedding_A", lora.EMBEDDING_A, None),
        (".lora_embedding_B", lora.EMBEDDING_B, None),
        (".lora_magnitude_vector", lora.MAGNITUDE, None),
        (".base_layer.weight", lora.BASE_LAYER, "weight"),
        (".base_layer.bias", lora.BASE_LAYER, "bias"),
        (".weight", lora.FULL, "weight"),
        (".bias", lora.FULL, "bias"),
        (".modules_to_save.bias", lora.FULL, "bias"),
        (".modules_to_save.weight", lora.FULL, "weight"),
        (".original_module.bias", lora.ORIGINAL_MODULE, "bias"),
        (".token_adapter.trainable_tokens_delta", lora.TRAINABLE_TOKENS, None),
    ],
)
@pytest.mark.parametrize("prefix", ["base_model.model.", ""])
def test_tensor_key_suffixes(suffix: str, kind: str, param: str | None, prefix: str) -> None:
    tk = parse_tensor_key(prefix + LLAMA_Q + suffix)
    assert (tk.module, tk.kind, tk.param, tk.prefixed) == (LLAMA_Q, kind, param, bool(prefix))


@pytest.mark.parametrize(
    "key",
    [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight",  # adapter name left in
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A",
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha",  # kohya
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
        "base_model.model.lora_A.weight",
        "base_model.model.model..q_proj.lora_A.weight",
        "model.layers.0.self_attn.q_proj.hada_w1_a",
        "",
    ],
)
def test_unknown_tensor_keys_are_refused_with_detail(key: str) -> None:
    with pytest.raises(TensorKeyError) as info:
        parse_tensor_key(key)
    assert isinstance(info.value, AdapterInvalidError) and info.value.status == 422
    assert info.value.detail["key"] == key
    assert info.value.detail["reason"]


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "vit", "patterns", "everything", "dora", "lora_bias"])
def test_every_key_of_real_adapters_parses(adapters: dict[str, Path], name: str) -> None:
    header = read_header_from_file(adapters[name] / "adapter_model.safetensors")
    kinds = {parse_tensor_key(key).kind for key in header.tensors}
    assert {lora.LORA_A, lora.LORA_B} <= kinds
    if name == "everything":
        assert {lora.FULL, lora.ORIGINAL_MODULE, lora.BASE_LAYER, lora.TRAINABLE_TOKENS} <= kinds
    if name == "dora":
        assert lora.MAGNITUDE in kinds
    if name == "lora_bias":
        assert lora.LORA_B_BIAS in kinds


def test_target_module_list_rule() -> None:
    assert lora.target_module_matches("q_proj", LLAMA_Q)
    assert lora.target_module_matches(LLAMA_Q, LLAMA_Q)
    assert lora.target_module_matches("self_attn.q_proj", LLAMA_Q)
    assert not lora.target_module_matches("_proj", LLAMA_Q)
    assert not lora.target_module_matches("proj", LLAMA_Q)
