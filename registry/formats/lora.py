"""The LoRA rules, once: tensor-key grammar, scaling, expected shapes per layer kind, trainable-token
indices and which modules an adapter targets (PEFT_FORMAT.md §2-§4).

Pure and standard-library only (plus loreg's error table), so the config model, the validator, the
client and the merge engine on a bare GPU host share it. User regexes are not run here: a caller that
needs rank_pattern/alpha_pattern passes matchers it compiled safely (formats.peft uses RE2).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

from loreg.registry.errors import AdapterInvalidError

PEFT_PREFIX = "base_model.model."

# ------------------------------------------------------------------------------------------------
# tensor kinds and the key grammar (PEFT_FORMAT.md §2.1)

LORA_A = "lora_A"
LORA_B = "lora_B"
LORA_B_BIAS = "lora_B.bias"
EMBEDDING_A = "lora_embedding_A"
EMBEDDING_B = "lora_embedding_B"
MAGNITUDE = "lora_magnitude_vector"
BASE_LAYER = "base_layer"  # full copy of a targeted module's base tensor (param: weight | bias)
FULL = "full"  # modules_to_save copy or a trained bias (bias="all"/"lora_only"); replaces the base tensor
TRAINABLE_TOKENS = "trainable_tokens_delta"
ORIGINAL_MODULE = "original_module"  # untouched base value PEFT saves with bias="all"; never applied

LORA_KINDS = frozenset({LORA_A, LORA_B, EMBEDDING_A, EMBEDDING_B})
COPY_KINDS = frozenset({BASE_LAYER, FULL, ORIGINAL_MODULE})

# Names PEFT uses for its own wrappers; a plain `.weight` key going through one of them is malformed
# (for example `q_proj.lora_A.default.weight`, saved with the adapter name left in).
RESERVED_COMPONENTS = frozenset(
    {
        "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "lora_dropout",
        "base_layer", "modules_to_save", "original_module", "token_adapter", "trainable_tokens_delta",
        "lora_down", "lora_up",
    }
)

# (on-disk suffix, kind, param); `.lora_magnitude_vector.weight` is what older PEFT wrote
SUFFIXES: tuple[tuple[str, str, str | None], ...] = (
    (".lora_A.weight", LORA_A, None),
    (".lora_B.weight", LORA_B, None),
    (".lora_B.bias", LORA_B_BIAS, "bias"),
    (".lora_embedding_A", EMBEDDING_A, None),
    (".lora_embedding_B", EMBEDDING_B, None),
    (".lora_magnitude_vector", MAGNITUDE, None),
    (".lora_magnitude_vector.weight", MAGNITUDE, None),
    (".token_adapter.trainable_tokens_delta", TRAINABLE_TOKENS, None),
    (".base_layer.weight", BASE_LAYER, "weight"),
    (".base_layer.bias", BASE_LAYER, "bias"),
    (".original_module.weight", ORIGINAL_MODULE, "weight"),
    (".original_module.bias", ORIGINAL_MODULE, "bias"),
    (".modules_to_save.weight", FULL, "weight"),
    (".modules_to_save.bias", FULL, "bias"),
)

# the suffix PEFT writes today for each factor kind (what a missing partner key would be called)
_CANONICAL_SUFFIX = {
    LORA_A: ".lora_A.weight",
    LORA_B: ".lora_B.weight",
    EMBEDDING_A: ".lora_embedding_A",
    EMBEDDING_B: ".lora_embedding_B",
    MAGNITUDE: ".lora_magnitude_vector",
}


@dataclass(frozen=True)
class TensorKey:
    """One adapter tensor key, split into the module it belongs to and what it holds."""

    key: str  # as stored in the file
    module: str  # dotted module path, PEFT prefix and wrapper names (.base_layer, .modules_to_save) removed
    kind: str  # one of the kind constants above
    param: str | None  # "weight" / "bias" for BASE_LAYER, FULL, ORIGINAL_MODULE; "bias" for LORA_B_BIAS
    prefixed: bool  # the key started with "base_model.model."


class TensorKeyError(AdapterInvalidError):
    """A key that matches no PEFT LoRA naming rule (422 ADAPTER_INVALID); ``detail`` names it and why."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"tensor {key!r}: {reason}", detail={"key": key, "reason": reason})
        self.key = key
        self.reason = reason


