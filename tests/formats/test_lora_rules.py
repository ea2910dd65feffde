"""The pure LoRA rules module (formats/lora.py): key grammar, shapes per layer kind, scaling, tokens, targets.

Shapes are checked against what the real PEFT library builds and saves for each layer kind.
"""

from __future__ import annotations

import ast
import math
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from loreg.registry.errors import AdapterInvalidError
from loreg.registry.formats import lora

LLAMA_Q = "model.layers.0.self_attn.q_proj"


# ------------------------------------------------------------------------------------------------
# purity


def test_rules_module_imports_only_the_standard_library_and_the_error_table() -> None:
    tree = ast.parse(Path(lora.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):  # function-level imports count too
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
    outside = {m for m in imported if m.split(".")[0] not in sys.stdlib_module_names}
    assert outside == {"loreg.registry.errors"}, outside


# ------------------------------------------------------------------------------------------------
# key grammar


@pytest.mark.parametrize(
    ("key", "module", "kind", "param", "prefixed"),
    [
        (f"base_model.model.{LLAMA_Q}.lora_A.weight", LLAMA_Q, lora.LORA_A, None, True),
        (f"{LLAMA_Q}.lora_B.weight", LLAMA_Q, lora.LORA_B, None, False),
        (f"{LLAMA_Q}.lora_B.bias", LLAMA_Q, lora.LORA_B_BIAS, "bias", False),
        ("base_model.model.model.embed_tokens.lora_embedding_A", "model.embed_tokens", lora.EMBEDDING_A, None, True),
        ("model.embed_tokens.lora_embedding_B", "model.embed_tokens", lora.EMBEDDING_B, None, False),
        (f"{LLAMA_Q}.lora_magnitude_vector", LLAMA_Q, lora.MAGNITUDE, None, False),
        (f"{LLAMA_Q}.lora_magnitude_vector.weight", LLAMA_Q, lora.MAGNITUDE, None, False),
        ("model.embed_tokens.token_adapter.trainable_tokens_delta", "model.embed_tokens", lora.TRAINABLE_TOKENS,
         None, False),
        ("model.embed_tokens.base_layer.weight", "model.embed_tokens", lora.BASE_LAYER, "weight", False),
        (f"{LLAMA_Q}.base_layer.bias", LLAMA_Q, lora.BASE_LAYER, "bias", False),
        ("classifier.original_module.bias", "classifier", lora.ORIGINAL_MODULE, "bias", False),
        ("classifier.modules_to_save.weight", "classifier", lora.FULL, "weight", False),
        ("base_model.model.lm_head.weight", "lm_head", lora.FULL, "weight", True),
        ("bert.pooler.dense.bias", "bert.pooler.dense", lora.FULL, "bias", False),
    ],
)
def test_tensor_keys_split_into_module_kind_and_param(
    key: str, module: str, kind: str, param: str | None, prefixed: bool
) -> None:
    assert lora.parse_tensor_key(key) == lora.TensorKey(key, module, kind, param, prefixed)


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        (f"{LLAMA_Q}.lora_A.default.weight", "'lora_A' inside the module path"),
        (f"{LLAMA_Q}.lora_A", "unknown suffix"),
        ("base_model.model..lora_A.weight", "empty module path"),
        (".lora_B.weight", "empty module path"),
        (f"{LLAMA_Q}.modules_to_save.default.weight", "'modules_to_save' inside the module path"),
    ],
)
def test_keys_outside_the_grammar_are_refused_naming_why(key: str, reason: str) -> None:
    with pytest.raises(lora.TensorKeyError) as info:
        lora.parse_tensor_key(key)
    assert isinstance(info.value, AdapterInvalidError) and info.value.status == 422
    assert info.value.detail["key"] == key and reason in info.value.detail["reason"]


def test_sibling_keys_name_the_partner_tensor() -> None:
    a = f"base_model.model.{LLAMA_Q}.lora_A.weight"
    assert lora.sibling_key(a, lora.LORA_A, lora.LORA_B) == f"base_model.model.{LLAMA_Q}.lora_B.weight"
    assert lora.sibling_key(a, lora.LORA_A, lora.MAGNITUDE) == f"base_model.model.{LLAMA_Q}.lora_magnitude_vector"
    emb = "model.embed_tokens.lora_embedding_B"
    assert lora.sibling_key(emb, lora.EMBEDDING_B, lora.EMBEDDING_A) == "model.embed_tokens.lora_embedding_A"
    assert lora.factor_kinds(True) == (lora.EMBEDDING_A, lora.EMBEDDING_B)
    assert lora.factor_kinds(False) == (lora.LORA_A, lora.LORA_B)


