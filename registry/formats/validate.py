"""An adapter against a base model's layout, from safetensors headers alone (PEFT_FORMAT.md §6).

Every problem is collected, then one error is raised whose detail lists them all:
``{"problems": [{"key", "code", "expected", "actual", "message"}, ...]}``; its class is the first
problem's. Order: tensor dtypes/sizes, key names, unsupported features, unknown modules, per-module checks.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from loreg.registry.errors import (
    AdapterInvalidError,
    DtypeUnsupportedError,
    DuplicateKeyError,
    EmptyTensorError,
    LoregError,
    RankMismatchError,
    ShapeMismatchError,
    UnknownModuleError,
)
from loreg.registry.formats import lora, peft
from loreg.registry.formats.lora import TensorKey, TensorKeyError
from loreg.registry.formats.peft import AdapterConfig

if TYPE_CHECKING:
    from loreg.registry.formats.safetensors import Header

# PEFT writes adapters in these; fp8/int adapters are not something PEFT produces or merges.
ADAPTER_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
MAX_PROBLEMS = 200

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DEFAULT_MAX_LORA_RANK = 16

# transformers >= 5 renames some modules at load while checkpoints keep the old names; adapters saved by
# PEFT on transformers 5 carry the new module paths. Both directions, first match wins.
_RENAMES: dict[str, tuple[tuple[re.Pattern[str], str], ...]] = {
    "vit": tuple(
        (re.compile(p), r)
        for p, r in (
            (r"(^|\.)layers\.(\d+)\.attention\.q_proj$", r"\1encoder.layer.\2.attention.attention.query"),
            (r"(^|\.)layers\.(\d+)\.attention\.k_proj$", r"\1encoder.layer.\2.attention.attention.key"),
            (r"(^|\.)layers\.(\d+)\.attention\.v_proj$", r"\1encoder.layer.\2.attention.attention.value"),
            (r"(^|\.)layers\.(\d+)\.attention\.o_proj$", r"\1encoder.layer.\2.attention.output.dense"),
            (r"(^|\.)layers\.(\d+)\.mlp\.fc1$", r"\1encoder.layer.\2.intermediate.dense"),
            (r"(^|\.)layers\.(\d+)\.mlp\.fc2$", r"\1encoder.layer.\2.output.dense"),
            (r"(^|\.)layers\.(\d+)\.(layernorm_before|layernorm_after)$", r"\1encoder.layer.\2.\3"),
            (r"(^|\.)encoder\.layer\.(\d+)\.attention\.attention\.query$", r"\1layers.\2.attention.q_proj"),
            (r"(^|\.)encoder\.layer\.(\d+)\.attention\.attention\.key$", r"\1layers.\2.attention.k_proj"),
            (r"(^|\.)encoder\.layer\.(\d+)\.attention\.attention\.value$", r"\1layers.\2.attention.v_proj"),
            (r"(^|\.)encoder\.layer\.(\d+)\.attention\.output\.dense$", r"\1layers.\2.attention.o_proj"),
            (r"(^|\.)encoder\.layer\.(\d+)\.intermediate\.dense$", r"\1layers.\2.mlp.fc1"),
            (r"(^|\.)encoder\.layer\.(\d+)\.output\.dense$", r"\1layers.\2.mlp.fc2"),
            (r"(^|\.)encoder\.layer\.(\d+)\.(layernorm_before|layernorm_after)$", r"\1layers.\2.\3"),
        )
    ),
}

_ERROR_CLASSES: dict[str, type[LoregError]] = {
    "SHAPE_MISMATCH": ShapeMismatchError,
    "RANK_MISMATCH": RankMismatchError,
    "UNKNOWN_MODULE": UnknownModuleError,
    "DTYPE_UNSUPPORTED": DtypeUnsupportedError,
    "EMPTY_TENSOR": EmptyTensorError,
}


# ------------------------------------------------------------------------------------------------
# base layout


@dataclass(frozen=True)
class BaseLayout:
    """What validation needs of a base model: tensor names, dtypes and shapes, and config.json facts."""

    tensors: dict[str, tuple[str, tuple[int, ...]]]
    model_type: str | None = None
    architectures: tuple[str, ...] = ()
    tie_word_embeddings: bool = True

    def shape(self, name: str) -> tuple[int, ...] | None:
        entry = self.tensors.get(name)
        return None if entry is None else entry[1]


def base_layout_from_headers(headers: Iterable[Header], config_json: Mapping[str, Any] | None) -> BaseLayout:
    """Merge the headers of every shard with config.json's model_type/architectures/tie_word_embeddings.

    Raises:
        DuplicateKeyError: two shards hold a tensor of the same name.
    """
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    for header in headers:
        for name, info in header.tensors.items():
            if name in tensors:
                raise DuplicateKeyError(f"tensor {name!r} appears in two shards", detail={"key": name})
            tensors[name] = (info.dtype, tuple(info.shape))
    return base_layout(tensors, config_json)


def base_layout(
    tensors: Mapping[str, tuple[str, Iterable[int]]], config_json: Mapping[str, Any] | None
) -> BaseLayout:
    """A layout from ``{name: (dtype, shape)}`` (e.g. a stored base's tensor list) and config.json."""
    cfg = dict(config_json or {})
    text_cfg = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    model_type = cfg.get("model_type")
    archs = cfg.get("architectures")
    tie = cfg.get("tie_word_embeddings", text_cfg.get("tie_word_embeddings", True))
    return BaseLayout(
        tensors={name: (dtype, tuple(shape)) for name, (dtype, shape) in tensors.items()},
        model_type=model_type if isinstance(model_type, str) else None,
        architectures=tuple(a for a in archs if isinstance(a, str)) if isinstance(archs, list) else (),
        # transformers' default; a checkpoint without lm_head.weight is tied whatever the flag says
        tie_word_embeddings=tie if isinstance(tie, bool) else True,
    )


# ------------------------------------------------------------------------------------------------
# facts (no base needed)


@dataclass(frozen=True)
class AdapterFacts:
    r: int
    lora_alpha: int | float
    ranks: list[int]  # sorted unique ranks found in the tensors
    target_modules: list[str] | str | None  # as stored in the config
    modules: list[str]  # modules with LoRA tensors (sorted, PEFT prefix removed)
    use_dora: bool
    use_rslora: bool
    bias: str
    task_type: str | None
    base_model_name_or_path: str | None
    revision: str | None
    peft_version: str | None
    dtypes: list[str]
    dtype: str | None  # the one dtype of all tensors, "mixed", or None without tensors
    parameter_count: int
    size_bytes: int
    tensor_count: int
    modules_to_save: list[str]  # modules stored whole (weights replaced on merge)
    has_modules_to_save: bool
    has_bias: bool
    has_embedding: bool
    has_conv: bool
    has_trainable_tokens: bool
    targets: list[str]  # leaf names of ``modules`` (q_proj, c_attn, …): what lookup by target matches

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _parse_keys(header: Header) -> tuple[dict[str, TensorKey], dict[str, TensorKeyError]]:
    parsed: dict[str, TensorKey] = {}
    bad: dict[str, TensorKeyError] = {}
    for key in sorted(header.tensors):
        try:
            parsed[key] = lora.parse_tensor_key(key)
        except TensorKeyError as exc:
            bad[key] = exc
    return parsed, bad


def describe_adapter(config: AdapterConfig, header: Header) -> AdapterFacts:
    """Facts about an adapter from its config and header alone; keys that do not parse are left out."""
    parsed, _ = _parse_keys(header)
    ranks: set[int] = set()
    modules: set[str] = set()
    saved: set[str] = set()
    has_bias = config.bias != "none"
    has_embedding = has_conv = has_tt = False
    for key, tk in parsed.items():
        shape = tuple(header.tensors[key].shape)
        if tk.kind in (lora.LORA_A, lora.EMBEDDING_A) and shape:
            ranks.add(shape[0])
        if tk.kind in lora.LORA_KINDS:
            modules.add(tk.module)
        if tk.kind in (lora.EMBEDDING_A, lora.EMBEDDING_B):
            has_embedding = True
        if tk.kind == lora.LORA_A and len(shape) >= 3:
            has_conv = True
        if tk.kind == lora.LORA_B_BIAS:
            has_bias = True
        if tk.kind == lora.TRAINABLE_TOKENS:
            has_tt = True
        if tk.kind == lora.FULL and (tk.param == "weight" or ".modules_to_save." in key):
            saved.add(tk.module)
    infos = list(header.tensors.values())
    dtypes = sorted({i.dtype for i in infos})
    return AdapterFacts(
        r=config.r,
        lora_alpha=config.lora_alpha,
        ranks=sorted(ranks),
        target_modules=config.target_modules,
        modules=sorted(modules),
        use_dora=config.use_dora,
        use_rslora=config.use_rslora,
        bias=config.bias,
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision,
        peft_version=config.peft_version,
        dtypes=dtypes,
        dtype=(dtypes[0] if len(dtypes) == 1 else "mixed") if dtypes else None,
        parameter_count=sum(i.numel for i in infos),
        size_bytes=sum(i.nbytes for i in infos),
        tensor_count=len(infos),
        modules_to_save=sorted(saved),
        has_modules_to_save=bool(saved),
        has_bias=has_bias,
        has_embedding=has_embedding,
        has_conv=has_conv,
        has_trainable_tokens=has_tt,
        targets=lora.leaf_targets(modules),
    )


def serving_verdicts(config: AdapterConfig, facts: AdapterFacts) -> dict[str, dict[str, Any]]:
    """Whether serving engines load this adapter with their defaults, and why not (PEFT_FORMAT.md §9)."""
    reasons: list[str] = []
    rank = max([config.r, *config.rank_pattern.values(), *facts.ranks])
    needed = next((m for m in VLLM_MAX_LORA_RANKS if m >= rank), None)
    if needed is None:
        reasons.append(f"rank {rank} exceeds vLLM's largest max_lora_rank ({VLLM_MAX_LORA_RANKS[-1]})")
    elif rank > VLLM_DEFAULT_MAX_LORA_RANK:
        reasons.append(f"rank {rank} exceeds vLLM's default max_lora_rank {VLLM_DEFAULT_MAX_LORA_RANK} "
                       f"(start vLLM with --max-lora-rank {needed})")
    if config.use_dora:
        reasons.append("vLLM does not support DoRA")
    if config.bias != "none":
        reasons.append(f"vLLM refuses bias={config.bias!r}")
    if config.lora_bias:
        reasons.append("vLLM does not load lora_B.bias (lora_bias=true)")
    if config.modules_to_save or facts.has_modules_to_save:
        reasons.append("vLLM refuses modules_to_save")
    if facts.has_trainable_tokens:
        reasons.append("trainable tokens need a recent vLLM with max_lora_trainable_tokens set")
    if facts.has_conv:
        reasons.append("vLLM has no LoRA for convolution layers")
    return {"vllm": {"loads": not reasons, "reasons": reasons, "max_lora_rank": needed}}


# ------------------------------------------------------------------------------------------------
# validation


@dataclass(frozen=True)
class ValidationReport:
    facts: AdapterFacts
    warnings: list[dict[str, Any]]
    mapping: dict[str, str]  # adapter module -> base tensor it changes (…weight, or …bias for bias-only)
    variant: str  # how adapter module paths were mapped to base names ("as-is", "add:model", ...)
    key_map: dict[str, str | None]  # adapter key -> base tensor it feeds; None: not applied (original_module)
    layer_types: dict[str, str]  # LoRA module -> "linear" | "conv1d" | "embedding" | "conv"
    scalings: dict[str, float]  # LoRA module -> scale from r/alpha/rank_pattern/alpha_pattern/rslora
    serving: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "facts": self.facts.to_dict(),
            "warnings": self.warnings,
            "mapping": self.mapping,
            "variant": self.variant,
            "key_map": self.key_map,
            "layer_types": self.layer_types,
            "scalings": self.scalings,
            "serving": self.serving,
        }


