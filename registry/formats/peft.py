"""PEFT LoRA adapters: strict adapter_config.json model, rank/alpha resolution, the modules PEFT selects.

Pure: bytes and dicts in, dataclasses and errors out (see docs PEFT_FORMAT.md §1-§3). The LoRA rules
themselves (key grammar, scaling, shapes, targets) live in ``formats.lora``; this module adds what
needs pydantic and RE2.
User regexes (rank_pattern / alpha_pattern keys, target_modules, exclude_modules, layers_pattern,
modules_to_save) run on google-re2 only, which is linear-time, and only where RE2 gives them
Python's meaning (PEFT runs them with ``re``); any other pattern is refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import re2
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from loreg.registry.errors import ConfigInvalidError, ConfigTooLargeError
from loreg.registry.formats import lora

MAX_CONFIG_SIZE = 64 * 1024
MAX_RANK = 65536
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
        return int(lora.pattern_value(((p.regex, p.value) for p in self._rank_patterns), module, self.r))

    def alpha_for(self, module: str) -> int | float:
        return lora.pattern_value(((p.regex, p.value) for p in self._alpha_patterns), module, self.lora_alpha)

    def scaling_for(self, module: str) -> float:
        return lora.scaling(self.rank_for(module), self.alpha_for(module), self.use_rslora)


def _re2_options() -> Any:
    options = re2.Options()
    options.log_errors = False
    options.max_mem = 8 << 20
    return options


def _compile_patterns(name: str, patterns: dict[str, Any]) -> tuple[_Pattern, ...]:
    return tuple(_Pattern(p, compile_user_regex(name, p, lora.PATTERN_TEMPLATE), v) for p, v in patterns.items())


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


# ------------------------------------------------------------------------------------------------
# which modules PEFT adapts (peft 0.21 tuners_utils.check_target_module_exists, PEFT_FORMAT.md §3.1)

# PEFT's layer-index rules (re.match): the first numbered segment, or the one after layers_pattern
_LAYER_INDEX_DEFAULT = r".*?\.[^.]*\.(?P<idx>\d+)\."
_LAYER_INDEX_AFTER = r"(?:^|.*?\.){}\.(?P<idx>\d+)\."


def _python_only(pattern: str) -> str | None:
    """A construct RE2 refuses or reads differently from Python's ``re``, named for the user; else None."""
    i = 0
    in_class = False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            nxt = pattern[i + 1 : i + 2]
            if nxt.isdigit() and nxt != "0":
                return "a backreference"
            if nxt in ("Z", "z", "p", "P", "C", "Q", "E", "N", "X", "R"):
                return f"the escape \\{nxt}, which RE2 and Python read differently"
            i += 2
            continue
        rest = pattern[i:]
        if in_class:
            if rest.startswith("[:"):
                return "a POSIX class [:...:], which Python reads as literal characters"
            if c == "]":
                in_class = False
        elif c == "[":
            in_class = True
            i += 1 + (pattern[i + 1 : i + 2] == "^")
            if pattern[i : i + 1] == "]":
                i += 1  # a leading ] is literal in both
            if pattern[i : i + 2] == "[:":
                return "a POSIX class [:...:], which Python reads as literal characters"
            continue
        elif rest.startswith(("(?=", "(?!", "(?<=", "(?<!")):
            return "a lookaround"
        elif rest.startswith("(?<"):
            return "a (?<name>...) group, which Python's re does not accept"
        elif rest.startswith("(?P="):
            return "a backreference"
        elif rest.startswith("(?>"):
            return "an atomic group"
        elif rest.startswith("(?("):
            return "a conditional group"
        elif rest.startswith("{,"):
            return "a {,n} repeat, which RE2 reads as literal characters"
        i += 1
    return None


