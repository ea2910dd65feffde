"""PEFT LoRA adapters: strict adapter_config.json model, tensor-key mapping, rank/alpha resolution.

Pure: bytes and dicts in, dataclasses and errors out (see docs PEFT_FORMAT.md §1-§3).
User regexes (rank_pattern / alpha_pattern keys) run on google-re2 only, which is linear-time;
a regex target_modules string is stored and never run.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import re2
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loreg.registry.errors import AdapterInvalidError, ConfigInvalidError, ConfigTooLargeError

MAX_CONFIG_SIZE = 64 * 1024
MAX_RANK = 65536
PEFT_PREFIX = "base_model.model."

# Tensor kinds (PEFT_FORMAT.md §2.1).
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

# Names PEFT uses for its own wrappers; a plain `.weight` key going through one of them is malformed
# (for example `q_proj.lora_A.default.weight`, saved with the adapter name left in).
_RESERVED_COMPONENTS = frozenset(
    {
        "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "lora_dropout",
        "base_layer", "modules_to_save", "original_module", "token_adapter", "trainable_tokens_delta",
        "lora_down", "lora_up",
    }
)

_UNSUPPORTED_FIELDS = (
    "layer_replication",
    "megatron_config",
    "alora_invocation_tokens",
    "use_qalora",
    "velora_config",
    "monteclora_config",
    "arrow_config",
    "use_bdlora",
    "kasa_config",
)

# ------------------------------------------------------------------------------------------------
# adapter_config.json


Rank = Annotated[int, Field(ge=1, le=MAX_RANK)]
Alpha = Annotated[int, Field(gt=0)] | Annotated[float, Field(gt=0, allow_inf_nan=False)]


class _LoraConfigModel(BaseModel):
    """The fields loreg reads; PEFT's defaults where a field is missing, unknown fields kept."""

    model_config = ConfigDict(strict=True, extra="allow")

    peft_type: Literal["LORA"]
    r: Rank = 8
    lora_alpha: Alpha = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False
    use_dora: bool = False
    fan_in_fan_out: bool = False
    lora_bias: bool = False
    modules_to_save: list[str] | None = None
    rank_pattern: dict[str, Rank] | None = None
    alpha_pattern: dict[str, Alpha] | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    peft_version: str | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: int | list[int] | None = None
    layers_pattern: str | list[str] | None = None
    trainable_token_indices: list[int] | dict[str, list[int]] | None = None
    target_parameters: list[str] | None = None
    inference_mode: bool = True


@dataclass(frozen=True)
class _Pattern:
    pattern: str
    regex: Any  # re2._Regexp
    value: int | float


@dataclass(frozen=True)
class AdapterConfig:
    """A validated LoRA adapter_config.json; ``raw`` is the whole parsed dict, unknown keys included."""

    r: int
    lora_alpha: int | float
    target_modules: list[str] | str | None
    exclude_modules: list[str] | str | None
    bias: str
    use_rslora: bool
    use_dora: bool
    fan_in_fan_out: bool
    lora_bias: bool
    modules_to_save: list[str] | None
    rank_pattern: dict[str, int]
    alpha_pattern: dict[str, int | float]
    task_type: str | None
    base_model_name_or_path: str | None
    revision: str | None
    peft_version: str | None
    init_lora_weights: bool | str
    layers_to_transform: int | list[int] | None
    layers_pattern: str | list[str] | None
    trainable_token_indices: list[int] | dict[str, list[int]] | None
    target_parameters: list[str] | None
    raw: dict[str, Any] = field(repr=False)
    peft_type: str = "LORA"
    _rank_patterns: tuple[_Pattern, ...] = field(default=(), repr=False, compare=False)
    _alpha_patterns: tuple[_Pattern, ...] = field(default=(), repr=False, compare=False)

    def rank_for(self, module: str) -> int:
        """Rank of ``module`` (dotted path without ``base_model.model.``): rank_pattern, else r."""
        value = _first_match(self._rank_patterns, module)
        return self.r if value is None else int(value)

    def alpha_for(self, module: str) -> int | float:
        value = _first_match(self._alpha_patterns, module)
        return self.lora_alpha if value is None else value

    def scaling_for(self, module: str) -> float:
        return scaling(self.rank_for(module), self.alpha_for(module), self.use_rslora)