class _Problems:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def add(self, key: str | None, code: str, message: str, expected: Any = None, actual: Any = None) -> None:
        self.items.append({"key": key, "code": code, "expected": expected, "actual": actual, "message": message})

    def raise_if_any(self, variant: str, hidden_size: int | None = None) -> None:
        if not self.items:
            return
        first = self.items[0]
        cls = _ERROR_CLASSES.get(first["code"], AdapterInvalidError)
        count = len(self.items)
        hint = None
        if first["code"] == "SHAPE_MISMATCH":
            # the problems name the keys and shapes, one line each: the message only counts them
            shapes = [p for p in self.items if p["code"] == "SHAPE_MISMATCH"]
            n, others = len(shapes), count - len(shapes)
            message = f"{n} adapter tensor{'s do' if n > 1 else ' does'} not fit the base's shapes"
            if others:
                message += f" (and {others} other problem{'s' if others > 1 else ''})"
            hint = _shape_hint(shapes, hidden_size)
        else:
            message = first["message"] + (f" (and {count - 1} more)" if count > 1 else "")
        raise cls(
            message,
            detail={"problems": self.items[:MAX_PROBLEMS], "problem_count": count, "variant": variant},
            hint=hint,
        )


def _shape_hint(problems: list[dict[str, Any]], hidden_size: int | None) -> str:
    """A guess from the pattern of mismatched dimensions, e.g. another hidden size throughout."""
    pairs: list[tuple[int, int]] = []
    for p in problems:
        expected, actual = p.get("expected"), p.get("actual")
        if isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
            for e, a in zip(expected, actual):
                if isinstance(e, int) and isinstance(a, int) and e != a and (e, a) not in pairs:
                    pairs.append((e, a))
    advice = "trained for another base? pass --base"
    if len(pairs) == 1:
        e, a = pairs[0]
        return f"every mismatch is {'hidden size' if e == hidden_size else 'size'} {e} vs {a}: {advice}"
    hidden = [a for e, a in pairs if e == hidden_size]
    if len(hidden) == 1:
        return f"the adapter's shapes fit hidden size {hidden[0]}, the base's is {hidden_size}: {advice}"
    if pairs:
        shown = ", ".join(f"{e} vs {a}" for e, a in pairs[:4])
        return f"{len(pairs)} sizes differ ({shown}{', …' if len(pairs) > 4 else ''}): {advice}"
    return advice