def parse_tensor_key(key: str) -> TensorKey:
    """Split an adapter tensor key (PEFT_FORMAT.md §2.1): prefix, module path, kind, param.

    A key with no LoRA suffix that ends in ``.weight``/``.bias`` is a FULL copy (modules_to_save or a
    trained bias). On disk keys carry no adapter name; one left in (``lora_A.default.weight``) is refused.

    Raises:
        TensorKeyError: an unknown suffix, an empty module path, or a PEFT wrapper name inside the path.
    """
    prefixed = key.startswith(PEFT_PREFIX)
    rest = key[len(PEFT_PREFIX) :] if prefixed else key
    for suffix, kind, param in SUFFIXES:
        if rest.endswith(suffix):
            module = rest[: -len(suffix)]
            break
    else:
        if rest.endswith(".weight") or rest.endswith(".bias"):
            module, _, param = rest.rpartition(".")
            kind = FULL
        else:
            raise TensorKeyError(key, "not a PEFT LoRA tensor name (unknown suffix)")
    parts = module.split(".")
    if not module or any(not p for p in parts):
        raise TensorKeyError(key, "empty module path")
    reserved = sorted(RESERVED_COMPONENTS.intersection(parts))
    if reserved:
        raise TensorKeyError(
            key, f"unexpected {reserved[0]!r} inside the module path (adapter name left in, or another format)"
        )
    return TensorKey(key=key, module=module, kind=kind, param=param, prefixed=prefixed)


def sibling_key(key: str, have: str, want: str) -> str:
    """The key of the ``want`` tensor of the module whose ``have`` tensor is ``key`` (A -> B, A -> magnitude)."""
    return key[: -len(_CANONICAL_SUFFIX[have])] + _CANONICAL_SUFFIX[want]


def factor_kinds(embedding: bool) -> tuple[str, str]:
    """The (A, B) kinds of a module: ``lora_embedding_A/B`` on an embedding, else ``lora_A/B``."""
    return (EMBEDDING_A, EMBEDDING_B) if embedding else (LORA_A, LORA_B)


def copy_kind(tk: TensorKey, bias: str) -> str:
    """What a stored copy does on merge: FULL replaces the base tensor with trained values, BASE_LAYER is
    PEFT's copy of the base. Under ``bias="all"/"lora_only"`` a targeted module's ``.base_layer.bias`` is
    the trained bias, so it is FULL."""
    if tk.kind == BASE_LAYER and tk.param == "bias" and bias != "none":
        return FULL
    return tk.kind


def is_b_factor(key: str) -> bool:
    """Whether a key holds a B factor (``lora_B`` weight or bias, ``lora_embedding_B``): an untrained adapter
    has all of them zero. A string test, so it also answers for keys no one has parsed yet."""
    return ".lora_B." in key or key.endswith(".lora_embedding_B")


def lora_modules(keys: Iterable[TensorKey]) -> list[str]:
    """The modules that hold LoRA factors (A/B or embedding A/B), sorted: the tensors' truth about targets."""
    return sorted({tk.module for tk in keys if tk.kind in LORA_KINDS})


# ------------------------------------------------------------------------------------------------
# layer kinds and expected shapes (PEFT_FORMAT.md §4.1-§4.5)

LINEAR = "linear"  # W [out, in]
CONV1D = "conv1d"  # transformers Conv1D, W [in, out] (fan_in_fan_out)
EMBEDDING = "embedding"  # W [num_embeddings, dim]
CONV = "conv"  # ConvNd, W [out, in, *kernel]
LAYER_KINDS = (LINEAR, CONV1D, EMBEDDING, CONV)

# transformers Conv1D (weight stored [in, out]) is used by these families for these leaves only.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt", "imagegpt", "decision_transformer"})
CONV1D_ARCH_PREFIXES = ("GPT2", "OpenAIGPT", "ImageGPT", "DecisionTransformer")
CONV1D_LEAVES = frozenset({"c_attn", "c_proj", "c_fc", "q_attn"})