def scaling(r: int, alpha: int | float, use_rslora: bool) -> float:
    """PEFT's LoRA scale: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _first_match(patterns: tuple[_Pattern, ...], module: str) -> int | float | None:
    # PEFT (>= 0.11): first pattern in insertion order with re.match(rf"(.*\.)?({p})$", key)
    for p in patterns:
        if p.regex.match(module) is not None:
            return p.value
    return None


def _re2_options() -> Any:
    options = re2.Options()
    options.log_errors = False
    options.max_mem = 8 << 20
    return options


def compile_pattern_key(pattern: str) -> Any:
    """Compile a rank/alpha pattern key with PEFT's suffix rule on re2; raises re2.error."""
    return re2.compile(rf"(.*\.)?({pattern})$", _re2_options())


def _compile_patterns(name: str, patterns: dict[str, Any]) -> tuple[_Pattern, ...]:
    compiled = []
    for pattern, value in patterns.items():
        try:
            regex = compile_pattern_key(pattern)
        except re2.error as exc:
            raise ConfigInvalidError(
                f"adapter_config.json: {name} key {_show(pattern)!r} is not a regex loreg can run: {exc}",
                detail={"field": name, "pattern": _show(pattern)},
                hint="rank_pattern/alpha_pattern keys are RE2 regexes (no backreferences or lookaround)",
            ) from None
        compiled.append(_Pattern(pattern, regex, value))
    return tuple(compiled)


class _NonFinite:
    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text


class _HugeInt:
    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text


class _DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _parse_float(text: str) -> Any:
    value = float(text)
    return value if math.isfinite(value) else _NonFinite(text)


def _parse_int(text: str) -> Any:
    # long literals are never converted: int() is quadratic in the digit count
    return int(text) if len(text) <= 20 else _HugeInt(text)


_DECODER = json.JSONDecoder(
    object_pairs_hook=_object_pairs,
    parse_float=_parse_float,
    parse_int=_parse_int,
    parse_constant=_NonFinite,
)