def _shape(header: Header, key: str) -> list[int]:
    return list(header.tensors[key].shape)


def _rename(model_type: str | None, module: str) -> str:
    for pattern, repl in _RENAMES.get(model_type or "", ()):
        new, n = pattern.subn(repl, module, count=1)
        if n:
            return new
    return module


def _variants(modules: Iterable[str], base: BaseLayout) -> list[tuple[str, Callable[[str], str]]]:
    adapter_firsts = sorted({m.split(".", 1)[0] for m in modules if "." in m})
    base_firsts = sorted({n.split(".", 1)[0] for n in base.tensors if "." in n})
    plain: list[tuple[str, Callable[[str], str]]] = [("as-is", lambda m: m)]
    for p in adapter_firsts:
        plain.append((f"strip:{p}", lambda m, p=p: m[len(p) + 1 :] if m.startswith(p + ".") else m))
    for p in base_firsts:
        plain.append((f"add:{p}", lambda m, p=p: f"{p}.{m}"))
    if base.model_type not in _RENAMES:
        return plain
    out: list[tuple[str, Callable[[str], str]]] = []
    for name, fn in plain:
        out.append((name, fn))
        out.append((f"{name}+renamed", lambda m, fn=fn: _rename(base.model_type, fn(m))))
    return out


def _from_base(variant: str, model_type: str | None) -> Callable[[str], str | None]:
    """The inverse of a variant: a base module name as PEFT names it in the adapter's model (None: absent there)."""
    name = variant.removesuffix("+renamed")
    step: Callable[[str], str | None]
    if name.startswith("strip:"):
        step = lambda b, p=name[len("strip:"):]: f"{p}.{b}"  # noqa: E731
    elif name.startswith("add:"):
        step = lambda b, p=name[len("add:"):]: b[len(p) + 1 :] if b.startswith(p + ".") else None  # noqa: E731
    else:
        step = lambda b: b  # noqa: E731
    if variant.endswith("+renamed"):
        return lambda b: step(_rename(model_type, b))  # the renames hold both directions
    return step