def is_conv1d(module: str, model_type: str | None, architectures: Sequence[str], fan_in_fan_out: bool) -> bool:
    """Whether base ``module`` is a Conv1D: by the model family and leaf name, which decide over PEFT's
    saved flag (PEFT forces it per layer); the flag only when config.json says nothing."""
    if model_type in CONV1D_MODEL_TYPES or any(a.startswith(CONV1D_ARCH_PREFIXES) for a in architectures):
        return module.rsplit(".", 1)[-1] in CONV1D_LEAVES
    if model_type is None and not architectures:
        return fan_in_fan_out
    return False


def layer_kind(embedding: bool, a: Sequence[int], w: Sequence[int], conv1d: bool) -> str:
    """The layer kind a LoRA pair is merged as: embedding factors, else conv when A or W has >= 3 dims,
    else Conv1D or Linear (Conv1D cannot be told by shape: ``conv1d`` comes from :func:`is_conv1d`)."""
    if embedding:
        return EMBEDDING
    if len(a) >= 3 or len(w) >= 3:
        return CONV
    return CONV1D if conv1d else LINEAR


def factor_ranks(a: Sequence[int], b: Sequence[int]) -> tuple[int, int]:
    """The rank each factor carries: A's first axis, B's second (0 where the shape is too short)."""
    return (a[0] if a else 0), (b[1] if len(b) >= 2 else 0)


@dataclass(frozen=True)
class FactorShapes:
    """The shapes A and B must have against a base weight, and the layer's output size."""

    a: list[int]
    b: list[int]
    out: int


def factor_shapes(layer: str, w: Sequence[int], r_a: int, r_b: int) -> FactorShapes | None:
    """Expected A and B shapes for base weight ``w`` with the ranks the factors carry (ranks are checked
    against the config separately). None when ``w`` has the wrong number of dims for ``layer``.

    Linear A [r, in], B [out, r]; Conv1D and Embedding A [r, w0], B [w1, r]; ConvNd A [r, *w[1:]],
    B [out, r, 1, ...].
    """
    w = list(w)
    if layer == CONV:
        if len(w) < 3:
            return None
        return FactorShapes([r_a, *w[1:]], [w[0], r_b] + [1] * (len(w) - 2), w[0])
    if len(w) != 2:
        return None
    if layer in (EMBEDDING, CONV1D):
        return FactorShapes([r_a, w[0]], [w[1], r_b], w[1])
    return FactorShapes([r_a, w[1]], [w[0], r_b], w[0])


def delta_shape(layer: str, a: Sequence[int], b: Sequence[int]) -> tuple[int, ...] | None:
    """The shape of ΔW that A and B make, in the base tensor's layout; None if they do not pair up."""
    if layer == CONV:
        if len(a) < 3 or len(b) != len(a) or any(d != 1 for d in b[2:]) or b[1] != a[0]:
            return None
        return (b[0], *a[1:])
    if len(a) != 2 or len(b) != 2 or b[1] != a[0]:
        return None
    if layer == LINEAR:
        return (b[0], a[1])
    return (a[1], b[0])  # conv1d [in, out]; embedding [vocab, dim]


def output_size(layer: str, w: Sequence[int]) -> int:
    """The layer's output size (the length of its bias): W's second axis for Conv1D and Embedding."""
    return w[1] if layer in (CONV1D, EMBEDDING) else w[0]


def magnitude_shape(layer: str, w: Sequence[int]) -> tuple[int, ...]:
    """The DoRA magnitude's shape: one entry per output unit; ConvNd keeps it as [1, out, 1, ...]."""
    if layer == CONV:
        return (1, w[0], *([1] * (len(w) - 2)))
    return (output_size(layer, w),)


# ------------------------------------------------------------------------------------------------
# scaling (PEFT_FORMAT.md §3.3, §4)

# PEFT (>= 0.11) takes the first rank_pattern/alpha_pattern key p, in insertion order, with
# re.match(rf"(.*\.)?({p})$", module); compile this template around p with a safe engine
PATTERN_TEMPLATE = r"(.*\.)?({})$"

V = TypeVar("V")


class Matcher(Protocol):
    """A compiled pattern (RE2 in formats.peft): ``match`` anchors at the start, None when it fails."""

    def match(self, text: str) -> object | None: ...