def _show(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "…"


def _path(parts: list[str | int]) -> str:
    return ".".join(str(p) for p in parts) or "(top level)"


def _check_values(root: Any) -> None:
    """Refuse non-finite numbers, huge integers and unencodable strings, naming the field."""
    stack: list[tuple[Any, list[str | int]]] = [(root, [])]
    while stack:
        value, path = stack.pop()
        if isinstance(value, dict):
            for k, v in value.items():
                _check_string(k, path + [k])
                stack.append((v, path + [k]))
        elif isinstance(value, list):
            stack.extend((v, path + [i]) for i, v in enumerate(value))
        elif isinstance(value, _NonFinite):
            field_name = _path(path)
            raise ConfigInvalidError(
                f"adapter_config.json: field {field_name!r} is {value.text}; only finite numbers are allowed",
                detail={"field": field_name, "value": _show(value.text)},
            )
        elif isinstance(value, _HugeInt):
            field_name = _path(path)
            raise ConfigInvalidError(
                f"adapter_config.json: field {field_name!r} is an integer with {len(value.text)} digits",
                detail={"field": field_name},
            )
        elif isinstance(value, str):
            _check_string(value, path)


def _check_string(text: str, path: list[str | int]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        field_name = _path(path)
        raise ConfigInvalidError(
            f"adapter_config.json: field {field_name!r} holds a lone surrogate escape",
            detail={"field": field_name},
        ) from None


def _decode(raw: bytes, max_size: int) -> dict[str, Any]:
    if len(raw) > max_size:
        raise ConfigTooLargeError(
            f"adapter_config.json is {len(raw)} bytes; the limit is {max_size}",
            detail={"size": len(raw), "limit": max_size},
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigInvalidError(
            f"adapter_config.json is not UTF-8: {exc.reason} at byte {exc.start}", detail={"field": None}
        ) from None
    try:
        value = _DECODER.decode(text)
    except _DuplicateKey as exc:
        raise ConfigInvalidError(
            f"adapter_config.json repeats the key {_show(exc.key)!r}",
            detail={"field": _show(exc.key), "reason": "duplicate key"},
        ) from None
    except json.JSONDecodeError as exc:
        raise ConfigInvalidError(
            f"adapter_config.json is not JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
            detail={"field": None, "line": exc.lineno, "column": exc.colno},
        ) from None
    except (RecursionError, ValueError) as exc:
        raise ConfigInvalidError(f"adapter_config.json is not JSON: {exc}", detail={"field": None}) from None
    _check_values(value)
    if not isinstance(value, dict):
        raise ConfigInvalidError(
            f"adapter_config.json must hold a JSON object, not {type(value).__name__}", detail={"field": None}
        )
    return value


def _data_path(data: Any, loc: tuple[str | int, ...]) -> str:
    # pydantic puts union member tags ("constrained-int", "list[str]") into loc; keep the data path only
    parts: list[str | int] = []
    for part in loc:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        else:
            continue
        parts.append(part)
    return _show(_path(parts))


def _validation_error(exc: ValidationError, data: dict[str, Any]) -> ConfigInvalidError:
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    for err in exc.errors(include_url=False, include_input=False):
        field_name = _data_path(data, err["loc"]) if err["type"] != "missing" else _show(str(err["loc"][0]))
        if field_name in seen:
            continue
        seen.add(field_name)
        errors.append({"field": field_name, "message": err["msg"], "type": err["type"]})
    first = errors[0]
    return ConfigInvalidError(
        f"adapter_config.json: field {first['field']!r}: {first['message']}",
        detail={"field": first["field"], "errors": errors[:20]},
    )


def parse_adapter_config(raw: bytes, *, max_size: int = MAX_CONFIG_SIZE) -> AdapterConfig:
    """Parse adapter_config.json bytes strictly.

    Raises:
        ConfigTooLargeError: more than ``max_size`` bytes.
        ConfigInvalidError: not UTF-8 JSON, a repeated key, NaN/Infinity/overflowing numbers, a field of the
            wrong type or range (``detail["field"]`` names it), peft_type other than LORA, a LoRA variant
            loreg does not support, or a rank/alpha pattern RE2 cannot compile.
    """
    data = _decode(raw, max_size)
    if "peft_type" in data and data["peft_type"] != "LORA":
        shown = data["peft_type"] if isinstance(data["peft_type"], str) else repr(data["peft_type"])
        raise ConfigInvalidError(
            f"adapter_config.json: peft_type {_show(shown)!r} is not supported; loreg stores LoRA adapters",
            detail={"field": "peft_type", "value": _show(shown)},
        )
    try:
        model = _LoraConfigModel.model_validate(data)
    except ValidationError as exc:
        raise _validation_error(exc, data) from None
    for name in _UNSUPPORTED_FIELDS:
        if data.get(name):
            raise ConfigInvalidError(
                f"adapter_config.json: {name} is set; this LoRA variant cannot be validated or merged by loreg",
                detail={"field": name},
            )
    rank_pattern = dict(model.rank_pattern or {})
    alpha_pattern = dict(model.alpha_pattern or {})
    return AdapterConfig(
        r=model.r,
        lora_alpha=model.lora_alpha,
        target_modules=model.target_modules,
        exclude_modules=model.exclude_modules,
        bias=model.bias,
        use_rslora=model.use_rslora,
        use_dora=model.use_dora,
        fan_in_fan_out=model.fan_in_fan_out,
        lora_bias=model.lora_bias,
        modules_to_save=model.modules_to_save,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        task_type=model.task_type,
        base_model_name_or_path=model.base_model_name_or_path,
        revision=model.revision,
        peft_version=model.peft_version,
        init_lora_weights=model.init_lora_weights,
        layers_to_transform=model.layers_to_transform,
        layers_pattern=model.layers_pattern,
        trainable_token_indices=model.trainable_token_indices,
        target_parameters=model.target_parameters,
        raw=data,
        _rank_patterns=_compile_patterns("rank_pattern", rank_pattern),
        _alpha_patterns=_compile_patterns("alpha_pattern", alpha_pattern),
    )


def target_module_matches(target: str, module: str) -> bool:
    """PEFT's list rule for one target_modules entry: exact name or dotted suffix."""
    return module == target or module.endswith("." + target)


# ------------------------------------------------------------------------------------------------
# tensor keys


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


_SUFFIXES: tuple[tuple[str, str, str | None], ...] = (
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


def parse_tensor_key(key: str) -> TensorKey:
    """Split an adapter tensor key (PEFT_FORMAT.md §2.1); raises TensorKeyError for any other shape."""
    prefixed = key.startswith(PEFT_PREFIX)
    rest = key[len(PEFT_PREFIX) :] if prefixed else key
    for suffix, kind, param in _SUFFIXES:
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
    reserved = sorted(_RESERVED_COMPONENTS.intersection(parts))
    if reserved:
        raise TensorKeyError(
            key, f"unexpected {reserved[0]!r} inside the module path (adapter name left in, or another format)"
        )
    return TensorKey(key=key, module=module, kind=kind, param=param, prefixed=prefixed)


def leaf_targets(modules: list[str]) -> list[str]:
    """Leaf names of adapted module paths (``model.layers.0.self_attn.q_proj`` -> ``q_proj``), for lookup."""
    return sorted({m.rsplit(".", 1)[-1] for m in modules})