def test_a_base_layer_bias_is_a_trained_bias_only_when_biases_were_trained() -> None:
    tk = lora.parse_tensor_key(f"{LLAMA_Q}.base_layer.bias")
    assert lora.copy_kind(tk, "none") == lora.BASE_LAYER
    assert lora.copy_kind(tk, "all") == lora.FULL
    assert lora.copy_kind(tk, "lora_only") == lora.FULL
    weight = lora.parse_tensor_key("model.embed_tokens.base_layer.weight")
    assert lora.copy_kind(weight, "all") == lora.BASE_LAYER


def test_lora_modules_are_the_modules_with_factors_only() -> None:
    keys = [lora.parse_tensor_key(k) for k in (
        f"{LLAMA_Q}.lora_A.weight", f"{LLAMA_Q}.lora_B.weight", "model.embed_tokens.lora_embedding_A",
        "lm_head.weight", "model.norm.base_layer.weight", "x.token_adapter.trainable_tokens_delta",
    )]
    assert lora.lora_modules(keys) == ["model.embed_tokens", LLAMA_Q]


# ------------------------------------------------------------------------------------------------
# shapes, against what PEFT builds


def _peft_layers(use_dora: bool) -> tuple[dict[str, Any], dict[str, tuple[int, ...]], dict[str, Any]]:
    """A tiny model with one layer of each kind, wrapped by PEFT: (saved tensors, base weight shapes, peft model)."""
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers.pytorch_utils import Conv1D

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(6, 10)
            self.c1d = Conv1D(12, 6)  # nf=12 outputs, nx=6 inputs: weight [6, 12]
            self.emb = torch.nn.Embedding(20, 7)
            self.conv = torch.nn.Conv2d(3, 5, kernel_size=(3, 2))

    torch.manual_seed(0)
    model = Tiny()
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters() if name.endswith(".weight")}
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["lin", "c1d", "emb", "conv"], use_dora=use_dora,
                        init_lora_weights=False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(model, config)
    saved = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    return saved, shapes, peft_model


@pytest.fixture(scope="module")
def peft_layers() -> tuple[dict[str, Any], dict[str, tuple[int, ...]], dict[str, Any]]:
    return _peft_layers(use_dora=False)


@pytest.mark.parametrize(("module", "layer"), [("lin", lora.LINEAR), ("c1d", lora.CONV1D),
                                                ("emb", lora.EMBEDDING), ("conv", lora.CONV)])
def test_expected_factor_and_delta_shapes_match_peft(peft_layers: Any, module: str, layer: str) -> None:
    import torch

    saved, shapes, peft_model = peft_layers
    embedding = layer == lora.EMBEDDING
    a_kind, b_kind = lora.factor_kinds(embedding)
    a_key = f"base_model.model.{module}" + (".lora_embedding_A" if embedding else ".lora_A.weight")
    b_key = lora.sibling_key(a_key, a_kind, b_kind)
    a, b, w = saved[a_key], saved[b_key], shapes[f"{module}.weight"]
    assert lora.layer_kind(embedding, a, w, conv1d=module == "c1d") == layer
    assert lora.factor_ranks(a, b) == (4, 4)
    expected = lora.factor_shapes(layer, w, 4, 4)
    assert expected is not None
    assert (expected.a, expected.b) == (list(a), list(b))
    assert lora.delta_shape(layer, a, b) == w
    wrapped = peft_model.base_model.model.get_submodule(module)
    with torch.no_grad():
        assert tuple(wrapped.get_delta_weight("default").shape) == w
    bias = getattr(wrapped.base_layer, "bias", None)
    if bias is not None:
        assert lora.output_size(layer, w) == bias.shape[0]


def test_dora_magnitude_shapes_match_peft() -> None:
    saved, shapes, _ = _peft_layers(use_dora=True)
    for module, layer in (("lin", lora.LINEAR), ("c1d", lora.CONV1D), ("emb", lora.EMBEDDING), ("conv", lora.CONV)):
        found = saved[f"base_model.model.{module}.lora_magnitude_vector"]
        assert lora.magnitude_shape(layer, shapes[f"{module}.weight"]) == found, module


def test_base_weights_of_the_wrong_rank_have_no_expected_factors() -> None:
    assert lora.factor_shapes(lora.CONV, [5, 3], 4, 4) is None
    assert lora.factor_shapes(lora.LINEAR, [5, 3, 1, 1], 4, 4) is None
    assert lora.delta_shape(lora.LINEAR, (4, 6), (10, 3)) is None  # ranks differ
    assert lora.delta_shape(lora.CONV, (4, 3, 3, 2), (5, 4, 3, 3)) is None  # B is not 1x1