def scaling(r: int, alpha: int | float, use_rslora: bool) -> float:
    """PEFT's LoRA scale: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def pattern_value(patterns: Iterable[tuple[Matcher, V]], module: str, default: V) -> V:
    """The value of the first pattern (compiled from :data:`PATTERN_TEMPLATE`) that matches ``module``
    (dotted path without ``base_model.model.``), else ``default``: rank_pattern/alpha_pattern lookup."""
    for matcher, value in patterns:
        if matcher.match(module) is not None:
            return value
    return default


# ------------------------------------------------------------------------------------------------
# trainable tokens (PEFT_FORMAT.md §4.8)


def token_indices(config_value: Sequence[int] | Mapping[str, Sequence[int]] | None, module: str) -> list[int] | None:
    """The token ids whose rows ``module`` replaces, from ``trainable_token_indices``: a list applies to
    the module as is, a dict by its first key that names the module (exact or dotted suffix); None: none."""
    if isinstance(config_value, Mapping):
        for name, ids in config_value.items():
            if target_module_matches(name, module):
                return list(ids)
        return None
    return None if config_value is None else list(config_value)


def token_rows_shape(indices: Sequence[int], w: Sequence[int]) -> list[int]:
    """The shape of ``trainable_tokens_delta``: one new row of the embedding per index."""
    return [len(indices), w[1]]


def tokens_out_of_range(indices: Iterable[int], rows: int) -> list[int]:
    """The ids outside a vocabulary of ``rows`` rows, sorted and unique."""
    return sorted({i for i in indices if not 0 <= i < rows})


def tokens_repeat(indices: Sequence[int]) -> bool:
    """Whether an id appears twice (two new values for one row: the merge cannot tell which PEFT keeps)."""
    return len(set(indices)) != len(indices)


# ------------------------------------------------------------------------------------------------
# targets: which modules an adapter adapts (PEFT_FORMAT.md §3.1)

ALL_LINEAR = "all-linear"
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # what ensure_weight_tying looks for (peft constants)
# PeftModelFor<task> adds these heads to modules_to_save when it loads an adapter of that task
TASK_MODULES_TO_SAVE: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}
OUTPUT_EMBEDDING_LEAVES = frozenset({"lm_head", "embed_out"})
INPUT_EMBEDDING_SUFFIXES = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
    "tok_embeddings.weight",
    "shared.weight",
)
# 2-D embeddings that are not the vocabulary (all-linear leaves them out with the others)
EMBEDDING_LEAVES = frozenset({"wpe", "position_embeddings", "token_type_embeddings", "embed_positions", "shared"})
# tensors whose row count is the vocabulary: a saved copy may have more rows (resized tokenizer)
VOCAB_LEAVES = OUTPUT_EMBEDDING_LEAVES | {s.split(".")[0] for s in INPUT_EMBEDDING_SUFFIXES}


def leaf(module: str) -> str:
    """The last component of a dotted module path."""
    return module.rsplit(".", 1)[-1]


def target_module_matches(target: str, module: str) -> bool:
    """PEFT's list rule for one target_modules entry: exact name or dotted suffix."""
    return module == target or module.endswith("." + target)


def dotted_suffixes(module: str) -> set[str]:
    """Every dotted suffix of ``module`` (itself included): the names a list entry may match it by."""
    parts = module.split(".")
    return {".".join(parts[i:]) for i in range(len(parts))}


def is_all_linear(target_modules: list[str] | str | None) -> bool:
    """Whether target_modules is PEFT's ``all-linear`` shorthand (any case)."""
    return isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR


def all_linear_module(name: str, shape: Sequence[int]) -> str | None:
    """The module of a base tensor that ``all-linear`` adapts (a 2-D weight of nn.Linear or Conv1D,
    judged by shape and name: embeddings and the output head are left out), else None."""
    if not name.endswith(".weight") or len(shape) != 2:
        return None
    module = name[: -len(".weight")]
    last = leaf(module)
    if last in VOCAB_LEAVES or last in EMBEDDING_LEAVES or "embed" in last:
        return None
    return module


def is_embedding_target(name: str) -> bool:
    """Whether a module path or target names an embedding that ensure_weight_tying ties."""
    return leaf(name) in EMBEDDING_LAYER_NAMES


def leaf_targets(modules: Iterable[str]) -> list[str]:
    """Leaf names of adapted module paths (``model.layers.0.self_attn.q_proj`` -> ``q_proj``), for lookup."""
    return sorted({leaf(m) for m in modules})
