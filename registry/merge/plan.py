"""Merge planning from headers alone: which base tensors get which deltas, and the output layout.

No torch and no file data: the base shards' and adapters' safetensors headers, the adapters' configs
and validation reports (read by attribute, so a caller without ``formats.peft`` may pass look-alikes)
and the LoRA rules of ``formats.lora`` decide every refusal before a weight is read (see engine.py).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from loreg.registry.errors import MergeUnsupportedError
from loreg.registry.formats import lora
from loreg.registry.formats.safetensors import DTYPE_SIZES, Header, TensorInfo, parse_header

MERGE_DTYPES = ("F16", "BF16", "F32", "F64")  # what the engine computes in or casts to
_DTYPE_ALIASES = {
    "float16": "F16", "fp16": "F16", "half": "F16", "f16": "F16",
    "bfloat16": "BF16", "bf16": "BF16",
    "float32": "F32", "fp32": "F32", "float": "F32", "f32": "F32",
    "float64": "F64", "fp64": "F64", "double": "F64", "f64": "F64",
}


class AdapterConfigLike(Protocol):
    """What the plan reads of an adapter's ``AdapterConfig`` (missing attributes take PEFT's defaults)."""

    bias: str
    use_dora: bool
    lora_bias: bool
    trainable_token_indices: Sequence[int] | Mapping[str, Sequence[int]] | None


class ReportLike(Protocol):
    """What the plan reads of a ``ValidationReport`` against this base."""

    key_map: Mapping[str, str | None]  # adapter key -> base tensor it feeds; None: never applied
    layer_types: Mapping[str, str]  # LoRA module -> one of lora.LAYER_KINDS
    scalings: Mapping[str, float]
    warnings: Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class AdapterInput:
    config: AdapterConfigLike
    header: Header
    path: Path
    report: ReportLike
    weight: float = 1.0


@dataclass(frozen=True)
class BaseShard:
    name: str  # file name in the output folder (the base's shard name)
    path: Path
    header: Header


@dataclass(frozen=True)
class OutputFile:
    name: str
    size: int
    digest: str  # "sha256:<hex>"
    changed: bool  # bytes differ from the base shard of the same name
    data_size: int = 0  # bytes of tensor data (the index's total_size counts these)


@dataclass(frozen=True)
class PlannedFile:
    name: str
    header_bytes: bytes  # the 8-byte length and the JSON header, exactly as written
    size: int
    data_size: int
    rebuilt: bool  # header re-serialised (dtype change) instead of copied from the base


@dataclass(frozen=True)
class Source:
    adapter: int
    key: str
    info: TensorInfo


@dataclass(frozen=True)
class LoraOp:
    adapter: int
    module: str
    layer: str
    a: Source
    b: Source
    scale: float
    weight: float
    magnitude: Source | None  # DoRA


@dataclass
class TensorOps:
    """What happens to one base tensor, in this order: replace, LoRA deltas, bias deltas, token rows."""

    replace: list[Source] = field(default_factory=list)  # equal values expected; the first is used
    replace_full: bool = False  # a modules_to_save / trained-bias copy among them (not only .base_layer)
    replace_is_noop: bool = False  # must equal the base (checked when read): several adapters or weight != 1
    lora: list[LoraOp] = field(default_factory=list)
    bias: list[tuple[Source, float]] = field(default_factory=list)  # lora_B.bias, coefficient s·w
    rows: tuple[Source, tuple[int, ...]] | None = None
    adapters: set[int] = field(default_factory=set)

    def sources(self) -> list[Source]:
        out = list(self.replace)
        for op in self.lora:
            out += [op.a, op.b] + ([op.magnitude] if op.magnitude else [])
        out += [src for src, _ in self.bias]
        if self.rows:
            out.append(self.rows[0])
        return out


@dataclass(frozen=True)
class PlannedTensor:
    shard: int
    name: str
    src: TensorInfo  # in the base shard
    out_dtype: str
    ops: TensorOps | None


@dataclass(frozen=True)
class MergePlan:
    files: list[PlannedFile]
    tensors: list[list[PlannedTensor]] = field(repr=False)  # per file, in data order
    touched: frozenset[str]  # base tensors an adapter changes
    dtype: str | None  # the output float dtype when it was changed, else None

    @property
    def tensors_total(self) -> int:
        return sum(len(t) for t in self.tensors)

    @property
    def bytes_total(self) -> int:
        return sum(f.size for f in self.files)


def refuse(message: str, **detail: Any) -> MergeUnsupportedError:
    return MergeUnsupportedError(message, detail=detail)


def normalize_dtype(dtype: str | None) -> str | None:
    """"bfloat16" / "bf16" / "BF16" -> "BF16"; None stays None. Raises MergeUnsupportedError for others."""
    if dtype is None:
        return None
    name = _DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).upper())
    if name not in MERGE_DTYPES:
        raise refuse(f"output dtype {dtype!r} is not one of float16, bfloat16, float32, float64", dtype=str(dtype))
    return name


def _parse_key(index: int, key: str) -> lora.TensorKey:
    try:
        return lora.parse_tensor_key(key)
    except lora.TensorKeyError as exc:  # the report mapped it, so only a look-alike report gets here
        raise refuse(f"adapter {index}: tensor {key!r}: {exc.reason}", adapter=index, key=key) from None


def _tied_redirects(report: Any) -> set[str]:
    return {w.get("module") for w in getattr(report, "warnings", ()) or () if w.get("code") == "TIED_REDIRECT"}


def _read_base_header(shard: BaseShard) -> bytes:
    with open(shard.path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        raw = f.read(n) if 0 < n <= size else b""
    if n != shard.header.header_size or len(raw) != n or size != shard.header.file_size:
        raise refuse(f"base shard {shard.name!r} does not match the header it was given", shard=shard.name)
    if parse_header(raw, file_size=size).tensors != shard.header.tensors:
        raise refuse(f"base shard {shard.name!r} does not match the header it was given", shard=shard.name)
    return prefix + raw


def _build_header(tensors: list[tuple[str, str, tuple[int, ...], int]], metadata: dict[str, str] | None) -> bytes:
    obj: dict[str, Any] = {}
    if metadata is not None:
        obj["__metadata__"] = metadata
    offset = 0
    for name, dtype, shape, nbytes in tensors:
        obj[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-(8 + len(text)) % 8)  # safetensors aligns the data section to 8 bytes
    return len(text).to_bytes(8, "little") + text




def _collect(adapters: Sequence[AdapterInput], base: dict[str, TensorInfo]) -> dict[str, TensorOps]:
    ops: dict[str, TensorOps] = {}
    for index, adapter in enumerate(adapters):
        weight = float(adapter.weight)
        if not math.isfinite(weight):
            raise refuse(f"adapter {index} has the weight {adapter.weight!r}; weights must be finite", adapter=index)
        try:
            size = os.stat(adapter.path).st_size
        except OSError as exc:
            raise refuse(f"adapter file {str(adapter.path)!r} cannot be read: {exc}", adapter=index) from None
        if size != adapter.header.file_size:
            raise refuse(f"adapter file {str(adapter.path)!r} does not match its header", adapter=index)
        key_map: Mapping[str, str | None] = adapter.report.key_map
        tied = _tied_redirects(adapter.report)
        groups: dict[str, dict[str, Source]] = {}
        replaces: list[tuple[str, str, Source]] = []
        for key, info in adapter.header.tensors.items():
            if key not in key_map:
                raise refuse(f"adapter {index}: tensor {key!r} is not mapped by its validation report; "
                             "validate the adapter against this base first", adapter=index, key=key)
            target = key_map[key]
            if target is None:  # original_module copies: the untouched base value, never applied
                continue
            if target not in base:
                raise refuse(f"adapter {index}: {key!r} feeds {target!r}, which is not in the base shards "
                             "(validated against another base layout?)", adapter=index, key=key, tensor=target)
            if info.dtype not in MERGE_DTYPES:
                raise refuse(f"adapter {index}: tensor {key!r} is {info.dtype}", adapter=index, key=key)
            if base[target].dtype not in MERGE_DTYPES:
                raise refuse(f"base tensor {target!r} is {base[target].dtype}; loreg merges into float tensors only",
                             tensor=target, dtype=base[target].dtype)
            tk = _parse_key(index, key)
            if tk.kind == lora.ORIGINAL_MODULE:
                continue  # PEFT never applies it (the validator maps it to None)
            module, kind = tk.module, lora.copy_kind(tk, getattr(adapter.config, "bias", "none"))
            src = Source(index, key, info)
            if kind in (lora.FULL, lora.BASE_LAYER):
                replaces.append((module, kind, src))
            else:
                if kind in groups.setdefault(module, {}):
                    raise refuse(f"adapter {index}: {module} has two {kind} tensors", adapter=index, module=module)
                groups[module][kind] = src

        for module, kind, src in replaces:
            target = key_map[src.key]
            assert target is not None
            if tuple(src.info.shape) != tuple(base[target].shape):
                raise refuse(f"adapter {index}: {src.key!r} is {list(src.info.shape)} but {target} is "
                             f"{list(base[target].shape)} (a resized vocabulary cannot be merged into the base "
                             "layout)", adapter=index, key=src.key)
            if kind == lora.FULL and module in tied:
                raise refuse(f"adapter {index}: {src.key!r} replaces {module}, which the base ties to {target}; "
                             "merging would overwrite the input embedding too", adapter=index, key=src.key)
            entry = ops.setdefault(target, TensorOps())
            entry.replace.append(src)
            entry.replace_full = entry.replace_full or kind == lora.FULL
            entry.adapters.add(index)

        for module, kinds in sorted(groups.items()):
            _collect_module(index, adapter, weight, module, kinds, base, ops)
    return ops


def _collect_module(
    index: int, adapter: AdapterInput, weight: float, module: str, kinds: dict[str, Source],
    base: dict[str, TensorInfo], ops: dict[str, TensorOps],
) -> None:
    config, report = adapter.config, adapter.report
    key_map = report.key_map
    rows = kinds.pop(lora.TRAINABLE_TOKENS, None)
    if rows is not None:
        _collect_rows(index, config, module, rows, key_map, base, ops)
    if not kinds:
        return

    embedding = lora.EMBEDDING_A in kinds or lora.EMBEDDING_B in kinds
    a_kind, b_kind = lora.factor_kinds(embedding)
    a, b = kinds.get(a_kind), kinds.get(b_kind)
    if a is None or b is None or (embedding and (lora.LORA_A in kinds or lora.LORA_B in kinds)):
        raise refuse(f"adapter {index}: {module} does not have exactly one lora A/B pair", adapter=index,
                     module=module, tensors=sorted(s.key for s in kinds.values()))
    target = key_map[a.key]
    if key_map[b.key] != target:
        raise refuse(f"adapter {index}: the A and B tensors of {module} feed different base tensors",
                     adapter=index, module=module)
    layer = report.layer_types.get(module)
    scale = report.scalings.get(module)
    if layer not in lora.LAYER_KINDS or scale is None or not math.isfinite(scale):
        raise refuse(f"adapter {index}: the validation report gives no layer type or scaling for {module}",
                     adapter=index, module=module)
    if embedding != (layer == lora.EMBEDDING):
        raise refuse(f"adapter {index}: {module} has {a_kind} tensors but its layer type is {layer}",
                     adapter=index, module=module)
    w = tuple(base[target].shape)
    expected = lora.delta_shape(layer, tuple(a.info.shape), tuple(b.info.shape))
    if expected != w:
        raise refuse(f"adapter {index}: {module} ({layer}) A {list(a.info.shape)} and B {list(b.info.shape)} "
                     f"do not make a delta of {target}'s shape {list(w)}", adapter=index, module=module)

    magnitude = kinds.get(lora.MAGNITUDE)
    if magnitude is not None and not getattr(config, "use_dora", False):
        magnitude = None  # PEFT ignores a magnitude vector without use_dora (validation warns)
    elif magnitude is None and getattr(config, "use_dora", False):
        raise refuse(f"adapter {index}: use_dora is true but {module} has no lora_magnitude_vector",
                     adapter=index, module=module)
    if magnitude is not None:
        if key_map[magnitude.key] != target or tuple(magnitude.info.shape) != lora.magnitude_shape(layer, w):
            raise refuse(f"adapter {index}: the DoRA magnitude of {module} is {list(magnitude.info.shape)}, "
                         f"expected {list(lora.magnitude_shape(layer, w))}", adapter=index, module=module)
    entry = ops.setdefault(target, TensorOps())
    entry.lora.append(LoraOp(index, module, layer, a, b, scale, weight, magnitude))
    entry.adapters.add(index)

    bias = kinds.get(lora.LORA_B_BIAS)
    if bias is not None:
        if not getattr(config, "lora_bias", False):
            raise refuse(f"adapter {index}: {bias.key!r} is stored but lora_bias is false in adapter_config.json "
                         "(PEFT would ignore it)", adapter=index, key=bias.key)
        if magnitude is not None:
            raise refuse(f"adapter {index}: DoRA with lora_bias cannot be merged", adapter=index, module=module)
        bias_target = key_map[bias.key]
        out = lora.output_size(layer, w)
        if bias_target is None or tuple(base[bias_target].shape) != (out,) or tuple(bias.info.shape) != (out,):
            raise refuse(f"adapter {index}: {bias.key!r} does not fit the base bias of {module}",
                         adapter=index, key=bias.key)
        bias_entry = ops.setdefault(bias_target, TensorOps())
        bias_entry.bias.append((bias, scale * weight))
        bias_entry.adapters.add(index)


def _collect_rows(
    index: int, config: Any, module: str, src: Source, key_map: Mapping[str, str | None],
    base: dict[str, TensorInfo], ops: dict[str, TensorOps],
) -> None:
    """Trainable-token rows: new values for the embedding rows trainable_token_indices names."""
    target = key_map[src.key]
    assert target is not None
    indices = lora.token_indices(getattr(config, "trainable_token_indices", None), module)
    w = tuple(base[target].shape)
    if indices is None:
        raise refuse(f"adapter {index}: {src.key!r} is stored but trainable_token_indices does not name "
                     f"{module}", adapter=index, key=src.key)
    if len(w) != 2 or lora.tokens_repeat(indices) or lora.tokens_out_of_range(indices, w[0]):
        raise refuse(f"adapter {index}: trainable_token_indices for {module} repeat or leave the "
                     f"{w[0]} rows of {target}", adapter=index, key=src.key)
    expected = lora.token_rows_shape(indices, w)
    if list(src.info.shape) != expected:
        raise refuse(f"adapter {index}: {src.key!r} is {list(src.info.shape)}, expected {expected}",
                     adapter=index, key=src.key)
    entry = ops.setdefault(target, TensorOps())
    if entry.rows is not None:
        raise refuse(f"two trainable-token tensors replace rows of {target}", tensor=target)
    entry.rows = (src, tuple(indices))
    entry.adapters.add(index)


def _check_combinations(ops: dict[str, TensorOps], adapters: Sequence[AdapterInput]) -> None:
    for target, entry in ops.items():
        alone = len(entry.adapters) == 1 and all(float(adapters[i].weight) == 1.0 for i in entry.adapters)
        why = ("it is touched by several adapters" if len(entry.adapters) > 1
               else "the adapter's weight is not 1.0")
        if entry.replace:
            if entry.replace_full and not alone:
                raise refuse(f"{target} is replaced by a stored copy (modules_to_save or trained bias) and {why}; "
                             "only a single full-weight adapter may replace a tensor", tensor=target)
            # .base_layer copies normally equal the base; then they are no-ops and combine with anything
            entry.replace_is_noop = not alone
        doras = [op for op in entry.lora if op.magnitude is not None]
        if doras and (not alone or len(entry.lora) > 1):
            raise refuse(f"DoRA on {target} can only be merged from a single adapter with weight 1.0 "
                         f"({why if not alone else 'two modules feed it'})", tensor=target)
        if entry.rows is not None and (not alone or entry.lora or entry.bias or entry.replace):
            raise refuse(f"trainable-token rows of {target} can only be merged alone, from a single adapter "
                         "with weight 1.0", tensor=target)


def plan_merge(
    shards: Sequence[BaseShard], adapters: Sequence[AdapterInput], *, dtype: str | None = None
) -> MergePlan:
    """The output layout and what each adapter does to each base tensor, from headers alone.

    Raises:
        MergeUnsupportedError: anything the engine would not merge exactly (see the module docstring).
    """
    out_dtype = normalize_dtype(dtype)
    names = [s.name for s in shards]
    if not shards:
        raise refuse("no base shards given")
    if len(set(names)) != len(names) or any(not n or "/" in n or n.startswith(".") for n in names):
        raise refuse("base shard names must be unique plain file names", shards=names)
    base: dict[str, TensorInfo] = {}
    for shard in shards:
        for name, info in shard.header.tensors.items():
            if name in base:
                raise refuse(f"tensor {name!r} appears in two base shards", tensor=name)
            base[name] = info
    ops = _collect(adapters, base)
    _check_combinations(ops, adapters)

    def cast(dt: str) -> str:
        return out_dtype if out_dtype is not None and dt in MERGE_DTYPES else dt

    files: list[PlannedFile] = []
    tensors: list[list[PlannedTensor]] = []
    for index, shard in enumerate(shards):
        entries = []
        tensors.append([])
        for name, info in shard.header.tensors.items():
            dt = cast(info.dtype)
            tensors[-1].append(PlannedTensor(index, name, info, dt, ops.get(name)))
            entries.append((name, dt, info.shape, info.numel * DTYPE_SIZES[dt]))
        # only a shard with a tensor of another dtype gets a new header; the others stay byte-identical
        rebuild = any(e[1] != i.dtype for e, i in zip(entries, shard.header.tensors.values(), strict=True))
        header_bytes = _build_header(entries, shard.header.metadata) if rebuild else _read_base_header(shard)
        data_size = sum(e[3] for e in entries)
        files.append(PlannedFile(shard.name, header_bytes, len(header_bytes) + data_size, data_size, rebuild))
    rebuilt = any(f.rebuilt for f in files)
    return MergePlan(files=files, tensors=tensors, touched=frozenset(ops), dtype=out_dtype if rebuilt else None)