def test_conv1d_is_decided_by_the_model_family_before_the_flag() -> None:
    assert lora.is_conv1d("transformer.h.0.attn.c_attn", "gpt2", (), fan_in_fan_out=False)
    assert not lora.is_conv1d("transformer.h.0.ln_1", "gpt2", (), fan_in_fan_out=True)
    assert lora.is_conv1d("h.0.mlp.c_fc", None, ("GPT2LMHeadModel",), fan_in_fan_out=False)
    assert not lora.is_conv1d(LLAMA_Q, "llama", (), fan_in_fan_out=True)
    assert lora.is_conv1d("x.c_attn", None, (), fan_in_fan_out=True)  # nothing else to go on


# ------------------------------------------------------------------------------------------------
# scaling


def test_scaling_is_alpha_over_r_or_over_sqrt_r_with_rslora() -> None:
    assert lora.scaling(8, 16, False) == 2.0
    assert lora.scaling(16, 8, True) == 2.0
    assert lora.scaling(2, 2.5, True) == 2.5 / math.sqrt(2)


def test_pattern_lookup_takes_the_first_matching_pattern_in_insertion_order() -> None:
    patterns = [(re.compile(lora.PATTERN_TEMPLATE.format(p)), v)
                for p, v in (("q_proj", 4), (r"layers\.0\.self_attn\.q_proj", 16), ("proj", 2))]
    assert lora.pattern_value(patterns, LLAMA_Q, 8) == 4  # first in order, not the most specific
    assert lora.pattern_value(patterns, "model.layers.0.mlp.up_proj", 8) == 8  # "proj" is not a dotted suffix
    assert lora.pattern_value(patterns, "model.layers.0.mlp.proj", 8) == 2
    assert lora.pattern_value([], LLAMA_Q, 8) == 8


# ------------------------------------------------------------------------------------------------
# trainable tokens


def test_token_indices_come_from_a_list_or_the_dict_entry_naming_the_module() -> None:
    assert lora.token_indices([3, 1], "model.embed_tokens") == [3, 1]
    by_module = {"lm_head": [9], "embed_tokens": [1, 2]}
    assert lora.token_indices(by_module, "model.embed_tokens") == [1, 2]
    assert lora.token_indices(by_module, "model.other_tokens") is None
    assert lora.token_indices(None, "model.embed_tokens") is None
    assert lora.token_rows_shape([1, 2, 5], [32, 16]) == [3, 16]
    assert lora.tokens_out_of_range([5, -1, 32, 40, 32], 32) == [-1, 32, 40]
    assert lora.tokens_repeat([1, 2, 1]) and not lora.tokens_repeat([1, 2])


# ------------------------------------------------------------------------------------------------
# targets


def test_target_list_entries_match_by_exact_name_or_dotted_suffix() -> None:
    assert lora.target_module_matches("q_proj", LLAMA_Q)
    assert lora.target_module_matches("self_attn.q_proj", LLAMA_Q)
    assert not lora.target_module_matches("_proj", LLAMA_Q)
    assert lora.dotted_suffixes("a.b.c") == {"a.b.c", "b.c", "c"}


def test_all_linear_leaves_out_embeddings_and_the_output_head() -> None:
    assert lora.is_all_linear("ALL-LINEAR") and not lora.is_all_linear(["all-linear"])
    assert lora.all_linear_module(f"{LLAMA_Q}.weight", (8, 8)) == LLAMA_Q
    assert lora.all_linear_module(f"{LLAMA_Q}.bias", (8,)) is None
    assert lora.all_linear_module("lm_head.weight", (32, 8)) is None
    assert lora.all_linear_module("model.embed_tokens.weight", (32, 8)) is None
    assert lora.all_linear_module("transformer.wpe.weight", (32, 8)) is None
    assert lora.all_linear_module("model.layers.0.input_layernorm.weight", (8,)) is None


def test_targets_are_the_leaf_names_of_adapted_modules() -> None:
    assert lora.leaf_targets([LLAMA_Q, "model.layers.1.self_attn.q_proj", "transformer.h.0.attn.c_attn"]) == [
        "c_attn", "q_proj"]
    assert lora.is_embedding_target("model.embed_tokens") and not lora.is_embedding_target(LLAMA_Q)


def test_b_factors_are_told_by_name_even_before_parsing() -> None:
    assert lora.is_b_factor(f"{LLAMA_Q}.lora_B.weight") and lora.is_b_factor(f"{LLAMA_Q}.lora_B.bias")
    assert lora.is_b_factor("model.embed_tokens.lora_embedding_B")
    assert not lora.is_b_factor(f"{LLAMA_Q}.lora_A.weight") and not lora.is_b_factor("lm_head.weight")