@dataclass(frozen=True)
class _Pair:
    """A module's LoRA factors and the base weight they change."""

    module: str  # as the adapter names it
    target: str  # the base module it maps to
    layer: str  # lora.LINEAR | CONV1D | EMBEDDING | CONV
    a: TensorKey
    b: TensorKey
    a_shape: list[int]
    b_shape: list[int]
    w_name: str
    w_shape: list[int]


class _Validator:
    def __init__(self, config: AdapterConfig, header: Header, base: BaseLayout):
        self.config = config
        self.header = header
        self.base = base
        self.problems = _Problems()
        self.warnings: list[dict[str, Any]] = []
        self.mapping: dict[str, str] = {}
        self.key_map: dict[str, str | None] = {}
        self.layer_types: dict[str, str] = {}
        self.scalings: dict[str, float] = {}
        self.variant = "as-is"
        # built before anything else: a pattern loreg cannot evaluate is refused whatever the tensors hold
        self.selector = peft.TargetSelector(config, config.target_modules) if config.target_modules is not None else None

    # -- helpers ----------------------------------------------------------------------------------

    @functools.cached_property
    def input_embedding(self) -> str | None:
        for suffix in lora.INPUT_EMBEDDING_SUFFIXES:
            names = sorted((n for n in self.base.tensors if n == suffix or n.endswith("." + suffix)), key=len)
            if names:
                return names[0]
        return None

    def locate(self, module: str, param: str) -> str | None:
        name = f"{module}.{param}"
        if name in self.base.tensors:
            return name
        if (
            param == "weight"
            and lora.leaf(module) in lora.OUTPUT_EMBEDDING_LEAVES
            and self.base.tie_word_embeddings
        ):
            return self.input_embedding
        return None

    @staticmethod
    def primary_param(keys: list[TensorKey]) -> str:
        bias_only = all(tk.param == "bias" for tk in keys)
        return "bias" if bias_only else "weight"

    # -- phases -----------------------------------------------------------------------------------

    def run(self, base_name: str | None) -> None:
        header, config = self.header, self.config
        for key in sorted(header.tensors):
            info = header.tensors[key]
            if info.dtype not in ADAPTER_DTYPES:
                self.problems.add(
                    key, "DTYPE_UNSUPPORTED", f"tensor {key!r} is {info.dtype}; adapters hold floating-point tensors",
                    expected=sorted(ADAPTER_DTYPES), actual=info.dtype,
                )
            if any(d == 0 for d in info.shape):
                self.problems.add(
                    key, "EMPTY_TENSOR", f"tensor {key!r} has no elements", expected="non-empty",
                    actual=list(info.shape),
                )
        parsed, bad = _parse_keys(header)
        for key, exc in bad.items():
            self.problems.add(key, "UNKNOWN_KEY", f"tensor {key!r}: {exc.reason}")
        if not header.tensors:
            self.problems.add(None, "NO_TENSORS", "adapter_model.safetensors holds no tensors")
        if config.target_parameters:
            self.problems.add(
                None, "UNSUPPORTED", "target_parameters (LoRA on nn.Parameter, MoE experts) is not supported yet",
                actual=list(config.target_parameters),
            )

        groups: dict[str, list[TensorKey]] = {}
        for tk in parsed.values():
            groups.setdefault(tk.module, []).append(tk)
        self.choose_variant(groups)
        fn = dict(_variants(groups, self.base))[self.variant] if groups else (lambda m: m)
        located = {}
        for module in sorted(groups):  # unknown modules first: a wrong base explains everything after
            target = fn(module)
            if self.locate_module(module, target, groups[module]):
                located[module] = target
        for module, target in located.items():
            self.check_module(module, target, groups[module])
        if not self.problems.items:
            self.check_targets(groups, located)

        self.collect_warnings(groups, base_name)

    def choose_variant(self, groups: dict[str, list[TensorKey]]) -> None:
        best: tuple[int, int] | None = None
        for index, (name, fn) in enumerate(_variants(groups, self.base)):
            found = sum(1 for m, keys in groups.items() if self.locate(fn(m), self.primary_param(keys)))
            if found == len(groups):
                self.variant = name
                return
            if best is None or found > best[0]:
                best = (found, index)
                self.variant = name

    def locate_module(self, module: str, target: str, keys: list[TensorKey]) -> bool:
        param = self.primary_param(keys)
        primary = self.locate(target, param)
        if primary is None:
            for tk in keys:
                self.problems.add(
                    tk.key, "UNKNOWN_MODULE",
                    f"{tk.key!r}: the base has no tensor {target}.{param}"
                    + (f" (module {module!r} mapped by {self.variant})" if target != module else ""),
                    expected=f"{target}.{param}",
                )
            return False
        self.mapping[module] = primary
        if primary != f"{target}.{param}":
            self.warnings.append({
                "code": "TIED_REDIRECT", "module": module, "tensor": primary,
                "message": f"{module} is tied to {primary} in the base; merging changes the input embedding too",
            })
        return True

    def check_module(self, module: str, target: str, keys: list[TensorKey]) -> None:
        """One module against the base: stored copies, trainable tokens, then its LoRA pair by layer kind
        (``_LAYER_CHECKS``) and what every pair shares (rank, DoRA magnitude, lora_B bias)."""
        by_kind, copies = self.sort_keys(keys)
        w_name = self.locate(target, "weight")
        b_name = f"{target}.bias" if f"{target}.bias" in self.base.tensors else None
        w_shape = list(self.base.shape(w_name) or ()) if w_name else None
        w_shape = self.check_copies(target, copies, w_name, b_name, w_shape)
        if lora.TRAINABLE_TOKENS in by_kind:
            self.check_trainable_tokens(module, by_kind[lora.TRAINABLE_TOKENS], w_name, w_shape)
        pair = self.lora_pair(module, target, by_kind, w_name, w_shape)
        if pair is None:
            return
        self.layer_types[module] = pair.layer
        self.scalings[module] = self.config.scaling_for(module)
        out = _LAYER_CHECKS[pair.layer](self, pair)
        self.check_rank(pair)
        self.check_magnitude(pair, by_kind.get(lora.MAGNITUDE), w_fits=out is not None)
        if lora.LORA_B_BIAS in by_kind:
            self.check_lora_bias(pair, by_kind[lora.LORA_B_BIAS], b_name, out)

    def sort_keys(self, keys: list[TensorKey]) -> tuple[dict[str, TensorKey], list[TensorKey]]:
        """A module's keys by kind, and its stored copies; a repeated (kind, param) is a problem."""
        seen: dict[tuple[str, str | None, bool], str] = {}
        by_kind: dict[str, TensorKey] = {}
        copies: list[TensorKey] = []
        for tk in keys:
            # bias="all" stores a module_to_save's bias twice: `m.bias` and `m.modules_to_save.bias`
            dup = (tk.kind, tk.param, ".modules_to_save." in tk.key)
            if dup in seen:
                self.problems.add(tk.key, "DUPLICATE_TENSOR", f"{tk.key!r} repeats {seen[dup]!r}")
                continue
            seen[dup] = tk.key
            if tk.kind in lora.COPY_KINDS:
                copies.append(tk)
            else:
                by_kind[tk.kind] = tk
        return by_kind, copies

    def check_copies(self, target: str, copies: list[TensorKey], w_name: str | None, b_name: str | None,
                     w_shape: list[int] | None) -> list[int] | None:
        """Full tensors (modules_to_save copies, trained biases, base_layer copies) have the base's shapes,
        or more vocabulary rows; returns the weight's shape the LoRA pair applies to (a resized base_layer)."""
        vocab_like = lora.leaf(target) in lora.VOCAB_LEAVES or (w_name is not None and w_name != f"{target}.weight")
        for tk in copies:
            if tk.kind == lora.ORIGINAL_MODULE:
                self.key_map[tk.key] = None
                continue
            base_tensor = w_name if tk.param == "weight" else b_name
            if base_tensor is None:
                self.problems.add(tk.key, "UNKNOWN_MODULE", f"{tk.key!r}: the base has no tensor {target}.{tk.param}",
                                  expected=f"{target}.{tk.param}")
                continue
            self.key_map[tk.key] = base_tensor
            actual = _shape(self.header, tk.key)
            expected = list(self.base.shape(base_tensor) or ())
            if actual == expected:
                continue
            if tk.param == "weight" and vocab_like and len(actual) == 2 and actual[1:] == expected[1:]:
                self.warnings.append({
                    "code": "RESIZED_VOCAB", "key": tk.key, "expected": expected, "actual": actual,
                    "message": f"{tk.key!r} has {actual[0]} rows where the base has {expected[0]} (resized vocab)",
                })
                if tk.kind == lora.BASE_LAYER:
                    w_shape = actual
                continue
            self.problems.add(tk.key, "SHAPE_MISMATCH",
                              f"expected {expected}, found {actual} (a copy of {base_tensor})",
                              expected=expected, actual=actual)
        return w_shape

    def lora_pair(self, module: str, target: str, by_kind: dict[str, TensorKey], w_name: str | None,
                  w_shape: list[int] | None) -> _Pair | None:
        """The module's A/B pair and its layer kind; None (problems added, if any) when there is none to check."""
        problems = self.problems
        factors = {k: by_kind[k] for k in (lora.LORA_A, lora.LORA_B, lora.EMBEDDING_A, lora.EMBEDDING_B)
                   if k in by_kind}
        if not factors:
            for tk in (by_kind[k] for k in (lora.MAGNITUDE, lora.LORA_B_BIAS) if k in by_kind):
                problems.add(tk.key, "MISSING_TENSOR", f"{tk.key!r} has no lora_A/lora_B pair for {module}",
                             expected=[f"{module}.lora_A.weight", f"{module}.lora_B.weight"])
            return None
        if w_name is None or w_shape is None:
            for tk in factors.values():
                problems.add(tk.key, "UNKNOWN_MODULE", f"{tk.key!r}: the base has no tensor {target}.weight",
                             expected=f"{target}.weight")
            return None
        embedding = lora.EMBEDDING_A in factors or lora.EMBEDDING_B in factors
        if embedding and (lora.LORA_A in factors or lora.LORA_B in factors):
            for tk in factors.values():
                problems.add(tk.key, "MIXED_LORA", f"{module} has both linear and embedding LoRA tensors")
            return None
        a_kind, b_kind = lora.factor_kinds(embedding)
        missing = False
        for have, want in ((a_kind, b_kind), (b_kind, a_kind)):
            if have in factors and want not in factors:
                want_key = lora.sibling_key(factors[have].key, have, want)
                problems.add(want_key, "MISSING_TENSOR", f"{module} has {factors[have].key!r} but no {want_key!r}",
                             expected=want_key)
                missing = True
        if missing:
            return None
        a, b = factors[a_kind], factors[b_kind]
        a_shape, b_shape = _shape(self.header, a.key), _shape(self.header, b.key)
        for tk in (a, b):
            self.key_map[tk.key] = w_name
        conv1d = lora.is_conv1d(target, self.base.model_type, self.base.architectures, self.config.fan_in_fan_out)
        layer = lora.layer_kind(embedding, a_shape, w_shape, conv1d)
        return _Pair(module, target, layer, a, b, a_shape, b_shape, w_name, w_shape)

    # -- one check per layer kind: A and B against W; each returns the layer's output size ------------

    def check_dense(self, pair: _Pair) -> int | None:
        """nn.Linear (W [out, in]) and Conv1D (W [in, out]): the layer type decides, not the saved flag."""
        if self.config.fan_in_fan_out != (pair.layer == lora.CONV1D):
            self.warnings.append({
                "code": "FAN_IN_FAN_OUT_IGNORED", "module": pair.module, "layer": pair.layer,
                "message": f"fan_in_fan_out={self.config.fan_in_fan_out} in the config, but {pair.w_name} is "
                           f"{'a Conv1D' if pair.layer == lora.CONV1D else 'not a Conv1D'} weight; "
                           "the layer type decides",
            })
        return self.check_factors(pair)

    def check_embedding(self, pair: _Pair) -> int | None:
        """nn.Embedding (W [vocab, dim]): lora_embedding_A [r, vocab], lora_embedding_B [dim, r]."""
        return self.check_factors(pair)

    def check_conv(self, pair: _Pair) -> int | None:
        """ConvNd (W [out, in, *kernel]): A [r, in, *kernel], B [out, r, 1, ...]; groups > 1 cannot merge."""
        a, w = pair.a_shape, pair.w_shape
        if len(w) < 3:
            r_a, _ = lora.factor_ranks(a, pair.b_shape)
            self.problems.add(pair.a.key, "SHAPE_MISMATCH", f"a convolution LoRA, but base {pair.w_name} is {w}",
                              expected=[r_a, *w[1:]], actual=a)
            return None
        grouped = len(a) > 1 and bool(w[1]) and a[1] != w[1] and a[1] % w[1] == 0
        hint = " (grouped convolution: LoRA on conv groups > 1 cannot be merged)" if grouped else ""
        return self.check_factors(pair, a_hint=hint)

    def check_factors(self, pair: _Pair, a_hint: str = "") -> int | None:
        """A and B have the shapes lora.factor_shapes gives for W (ranks are checked by check_rank)."""
        r_a, r_b = lora.factor_ranks(pair.a_shape, pair.b_shape)
        expected = lora.factor_shapes(pair.layer, pair.w_shape, r_a, r_b)
        if expected is None:
            self.problems.add(pair.a.key, "SHAPE_MISMATCH", f"a {pair.layer} LoRA, but base {pair.w_name} is "
                              f"{pair.w_shape}", expected=[r_a, "?"], actual=pair.a_shape)
            return None
        for tk, actual, want, hint in ((pair.a, pair.a_shape, expected.a, a_hint),
                                       (pair.b, pair.b_shape, expected.b, "")):
            if actual != want:
                self.problems.add(tk.key, "SHAPE_MISMATCH", f"expected {want}, found {actual}{hint}",
                                  expected=want, actual=actual)
        return expected.out

    # -- what every LoRA pair shares ------------------------------------------------------------------

    def check_rank(self, pair: _Pair) -> None:
        r_res = self.config.rank_for(pair.module)
        via = "rank_pattern" if self.config.rank_pattern and r_res != self.config.r else "r"
        r_a, r_b = lora.factor_ranks(pair.a_shape, pair.b_shape)
        for tk, r in ((pair.a, r_a), (pair.b, r_b)):
            if r != r_res:
                self.problems.add(tk.key, "RANK_MISMATCH",
                                  f"{tk.key!r} has rank {r}; the config's {via} gives {r_res} for {pair.module}",
                                  expected=[r_res], actual=[r])

    def check_magnitude(self, pair: _Pair, tk: TensorKey | None, w_fits: bool) -> None:
        """DoRA's magnitude is present exactly with use_dora, one entry per output unit of W (when W's
        dims fit the layer kind at all: the layer check reported it otherwise)."""
        if tk is None:
            if self.config.use_dora:
                want_key = lora.sibling_key(pair.a.key, pair.a.kind, lora.MAGNITUDE)
                self.problems.add(want_key, "MISSING_TENSOR",
                                  f"use_dora is true but {pair.module} has no lora_magnitude_vector", expected=want_key)
            return
        self.key_map[tk.key] = pair.w_name
        if not self.config.use_dora:
            self.warnings.append({"code": "MAGNITUDE_IGNORED", "key": tk.key,
                                  "message": f"{tk.key!r} is stored but use_dora is false; PEFT ignores it"})
        if not w_fits:
            return
        expected = list(lora.magnitude_shape(pair.layer, pair.w_shape))
        actual = _shape(self.header, tk.key)
        if actual != expected:
            self.problems.add(tk.key, "SHAPE_MISMATCH", f"expected {expected}, found {actual} (DoRA magnitude of "
                              f"{pair.w_name})", expected=expected, actual=actual)

    def check_lora_bias(self, pair: _Pair, tk: TensorKey, b_name: str | None, out: int | None) -> None:
        if b_name is None:
            self.problems.add(tk.key, "BASE_BIAS_MISSING", f"{tk.key!r} needs a bias in the base, "
                              f"and {pair.target}.bias does not exist", expected=f"{pair.target}.bias")
            return
        self.key_map[tk.key] = b_name
        actual = _shape(self.header, tk.key)
        if out is not None and actual != [out]:
            self.problems.add(tk.key, "SHAPE_MISMATCH", f"expected {[out]}, found {actual} ({pair.module} has {out} "
                              "outputs)", expected=[out], actual=actual)

    def check_targets(self, groups: dict[str, list[TensorKey]], located: dict[str, str]) -> None:
        """The config must select exactly the modules whose LoRA tensors are stored, as PEFT selects them."""
        if self.selector is None:
            return  # PEFT falls back to its per-architecture default table, which loreg does not keep
        held = {m for m in located if any(tk.kind in lora.LORA_KINDS for tk in groups[m])}
        to_peft = _from_base(self.variant, self.base.model_type)
        names: set[str] = set(held)
        for name in self.base.tensors:
            parts = name.split(".")
            for i in range(1, len(parts)):
                mapped = to_peft(".".join(parts[:i]))
                if mapped:
                    names.add(mapped)
        selector = self.selector
        targets = self.config.target_modules
        if lora.is_all_linear(targets):
            linear = [m for n, (_, shape) in self.base.tensors.items() if (m := lora.all_linear_module(n, shape))]
            targets = sorted({m for n in linear if (m := to_peft(n))})
            selector = peft.TargetSelector(self.config, targets)
        tied: set[str] = set()
        embed = self.input_embedding
        embed_module = to_peft(embed.removesuffix(".weight")) if embed else None
        if self.ties_targets(targets) and embed_module and (head := to_peft("lm_head")):
            # ensure_weight_tying: PEFT adds the input embedding to the targets and adapts the tied
            # output embedding with it, whatever else the config says
            tied = {head}
            names |= {head, embed_module}
            if isinstance(targets, str):
                targets = f"(?:{targets})|^{embed_module.replace('.', '[.]')}$"
            else:
                targets = [*targets, embed_module]
            selector = peft.TargetSelector(self.config, targets)
        selected = {n for n in names if selector.selects(n)} | tied
        if selected == held:
            return
        missing, extra = sorted(selected - held), sorted(held - selected)
        parts = []
        if missing:
            parts.append(f"it selects {len(missing)} module(s) with no LoRA tensors ({', '.join(missing[:5])}"
                         f"{', …' if len(missing) > 5 else ''})")
        if extra:
            parts.append(f"{len(extra)} module(s) with LoRA tensors are not selected ({', '.join(extra[:5])}"
                         f"{', …' if len(extra) > 5 else ''})")
        self.problems.items.append({
            "key": None, "code": "TARGET_MISMATCH",
            "message": "the config's target_modules"
                       + (" (with exclude_modules/layers_to_transform/modules_to_save)"
                          if self.config.exclude_modules or self.config.layers_to_transform is not None
                          or self.config.modules_to_save else "")
                       + " does not match the tensors as PEFT would load it on this base: " + "; ".join(parts),
            "expected": sorted(held)[:MAX_PROBLEMS], "actual": sorted(selected)[:MAX_PROBLEMS],
            "targeted_without_tensors": missing[:MAX_PROBLEMS], "tensors_not_targeted": extra[:MAX_PROBLEMS],
        })

    def ties_targets(self, targets: list[str] | str) -> bool:
        """PEFT's ensure_weight_tying through target_modules: a tied base, an embedding among the targets."""
        if self.config.raw.get("ensure_weight_tying") is not True or not self.base.tie_word_embeddings:
            return False
        if any(lora.is_embedding_target(m) for m in self.config.modules_to_save or []):
            return False  # tied through modules_to_save instead: no LoRA on the output embedding
        if isinstance(targets, str):
            return any(self.selector is not None and self.selector.regex.fullmatch(n) for n in lora.EMBEDDING_LAYER_NAMES)
        return any(lora.is_embedding_target(t) for t in targets)

    def check_trainable_tokens(self, module: str, tk: TensorKey, w_name: str | None, w: list[int] | None) -> None:
        problems = self.problems
        if w_name is None or w is None or len(w) != 2:
            problems.add(tk.key, "UNKNOWN_MODULE", f"{tk.key!r}: no 2-D embedding {module}.weight in the base",
                         expected=f"{module}.weight")
            return
        self.key_map[tk.key] = w_name
        indices = lora.token_indices(self.config.trainable_token_indices, module)
        if indices is None:
            problems.add(tk.key, "MISSING_CONFIG", f"{tk.key!r} is stored but trainable_token_indices does not "
                         f"name {module}", expected="trainable_token_indices")
            return
        actual = _shape(self.header, tk.key)
        expected = lora.token_rows_shape(indices, w)
        if actual != expected:
            problems.add(tk.key, "SHAPE_MISMATCH", f"expected {expected}, found {actual} ({len(indices)} token "
                         f"rows of {w_name} {w})", expected=expected, actual=actual)
        out_of_range = lora.tokens_out_of_range(indices, w[0])
        if out_of_range:
            problems.add(tk.key, "INDEX_OUT_OF_RANGE", f"trainable_token_indices {out_of_range[:10]} are outside "
                         f"the vocabulary of {w_name} ({w[0]} rows)", expected=[0, w[0] - 1], actual=out_of_range[:50])

    def collect_warnings(self, groups: dict[str, list[TensorKey]], base_name: str | None) -> None:
        config = self.config
        adapted = lora.lora_modules(tk for keys in groups.values() for tk in keys)
        if isinstance(config.target_modules, list):
            for target in config.target_modules:
                if not any(lora.target_module_matches(target, m) for m in adapted):
                    self.warnings.append({
                        "code": "TARGET_MODULE_UNUSED", "target": target,
                        "message": f"target_modules lists {target!r} but no tensor adapts it",
                    })
        if base_name is not None and config.base_model_name_or_path != base_name:
            self.warnings.append({
                "code": "BASE_NAME_MISMATCH", "expected": base_name, "actual": config.base_model_name_or_path,
                "message": f"the adapter names base {config.base_model_name_or_path!r}; validated against "
                           f"{base_name!r}",
            })
        init = config.init_lora_weights
        if isinstance(init, str) and init.lower().startswith(("pissa", "olora", "corda", "loftq", "lora_ga")):
            self.warnings.append({
                "code": "INIT_MODIFIES_BASE", "init_lora_weights": init,
                "message": f"init_lora_weights={init!r} changes the base at init; this adapter is only right on "
                           "that residual base unless it was converted when saved",
            })
        if config.lora_bias and not any(tk.kind == lora.LORA_B_BIAS for keys in groups.values() for tk in keys):
            self.warnings.append({"code": "LORA_BIAS_MISSING",
                                  "message": "lora_bias is true but no lora_B.bias tensor is stored"})