def compile_user_regex(field: str, pattern: str, template: str = "{}") -> Any:
    """Compile ``template`` around a user pattern on RE2 with Python's meaning, or refuse it.

    Raises:
        ConfigInvalidError: a construct only Python's ``re`` evaluates (lookaround, backreference, ...),
            or a pattern RE2 cannot compile within its memory and repetition bounds.
    """
    reason = _python_only(pattern)
    if reason is None:
        try:
            return re2.compile(template.format(pattern), _re2_options())
        except re2.error as exc:
            text = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else str(exc)
            if "repetition size" in text or "too large" in text or "too big" in text:
                reason = f"more repetition than loreg's bounds allow ({text})"
            else:
                reason = f"syntax RE2 does not share with Python ({text})"
    raise ConfigInvalidError(
        f"adapter_config.json: {field} {_show(pattern)!r} uses {reason}; PEFT reads it as a Python regex, "
        "whose meaning loreg cannot evaluate safely",
        detail={"field": field, "pattern": _show(pattern), "reason": reason},
        hint="list the module names instead, or write the pattern without lookarounds and backreferences",
    )


class TargetSelector:
    """The modules PEFT adapts when it loads a config: target_modules (list, regex or all-linear),
    exclude_modules, modules_to_save (never adapted) and layers_to_transform/layers_pattern.

    ``key`` is a module path as PEFT names it (no ``base_model.model.``).
    """

    def __init__(self, config: AdapterConfig, target_modules: list[str] | str):
        self.targets: frozenset[str] = frozenset()
        self.regex: Any = None
        if isinstance(target_modules, str):
            if config.layers_to_transform is not None or config.layers_pattern is not None:
                raise ConfigInvalidError(
                    "adapter_config.json: layers_to_transform/layers_pattern cannot be used with a regex "
                    "target_modules (PEFT refuses to load it)",
                    detail={"field": "layers_to_transform" if config.layers_to_transform is not None
                            else "layers_pattern"},
                )
            self.regex = compile_user_regex("target_modules", target_modules)
        else:
            self.targets = frozenset(target_modules)
        if config.layers_pattern and config.layers_to_transform is None:
            raise ConfigInvalidError(
                "adapter_config.json: layers_pattern is set without layers_to_transform (PEFT refuses to load it)",
                detail={"field": "layers_pattern"},
            )
        excl = config.exclude_modules
        self.exclude_regex = compile_user_regex("exclude_modules", excl) if isinstance(excl, str) and excl else None
        self.exclude: frozenset[str] = frozenset(excl) if isinstance(excl, list) else frozenset()
        saved = list(config.modules_to_save or []) + list(lora.TASK_MODULES_TO_SAVE.get(config.task_type or "", ()))
        self.saved = tuple(compile_user_regex("modules_to_save", m, r"(^|.*\.){}($|\..*)") for m in saved)
        layers = config.layers_to_transform
        self.layers: frozenset[int] | None = None
        if layers is not None and (not isinstance(layers, list) or layers):
            self.layers = frozenset([layers] if isinstance(layers, int) else layers)
        patterns = config.layers_pattern
        patterns = [patterns] if isinstance(patterns, str) else list(patterns or [])
        self.layer_regexes = (
            tuple(compile_user_regex("layers_pattern", p, _LAYER_INDEX_AFTER) for p in patterns) if patterns
            else (re2.compile(_LAYER_INDEX_DEFAULT, _re2_options()),)
        )

    def selects(self, key: str) -> bool:
        suffixes = lora.dotted_suffixes(key)  # a list entry matches a key by one of these
        if self.exclude_regex is not None and self.exclude_regex.fullmatch(key):
            return False
        if not self.exclude.isdisjoint(suffixes):
            return False
        if any(r.match(key) for r in self.saved):
            return False
        if self.regex is not None:
            return self.regex.fullmatch(key) is not None
        if key in self.targets:
            return True  # PEFT takes an exact name as is, without the layer filter
        if self.targets.isdisjoint(suffixes):
            return False
        if self.layers is None:
            return True
        for regex in self.layer_regexes:
            m = regex.match(key)
            if m is not None:
                return int(m.group("idx")) in self.layers
        return False