_LAYER_CHECKS: dict[str, Callable[[_Validator, _Pair], int | None]] = {
    lora.LINEAR: _Validator.check_dense,
    lora.CONV1D: _Validator.check_dense,
    lora.EMBEDDING: _Validator.check_embedding,
    lora.CONV: _Validator.check_conv,
}


def validate_adapter(
    config: AdapterConfig,
    header: Header,
    base: BaseLayout,
    *,
    base_name: str | None = None,
) -> ValidationReport:
    """Check every adapter tensor against the base layout (headers only).

    Args:
        base_name: the base the adapter is validated against; a different base_model_name_or_path
            in the config is a warning.

    Raises:
        ShapeMismatchError, RankMismatchError, UnknownModuleError, DtypeUnsupportedError,
        EmptyTensorError, AdapterInvalidError: the first problem's class; ``detail["problems"]`` lists all.
    """
    validator = _Validator(config, header, base)
    validator.run(base_name)
    embedding = base.shape(validator.input_embedding) if validator.input_embedding else None
    validator.problems.raise_if_any(validator.variant, embedding[-1] if embedding else None)
    facts = describe_adapter(config, header)
    serving = serving_verdicts(config, facts)
    warnings = list(validator.warnings)
    for engine, verdict in serving.items():
        if not verdict["loads"]:
            warnings.append({
                "code": "SERVING_UNSUPPORTED", "engine": engine, "reasons": verdict["reasons"],
                "message": f"{engine} will not load this adapter with its defaults: " + "; ".join(verdict["reasons"]),
            })
    return ValidationReport(
        facts=facts,
        warnings=warnings,
        mapping=validator.mapping,
        variant=validator.variant,
        key_map=validator.key_map,
        layer_types=validator.layer_types,
        scalings=validator.scalings,
        serving=serving,
    )
