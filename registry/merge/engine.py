"""Merge engine: a base model's safetensors shards + PEFT LoRA adapters -> merged shards (PEFT_FORMAT.md §4-§5).

Imports only torch (inside functions), numpy, ``loreg.registry.errors`` and
``loreg.registry.formats.safetensors``: it runs on a bare GPU machine with no web stack, pydantic or re2.
The adapters' ``config`` and ``report`` are read by attribute (duck-typed ``AdapterConfig`` /
``ValidationReport``), so a caller without ``formats.peft`` may pass look-alikes.

Public:
    AdapterInput(config, header, path, report, weight=1.0)   one local adapter file, validated against the base
    BaseShard(name, path, header)                             one local base shard file
    OutputFile(name, size, digest, changed, data_size)        one written file; digest "sha256:<hex>"
    MergePlan / PlannedFile                                   output layout, known before any weight is read
    plan_merge(shards, adapters, *, dtype=None) -> MergePlan  every check that needs headers only
    merge_to_dir(shards, adapters, out_dir, *, dtype=None, device="auto", progress=None) -> list[OutputFile]
    write_index(out_dir, outputs, base_index_json) -> OutputFile

Semantics: output = base + Σ weightᵢ·Δᵢ per tensor, in float32 (float64 for F64 tensors), one rounding to the
output dtype. Δ is PEFT's: Linear s·B@A, Conv1D (fan_in_fan_out) its transpose, embedding s·(B_e@A_e)ᵀ,
ConvNd the reshape-matmul, lora_B.bias adds s·bias to the base bias. The non-linear parts — DoRA renormalisation,
full copies that replace a base tensor (modules_to_save, ``bias="all"/"lora_only"`` biases, ``.base_layer``) and
trainable-token rows — are applied only when their adapter has weight 1.0 and no other adapter touches the
same tensor; otherwise MergeUnsupportedError (``.base_layer`` copies equal to the base are no-ops and allowed).
Refused as well: a full copy redirected through tied embeddings (it would overwrite the input embedding), a
resized vocabulary, ``lora_B.bias`` without ``lora_bias``, non-float base tensors, adapter keys the validation
report does not map, and targets missing from the given shards (an adapter validated against another base).
A merged tensor that is not finite in the output dtype (NaN or inf in float32, or finite there and inf after
the cast to float16) fails the merge with NonFiniteValuesError naming it, as does an untouched tensor that a
dtype change overflows; the engine never writes a model full of infinities.

Layout: the same file names, tensor order, shapes and shard split as the base. Each output starts with the
base's header bytes verbatim and untouched tensors are copied byte for byte, so an untouched shard is
byte-identical to the base shard. With ``dtype`` (e.g. "bfloat16") every F16/BF16/F32/F64 tensor is cast and
the header of each shard holding one is rebuilt (metadata kept, offsets recomputed, 8-byte aligned); integer
and fp8 tensors are copied as they are. Updating config.json's dtype is the caller's job.

Pipeline: a reader thread (pread, bounded chunks for untouched tensors, pinned buffers on CUDA; a base shard
that was not in the page cache is dropped from it behind the reads, see _Reader._read_base), the calling
thread computing (on CUDA when device="auto" finds one; IEEE float32 matmuls are forced while it runs, TF32
would lose digits of the delta), and a writer thread hashing while it writes. The writer gathers each file's
bytes in aligned staging buffers and writes them with O_DIRECT where the file system takes it (see _OutFile:
a merged model is written once and not read back soon, and fresh page-cache pages cost more than the merge's
arithmetic); elsewhere it writes through the page cache. Host buffers are reused slabs
under a byte budget (BYTE_BUDGET) and plain Linear deltas are merged on the CPU in blocks of rows (ROW_BLOCK),
so memory stays flat. Files are written as ``.<name>.partial`` and renamed when complete; on any error every
file this call created is removed. ``progress(tensors_done, tensors_total, bytes_done, bytes_total)`` is
called from the calling thread (bytes are output-file bytes, headers included), the last call with the
totals; an exception it raises aborts the merge.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loreg.registry.errors import MergeUnavailableError, MergeUnsupportedError, NonFiniteValuesError
from loreg.registry.formats.safetensors import DTYPE_SIZES, Header, TensorInfo, parse_header

if TYPE_CHECKING:
    from loreg.registry.formats.peft import AdapterConfig
    from loreg.registry.formats.validate import ValidationReport

ProgressFn = Callable[[int, int, int, int], None]

CHUNK_SIZE = 16 << 20  # untouched tensors travel in pieces of at most this many bytes
QUEUE_DEPTH = 4
ROW_BLOCK = 2 << 20  # bytes of float32 rows a Linear weight is merged in at a time (CPU, cache-sized)
ROW_TAIL = 32  # a last block of fewer rows joins the one before (no tiny matmuls: same kernels as PEFT's)
BYTE_BUDGET = 96 << 20  # host buffer bytes the reader may hold in flight (read, queued, being written)
STAGE_SIZE = 8 << 20  # the writer's staging buffers: output bytes go to the file in writes of this size
STAGE_BUFFERS = 3  # one filling, the others being hashed and written
DIRECT_ALIGN = 4096  # O_DIRECT: buffer address, file offset and length multiples of this (any block size up to 4 KiB)
_O_DIRECT = getattr(os, "O_DIRECT", 0)  # Linux, FreeBSD; 0 (always the page cache) elsewhere
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", 0)  # Linux: a read that takes only what the page cache holds
INDEX_NAME = "model.safetensors.index.json"

FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # what the engine computes in or casts to
_DTYPE_ALIASES = {
    "float16": "F16", "fp16": "F16", "half": "F16", "f16": "F16",
    "bfloat16": "BF16", "bf16": "BF16",
    "float32": "F32", "fp32": "F32", "float": "F32", "f32": "F32",
    "float64": "F64", "fp64": "F64", "double": "F64", "f64": "F64",
}
_PEFT_PREFIX = "base_model.model."

# kinds of adapter tensors (the subset of formats.peft's naming rule the merge needs; validation already ran)
_A, _B, _B_BIAS, _EMB_A, _EMB_B, _MAG, _ROWS, _BASE_LAYER, _FULL = (
    "lora_A", "lora_B", "lora_B.bias", "lora_embedding_A", "lora_embedding_B", "magnitude", "rows",
    "base_layer", "full",
)
_SUFFIXES = (
    (".lora_A.weight", _A),
    (".lora_B.weight", _B),
    (".lora_B.bias", _B_BIAS),
    (".lora_embedding_A", _EMB_A),
    (".lora_embedding_B", _EMB_B),
    (".lora_magnitude_vector.weight", _MAG),
    (".lora_magnitude_vector", _MAG),
    (".token_adapter.trainable_tokens_delta", _ROWS),
    (".base_layer.weight", _BASE_LAYER),
    (".base_layer.bias", _BASE_LAYER),
    (".modules_to_save.weight", _FULL),
    (".modules_to_save.bias", _FULL),
)
_LAYERS = ("linear", "conv1d", "embedding", "conv")


# ------------------------------------------------------------------------------------------------
# inputs and outputs


@dataclass(frozen=True)
class AdapterInput:
    config: AdapterConfig
    header: Header
    path: Path
    report: ValidationReport
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
class _Source:
    adapter: int
    key: str
    info: TensorInfo


@dataclass(frozen=True)
class _Lora:
    adapter: int
    module: str
    layer: str
    a: _Source
    b: _Source
    scale: float
    weight: float
    magnitude: _Source | None  # DoRA


@dataclass
class _Ops:
    """What happens to one base tensor, in this order: replace, LoRA deltas, bias deltas, token rows."""

    replace: list[_Source] = field(default_factory=list)  # equal values expected; the first is used
    replace_full: bool = False  # a modules_to_save / trained-bias copy among them (not only .base_layer)
    replace_is_noop: bool = False  # must equal the base (checked when read): several adapters or weight != 1
    lora: list[_Lora] = field(default_factory=list)
    bias: list[tuple[_Source, float]] = field(default_factory=list)  # lora_B.bias, coefficient s·w
    rows: tuple[_Source, tuple[int, ...]] | None = None
    adapters: set[int] = field(default_factory=set)

    def sources(self) -> list[_Source]:
        out = list(self.replace)
        for op in self.lora:
            out += [op.a, op.b] + ([op.magnitude] if op.magnitude else [])
        out += [src for src, _ in self.bias]
        if self.rows:
            out.append(self.rows[0])
        return out


@dataclass(frozen=True)
class _Tensor:
    shard: int
    name: str
    src: TensorInfo  # in the base shard
    out_dtype: str
    ops: _Ops | None


@dataclass(frozen=True)
class MergePlan:
    files: list[PlannedFile]
    tensors: list[list[_Tensor]] = field(repr=False)  # per file, in data order
    touched: frozenset[str]  # base tensors an adapter changes
    dtype: str | None  # the output float dtype when it was changed, else None

    @property
    def tensors_total(self) -> int:
        return sum(len(t) for t in self.tensors)

    @property
    def bytes_total(self) -> int:
        return sum(f.size for f in self.files)


# ------------------------------------------------------------------------------------------------
# planning (headers only)


def _refuse(message: str, **detail: Any) -> MergeUnsupportedError:
    return MergeUnsupportedError(message, detail=detail)


def normalize_dtype(dtype: str | None) -> str | None:
    """"bfloat16" / "bf16" / "BF16" -> "BF16"; None stays None. Raises MergeUnsupportedError for others."""
    if dtype is None:
        return None
    name = _DTYPE_ALIASES.get(str(dtype).lower(), str(dtype).upper())
    if name not in FLOAT_DTYPES:
        raise _refuse(f"output dtype {dtype!r} is not one of float16, bfloat16, float32, float64", dtype=str(dtype))
    return name


def _split_key(key: str) -> tuple[str, str]:
    rest = key[len(_PEFT_PREFIX):] if key.startswith(_PEFT_PREFIX) else key
    for suffix, kind in _SUFFIXES:
        if rest.endswith(suffix):
            return rest[: -len(suffix)], kind
    return rest.rpartition(".")[0], _FULL  # plain <module>.weight / .bias: modules_to_save or a trained bias


def _tied_redirects(report: Any) -> set[str]:
    return {w.get("module") for w in getattr(report, "warnings", ()) or () if w.get("code") == "TIED_REDIRECT"}


def _token_indices(config: Any, module: str) -> list[int] | None:
    indices = getattr(config, "trainable_token_indices", None)
    if isinstance(indices, dict):
        for name, ids in indices.items():
            if module == name or module.endswith("." + name):
                return list(ids)
        return None
    return None if indices is None else list(indices)


def _read_base_header(shard: BaseShard) -> bytes:
    with open(shard.path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        raw = f.read(n) if 0 < n <= size else b""
    if n != shard.header.header_size or len(raw) != n or size != shard.header.file_size:
        raise _refuse(f"base shard {shard.name!r} does not match the header it was given", shard=shard.name)
    if parse_header(raw, file_size=size).tensors != shard.header.tensors:
        raise _refuse(f"base shard {shard.name!r} does not match the header it was given", shard=shard.name)
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


def _expected_delta_shape(layer: str, a: tuple[int, ...], b: tuple[int, ...]) -> tuple[int, ...] | None:
    if layer == "conv":
        if len(a) < 3 or len(b) != len(a) or any(d != 1 for d in b[2:]) or b[1] != a[0]:
            return None
        return (b[0], *a[1:])
    if len(a) != 2 or len(b) != 2 or b[1] != a[0]:
        return None
    if layer == "linear":
        return (b[0], a[1])
    return (a[1], b[0])  # conv1d [in, out]; embedding [vocab, dim]


def _magnitude_shape(layer: str, w: tuple[int, ...]) -> tuple[int, ...]:
    if layer == "linear":
        return (w[0],)
    if layer == "conv":
        return (1, w[0], *([1] * (len(w) - 2)))
    return (w[1],)  # conv1d [in, out] and embedding [vocab, dim]: per column


def _collect(adapters: Sequence[AdapterInput], base: dict[str, TensorInfo]) -> dict[str, _Ops]:
    ops: dict[str, _Ops] = {}
    for index, adapter in enumerate(adapters):
        weight = float(adapter.weight)
        if not math.isfinite(weight):
            raise _refuse(f"adapter {index} has the weight {adapter.weight!r}; weights must be finite", adapter=index)
        try:
            size = os.stat(adapter.path).st_size
        except OSError as exc:
            raise _refuse(f"adapter file {str(adapter.path)!r} cannot be read: {exc}", adapter=index) from None
        if size != adapter.header.file_size:
            raise _refuse(f"adapter file {str(adapter.path)!r} does not match its header", adapter=index)
        key_map: Mapping[str, str | None] = adapter.report.key_map
        tied = _tied_redirects(adapter.report)
        groups: dict[str, dict[str, _Source]] = {}
        replaces: list[tuple[str, str, _Source]] = []
        for key, info in adapter.header.tensors.items():
            if key not in key_map:
                raise _refuse(f"adapter {index}: tensor {key!r} is not mapped by its validation report; "
                              "validate the adapter against this base first", adapter=index, key=key)
            target = key_map[key]
            if target is None:  # original_module copies: the untouched base value, never applied
                continue
            if target not in base:
                raise _refuse(f"adapter {index}: {key!r} feeds {target!r}, which is not in the base shards "
                              "(validated against another base layout?)", adapter=index, key=key, tensor=target)
            if info.dtype not in FLOAT_DTYPES:
                raise _refuse(f"adapter {index}: tensor {key!r} is {info.dtype}", adapter=index, key=key)
            if base[target].dtype not in FLOAT_DTYPES:
                raise _refuse(f"base tensor {target!r} is {base[target].dtype}; loreg merges into float tensors only",
                              tensor=target, dtype=base[target].dtype)
            module, kind = _split_key(key)
            if kind == _BASE_LAYER and key.endswith(".bias") and getattr(adapter.config, "bias", "none") != "none":
                kind = _FULL  # a trained bias (bias="all"/"lora_only"), not a copy of the base
            src = _Source(index, key, info)
            if kind in (_FULL, _BASE_LAYER):
                replaces.append((module, kind, src))
            else:
                if kind in groups.setdefault(module, {}):
                    raise _refuse(f"adapter {index}: {module} has two {kind} tensors", adapter=index, module=module)
                groups[module][kind] = src

        for module, kind, src in replaces:
            target = key_map[src.key]
            assert target is not None
            if tuple(src.info.shape) != tuple(base[target].shape):
                raise _refuse(f"adapter {index}: {src.key!r} is {list(src.info.shape)} but {target} is "
                              f"{list(base[target].shape)} (a resized vocabulary cannot be merged into the base "
                              "layout)", adapter=index, key=src.key)
            if kind == _FULL and module in tied:
                raise _refuse(f"adapter {index}: {src.key!r} replaces {module}, which the base ties to {target}; "
                              "merging would overwrite the input embedding too", adapter=index, key=src.key)
            entry = ops.setdefault(target, _Ops())
            entry.replace.append(src)
            entry.replace_full = entry.replace_full or kind == _FULL
            entry.adapters.add(index)

        for module, kinds in sorted(groups.items()):
            _collect_module(index, adapter, weight, module, kinds, base, ops)
    return ops


def _collect_module(
    index: int, adapter: AdapterInput, weight: float, module: str, kinds: dict[str, _Source],
    base: dict[str, TensorInfo], ops: dict[str, _Ops],
) -> None:
    config, report = adapter.config, adapter.report
    key_map = report.key_map
    if _ROWS in kinds:
        src = kinds.pop(_ROWS)
        target = key_map[src.key]
        indices = _token_indices(config, module)
        w = tuple(base[target].shape)
        if indices is None:
            raise _refuse(f"adapter {index}: {src.key!r} is stored but trainable_token_indices does not name "
                          f"{module}", adapter=index, key=src.key)
        if len(set(indices)) != len(indices) or any(not 0 <= i < w[0] for i in indices) or len(w) != 2:
            raise _refuse(f"adapter {index}: trainable_token_indices for {module} repeat or leave the "
                          f"{w[0]} rows of {target}", adapter=index, key=src.key)
        if tuple(src.info.shape) != (len(indices), w[1]):
            raise _refuse(f"adapter {index}: {src.key!r} is {list(src.info.shape)}, expected "
                          f"{[len(indices), w[1]]}", adapter=index, key=src.key)
        entry = ops.setdefault(target, _Ops())
        if entry.rows is not None:
            raise _refuse(f"two trainable-token tensors replace rows of {target}", tensor=target)
        entry.rows = (src, tuple(indices))
        entry.adapters.add(index)
    if not kinds:
        return

    embedding = _EMB_A in kinds or _EMB_B in kinds
    a_kind, b_kind = (_EMB_A, _EMB_B) if embedding else (_A, _B)
    a, b = kinds.get(a_kind), kinds.get(b_kind)
    if a is None or b is None or (embedding and (_A in kinds or _B in kinds)):
        raise _refuse(f"adapter {index}: {module} does not have exactly one lora A/B pair", adapter=index,
                      module=module, tensors=sorted(s.key for s in kinds.values()))
    target = key_map[a.key]
    if key_map[b.key] != target:
        raise _refuse(f"adapter {index}: the A and B tensors of {module} feed different base tensors",
                      adapter=index, module=module)
    layer = report.layer_types.get(module)
    scale = report.scalings.get(module)
    if layer not in _LAYERS or scale is None or not math.isfinite(scale):
        raise _refuse(f"adapter {index}: the validation report gives no layer type or scaling for {module}",
                      adapter=index, module=module)
    if embedding != (layer == "embedding"):
        raise _refuse(f"adapter {index}: {module} has {a_kind} tensors but its layer type is {layer}",
                      adapter=index, module=module)
    w = tuple(base[target].shape)
    expected = _expected_delta_shape(layer, tuple(a.info.shape), tuple(b.info.shape))
    if expected != w:
        raise _refuse(f"adapter {index}: {module} ({layer}) A {list(a.info.shape)} and B {list(b.info.shape)} "
                      f"do not make a delta of {target}'s shape {list(w)}", adapter=index, module=module)

    magnitude = kinds.get(_MAG)
    if magnitude is not None and not getattr(config, "use_dora", False):
        magnitude = None  # PEFT ignores a magnitude vector without use_dora (validation warns)
    elif magnitude is None and getattr(config, "use_dora", False):
        raise _refuse(f"adapter {index}: use_dora is true but {module} has no lora_magnitude_vector",
                      adapter=index, module=module)
    if magnitude is not None:
        if key_map[magnitude.key] != target or tuple(magnitude.info.shape) != _magnitude_shape(layer, w):
            raise _refuse(f"adapter {index}: the DoRA magnitude of {module} is {list(magnitude.info.shape)}, "
                          f"expected {list(_magnitude_shape(layer, w))}", adapter=index, module=module)
    entry = ops.setdefault(target, _Ops())
    entry.lora.append(_Lora(index, module, layer, a, b, scale, weight, magnitude))
    entry.adapters.add(index)

    bias = kinds.get(_B_BIAS)
    if bias is not None:
        if not getattr(config, "lora_bias", False):
            raise _refuse(f"adapter {index}: {bias.key!r} is stored but lora_bias is false in adapter_config.json "
                          "(PEFT would ignore it)", adapter=index, key=bias.key)
        if magnitude is not None:
            raise _refuse(f"adapter {index}: DoRA with lora_bias cannot be merged", adapter=index, module=module)
        bias_target = key_map[bias.key]
        out = w[1] if layer in ("conv1d", "embedding") else w[0]
        if bias_target is None or tuple(base[bias_target].shape) != (out,) or tuple(bias.info.shape) != (out,):
            raise _refuse(f"adapter {index}: {bias.key!r} does not fit the base bias of {module}",
                          adapter=index, key=bias.key)
        bias_entry = ops.setdefault(bias_target, _Ops())
        bias_entry.bias.append((bias, scale * weight))
        bias_entry.adapters.add(index)


def _check_combinations(ops: dict[str, _Ops], adapters: Sequence[AdapterInput]) -> None:
    for target, entry in ops.items():
        alone = len(entry.adapters) == 1 and all(float(adapters[i].weight) == 1.0 for i in entry.adapters)
        why = ("it is touched by several adapters" if len(entry.adapters) > 1
               else "the adapter's weight is not 1.0")
        if entry.replace:
            if entry.replace_full and not alone:
                raise _refuse(f"{target} is replaced by a stored copy (modules_to_save or trained bias) and {why}; "
                              "only a single full-weight adapter may replace a tensor", tensor=target)
            # .base_layer copies normally equal the base; then they are no-ops and combine with anything
            entry.replace_is_noop = not alone
        doras = [op for op in entry.lora if op.magnitude is not None]
        if doras and (not alone or len(entry.lora) > 1):
            raise _refuse(f"DoRA on {target} can only be merged from a single adapter with weight 1.0 "
                          f"({why if not alone else 'two modules feed it'})", tensor=target)
        if entry.rows is not None and (not alone or entry.lora or entry.bias or entry.replace):
            raise _refuse(f"trainable-token rows of {target} can only be merged alone, from a single adapter "
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
        raise _refuse("no base shards given")
    if len(set(names)) != len(names) or any(not n or "/" in n or n.startswith(".") for n in names):
        raise _refuse("base shard names must be unique plain file names", shards=names)
    base: dict[str, TensorInfo] = {}
    for shard in shards:
        for name, info in shard.header.tensors.items():
            if name in base:
                raise _refuse(f"tensor {name!r} appears in two base shards", tensor=name)
            base[name] = info
    ops = _collect(adapters, base)
    _check_combinations(ops, adapters)

    def cast(dt: str) -> str:
        return out_dtype if out_dtype is not None and dt in FLOAT_DTYPES else dt

    files: list[PlannedFile] = []
    tensors: list[list[_Tensor]] = []
    for index, shard in enumerate(shards):
        entries = []
        tensors.append([])
        for name, info in shard.header.tensors.items():
            dt = cast(info.dtype)
            tensors[-1].append(_Tensor(index, name, info, dt, ops.get(name)))
            entries.append((name, dt, info.shape, info.numel * DTYPE_SIZES[dt]))
        # only a shard with a tensor of another dtype gets a new header; the others stay byte-identical
        rebuild = any(e[1] != i.dtype for e, i in zip(entries, shard.header.tensors.values(), strict=True))
        header_bytes = _build_header(entries, shard.header.metadata) if rebuild else _read_base_header(shard)
        data_size = sum(e[3] for e in entries)
        files.append(PlannedFile(shard.name, header_bytes, len(header_bytes) + data_size, data_size, rebuild))
    rebuilt = any(f.rebuilt for f in files)
    return MergePlan(files=files, tensors=tensors, touched=frozenset(ops), dtype=out_dtype if rebuilt else None)


# ------------------------------------------------------------------------------------------------
# merging


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise MergeUnavailableError("merging needs torch; install loreg[merge]", hint="pip install 'loreg[merge]'") \
            from None
    return torch


def _torch_dtype(torch: Any, name: str) -> Any:
    return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}[name]


def resolve_device(device: str = "auto") -> str:
    """"auto" -> "cuda" when torch sees a GPU, else "cpu"; an explicit CUDA device must exist."""
    torch = _import_torch()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MergeUnavailableError(f"device {device!r} was asked for but torch sees no CUDA device")
    if device != "cpu" and not device.startswith("cuda"):
        raise MergeUnsupportedError(f"device {device!r} is not 'auto', 'cpu' or 'cuda[:N]'")
    return device


@contextlib.contextmanager
def _on_device(torch: Any, device: str) -> Iterator[None]:
    """Make ``device`` current and force IEEE float32 matmuls: TF32 would keep ~3 decimal digits of a delta."""
    if not device.startswith("cuda"):
        yield
        return
    matmul = torch.backends.cuda.matmul
    name = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    old = getattr(matmul, name)
    setattr(matmul, name, "ieee" if name == "fp32_precision" else False)
    try:
        with torch.cuda.device(torch.device(device)):
            yield
    finally:
        setattr(matmul, name, old)


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    while len(view):
        n = os.preadv(fd, [view], offset)
        if n <= 0:
            raise MergeUnsupportedError("a file ended before the tensor it should hold", detail={"offset": offset})
        view, offset = view[n:], offset + n


class _Stop(Exception):
    pass


def _put(q: queue.Queue[Any], item: Any, stop: threading.Event) -> None:
    while True:
        if stop.is_set():
            raise _Stop
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


_DONE = object()
_POOL_MIN = 1 << 20  # smaller buffers come from malloc's heap, which reuses them anyway


class _Pool:
    """Reused uint8 host buffers ("slabs") and a budget on the bytes in flight between the three threads.

    Fresh multi-MB buffers for every tensor or chunk cost a page fault per 4 KiB (and the kernel zeroing the
    page). Every buffer of at least ``_POOL_MIN`` bytes and at most ``slab`` bytes (the largest touched tensor,
    read or written, or a chunk) is a view of one slab, so any idle slab serves any request; the writer hands
    them back. ``take`` blocks while ``budget`` bytes are out (unless nothing is out: one tensor larger than
    the budget still passes); ``take(wait=False)`` (the calling thread's output buffers) never blocks, since
    the reader's budget already bounds what the calling thread can produce. A pooled buffer counts as a
    whole slab against the budget (that is the memory it holds). Idle slabs are kept until the merge ends.
    """

    def __init__(self, torch: Any, budget: int, slab: int, pinned: bool, stop: threading.Event):
        self.torch, self.budget, self.slab, self.pinned, self.stop = torch, budget, slab, pinned, stop
        self.cond = threading.Condition()
        self.idle: list[Any] = []
        self.slabs: dict[int, Any] = {}  # data_ptr -> slab, for every slab handed out
        self.out = 0  # bytes taken and not given back

    def charge(self, nbytes: int) -> int:
        """The bytes a buffer of ``nbytes`` counts against the budget."""
        return self.slab if _POOL_MIN <= nbytes <= self.slab else nbytes

    def reserve(self, nbytes: int) -> None:
        """Wait for room for ``nbytes`` and count them; ``take(..., reserved=True)`` then hands them out."""
        with self.cond:
            while self.out and self.out + nbytes > self.budget:
                if self.stop.is_set():
                    raise _Stop
                self.cond.wait(0.1)
            self.out += nbytes

    def take(self, nbytes: int, wait: bool = True, reserved: bool = False) -> Any:
        if wait and not reserved:
            self.reserve(self.charge(nbytes))
        elif not reserved:
            with self.cond:
                self.out += self.charge(nbytes)
        if not _POOL_MIN <= nbytes <= self.slab:
            return self.torch.empty(nbytes, dtype=self.torch.uint8, pin_memory=self.pinned and nbytes > 0)
        with self.cond:
            slab = self.idle.pop() if self.idle else None
        if slab is None:
            slab = self.torch.empty(self.slab, dtype=self.torch.uint8, pin_memory=self.pinned)
        with self.cond:
            self.slabs[slab.data_ptr()] = slab
        return slab[:nbytes]

    def give(self, view: Any) -> None:
        with self.cond:
            self.out -= self.charge(view.numel())
            slab = self.slabs.pop(view.data_ptr(), None) if view.numel() >= _POOL_MIN else None
            if slab is not None:  # kept: there are never more slabs than the peak in flight
                self.idle.append(slab)
            self.cond.notify_all()


class _Reader(threading.Thread):
    """Reads tensors in file order: untouched ones in chunks, touched ones whole with their adapter tensors."""

    def __init__(self, plan: MergePlan, shards: Sequence[BaseShard], adapters: Sequence[AdapterInput],
                 pool: _Pool, out: queue.Queue[Any], stop: threading.Event, torch: Any):
        super().__init__(name="loreg-merge-reader", daemon=True)
        self.plan, self.shards, self.adapters = plan, shards, adapters
        self.pool, self.out, self.stop, self.torch = pool, out, stop, torch
        self.error: BaseException | None = None
        self.nowait = bool(_RWF_NOWAIT) and hasattr(os, "posix_fadvise")  # drop-behind for cold base reads
        self.cold = False  # the current shard was found outside the page cache

    def buffer(self, fd: int, offset: int, nbytes: int, reserved: bool = False, base: bool = False) -> Any:
        buf = self.pool.take(nbytes, reserved=reserved)
        if nbytes:
            view = memoryview(buf.numpy())
            if base and self.nowait:
                self._read_base(fd, view, offset)
            else:
                _pread_into(fd, view, offset)
        return buf

    def _read_base(self, fd: int, view: memoryview, offset: int) -> None:
        """Read base bytes; a shard that was not in the page cache is dropped from it as it is read.

        A shard already cached (registered a moment ago, or merged before) stays cached and is read at
        memory speed. A cold one is read once and not kept (drop-behind): the pages just read are freed and
        reused by the next reads, instead of every read taking fresh pages and evicting others (for a model
        larger than memory caching it would only evict everything else; on VMs whose host backs guest memory
        lazily each fresh page costs a host fault). RWF_NOWAIT reads only cached pages: the first read that
        falls short marks the shard cold, for the rest of it (the kernel's readahead then caches pages ahead
        of the reads, which a per-read test would take for a warm file).
        """
        if not self.cold:
            try:
                n = os.preadv(fd, [view], offset, _RWF_NOWAIT)
            except BlockingIOError:
                n = 0  # the first page is not cached
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self.nowait = False  # this file system cannot tell: plain reads from now on
                _pread_into(fd, view, offset)
                return
            if n >= len(view):
                return
            self.cold = True
            view, offset = view[n:], offset + n
        _pread_into(fd, view, offset)
        os.posix_fadvise(fd, offset, len(view), os.POSIX_FADV_DONTNEED)

    def run(self) -> None:
        fds: list[int] = []
        try:
            for adapter in self.adapters:
                fds.append(os.open(adapter.path, os.O_RDONLY))
            for index, shard in enumerate(self.shards):
                fd = os.open(shard.path, os.O_RDONLY)
                self.cold = False
                try:
                    _put(self.out, ("open", index), self.stop)
                    for t in self.plan.tensors[index]:
                        self.read(fd, shard, t, fds)
                    _put(self.out, ("close", index), self.stop)
                finally:
                    os.close(fd)
            _put(self.out, _DONE, self.stop)
        except _Stop:
            pass
        except BaseException as exc:  # handed to the calling thread
            self.error = exc
            self.stop.set()
        finally:
            for fd in fds:
                os.close(fd)

    def read(self, fd: int, shard: BaseShard, t: _Tensor, adapter_fds: list[int]) -> None:
        start = shard.header.data_offset + t.src.start
        if t.ops is not None:
            sources = t.ops.sources()
            sizes = [t.src.nbytes] + [src.info.nbytes for src in sources]
            self.pool.reserve(sum(map(self.pool.charge, sizes)))  # all of them or none: no deadlock
            base_buf = self.buffer(fd, start, t.src.nbytes, reserved=True, base=True)
            loaded = {}
            for src in sources:
                offset = self.adapters[src.adapter].header.data_offset + src.info.start
                loaded[(src.adapter, src.key)] = self.buffer(adapter_fds[src.adapter], offset, src.info.nbytes,
                                                             reserved=True)
            _put(self.out, ("tensor", t, base_buf, loaded), self.stop)
            return
        step = CHUNK_SIZE - CHUNK_SIZE % DTYPE_SIZES[t.src.dtype]
        position, end = start, start + t.src.nbytes
        while True:
            n = min(step, end - position)
            data = self.buffer(fd, position, n, base=True)  # a cast is done on the CPU by the calling thread
            position += n
            _put(self.out, ("chunk", t, data, position == end), self.stop)
            if position == end:
                return


class _Writer(threading.Thread):
    """Writes and hashes the output files; counts what is done for progress."""

    def __init__(self, plan: MergePlan, out_dir: Path, inbox: queue.Queue[Any], stop: threading.Event, torch: Any,
                 pool: _Pool):
        super().__init__(name="loreg-merge-writer", daemon=True)
        self.plan, self.out_dir, self.inbox, self.stop, self.torch = plan, out_dir, inbox, stop, torch
        self.pool = pool
        self.outputs: list[OutputFile] = []
        self.created: list[Path] = []
        self.error: BaseException | None = None
        self.done = (0, 0)  # tensors, bytes

    def run(self) -> None:
        f: _OutFile | None = None
        changed = False
        tensors, nbytes = 0, 0
        planned: PlannedFile | None = None
        partial: Path | None = None
        staging = _Staging(self.torch)  # reused for every file
        try:
            while True:
                if self.stop.is_set():
                    return  # an error elsewhere: the caller removes what was written
                try:
                    item = self.inbox.get(timeout=0.1)
                except queue.Empty:
                    continue
                if item is _DONE:
                    return
                kind = item[0]
                if kind == "open":
                    planned = self.plan.files[item[1]]
                    partial = self.out_dir / f".{planned.name}.partial"
                    self.created.append(partial)
                    f = _OutFile(partial, staging)
                    f.write(self.torch.frombuffer(bytearray(planned.header_bytes), dtype=self.torch.uint8))
                    changed = planned.rebuilt
                    nbytes += len(planned.header_bytes)
                elif kind == "data":
                    assert f is not None
                    _, data, last, event, original, release = item
                    if event is not None:
                        event.synchronize()
                    f.write(data)  # a uint8 tensor
                    if original is not None and not changed:
                        changed = not self.torch.equal(data, original)  # a fast memcmp on uint8 tensors
                    nbytes += data.numel()
                    tensors += last
                    del data, original
                    for buf in release:  # reused by the reader and the calling thread
                        self.pool.give(buf)
                    del release
                elif kind == "close":
                    assert f is not None and planned is not None and partial is not None
                    digest = f.close()
                    f = None
                    final = self.out_dir / planned.name
                    os.replace(partial, final)
                    self.created.append(final)
                    size = final.stat().st_size
                    if size != planned.size:
                        raise RuntimeError(f"wrote {size} bytes to {planned.name}, planned {planned.size}")
                    self.outputs.append(OutputFile(planned.name, size, digest, changed, planned.data_size))
                self.done = (tensors, nbytes)
        except BaseException as exc:
            self.error = exc
            self.stop.set()
        finally:
            if f is not None:
                f.abandon()
            staging.close()


class _Staging:
    """Page-aligned staging buffers, an I/O thread and a hashing thread: while one buffer fills, the one
    before it is hashed and written at the same time (both only read it; each thread keeps file order)."""

    def __init__(self, torch: Any):
        self.buffers = [mmap.mmap(-1, STAGE_SIZE) for _ in range(STAGE_BUFFERS)]
        self.tensors = [torch.frombuffer(b, dtype=torch.uint8) for b in self.buffers]  # copies release the GIL
        self.io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loreg-merge-io")
        self.hashing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loreg-merge-hash")

    def close(self) -> None:
        self.io.shutdown(wait=True)
        self.hashing.shutdown(wait=True)
        self.tensors.clear()  # the tensors view the buffers: they must go first
        for b in self.buffers:
            # after a failed write, the traceback's frames may still hold a view: the buffer goes with them
            with contextlib.suppress(BufferError):
                b.close()


class _OutFile:
    """One output file, hashed and written in STAGE_SIZE pieces from page-aligned staging buffers.

    With O_DIRECT (where the file system accepts it) the pieces go from the staging buffers to the device, not
    through the page cache: the merged model is written once and read back later if at all, so caching it
    only evicts pages worth keeping (the base's), and on VMs whose host backs guest memory lazily each fresh
    cache page costs a host fault (2 GB of buffered writes measured ~3.5 s of system time there, O_DIRECT
    ~0.7 s). The last piece is padded to DIRECT_ALIGN and the file truncated to its size. A file system that
    refuses O_DIRECT at open, or a write with EINVAL, gets plain buffered writes instead. While the calling
    thread fills one buffer, the staging threads hash and write the pieces before it (sha256 of the output is
    the largest CPU cost of a merge: off the calling thread, it overlaps the copying and the arithmetic).
    """

    def __init__(self, path: Path, staging: _Staging):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        self.direct = False
        self.fd = -1
        if _O_DIRECT:
            with contextlib.suppress(OSError):
                self.fd = os.open(path, flags | _O_DIRECT, 0o644)
                self.direct = True
        if self.fd < 0:
            self.fd = os.open(path, flags, 0o644)
        self.staging = staging
        self.current = 0  # the staging buffer being filled
        self.pending: list[list[Future[None]]] = [[] for _ in staging.buffers]  # each buffer's hash and write
        self.fill = 0  # bytes in the current buffer
        self.offset = 0  # file offset of the current buffer's first byte
        self.hasher = hashlib.sha256()

    def write(self, data: Any) -> None:
        """Append ``data``, a uint8 tensor."""
        flat = data.reshape(-1)
        start, total = 0, flat.numel()
        while start < total:
            n = min(total - start, STAGE_SIZE - self.fill)
            self.staging.tensors[self.current][self.fill:self.fill + n].copy_(flat[start:start + n])
            self.fill += n
            start += n
            if self.fill == STAGE_SIZE:
                self._flush()

    def _flush(self) -> None:
        """Hand the current buffer to the hashing and I/O threads; go on with the next once it is free."""
        i = self.current
        view = memoryview(self.staging.buffers[i])[:self.fill]
        self.pending[i] = [self.staging.hashing.submit(self.hasher.update, view),
                           self.staging.io.submit(self._pwrite, i, self.fill, self.offset)]
        del view
        self.offset += self.fill
        self.fill = 0
        self.current = (i + 1) % len(self.staging.buffers)
        self._wait(self.current)

    def _wait(self, i: int) -> None:
        pending, self.pending[i] = self.pending[i], []
        for future in pending:
            future.result()

    def _pwrite(self, i: int, length: int, position: int) -> None:
        view = memoryview(self.staging.buffers[i])[:length]
        while len(view):
            try:
                n = os.pwrite(self.fd, view, position)
            except OSError as exc:
                if exc.errno != errno.EINVAL or not self.direct:
                    raise
                # accepted at open, refused on write (alignment, some FUSE/network file systems)
                fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~_O_DIRECT)
                self.direct = False
                continue
            if n <= 0:
                raise OSError("write returned 0")
            view, position = view[n:], position + n

    def close(self) -> str:
        """Write what is staged, set the exact size, close; returns "sha256:<hex>" of the file's bytes."""
        try:
            for i in range(len(self.pending)):
                self._wait(i)
            if self.fill:  # the last piece, written here: zero-padded for O_DIRECT, truncated after
                i, length = self.current, self.fill
                self.hasher.update(memoryview(self.staging.buffers[i])[:length])
                if self.direct and length % DIRECT_ALIGN:
                    padded = length + DIRECT_ALIGN - length % DIRECT_ALIGN
                    self.staging.buffers[i][length:padded] = bytes(padded - length)
                    length = padded
                self._pwrite(i, length, self.offset)
                self.offset += self.fill
                self.fill = 0
            os.ftruncate(self.fd, self.offset)  # drops the padding (also if that write fell back to buffered)
        finally:
            self.abandon()
        return "sha256:" + self.hasher.hexdigest()

    def abandon(self) -> None:
        """Close without finishing (after an error): writes in flight end first, their errors dropped."""
        for i in range(len(self.pending)):
            with contextlib.suppress(Exception):
                self._wait(i)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _as_tensor(torch: Any, buf: Any, dtype: str, shape: tuple[int, ...], device: str, compute: Any) -> Any:
    t = buf.to(device, non_blocking=True) if device != "cpu" else buf
    t = t.view(_torch_dtype(torch, dtype)).reshape(shape)
    return t if compute is None else t.to(compute)


def _scratch(torch: Any, scratch: dict[str, Any], key: str, shape: Sequence[int], dtype: Any, device: str) -> Any:
    """A reused buffer of ``shape``: fresh multi-MB tensors for every tensor cost a page fault per 4 KiB."""
    numel = math.prod(shape)
    buf = scratch.get(key)
    if buf is None or buf.numel() < numel or buf.dtype != dtype:
        buf = scratch[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(*shape)


def _delta(torch: Any, op: _Lora, a: Any, b: Any, shape: tuple[int, ...], scratch: dict[str, Any]) -> Any:
    if op.layer == "conv":
        b2, a2 = b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1)
        d = torch.mm(b2, a2, out=_scratch(torch, scratch, "delta", (b2.shape[0], a2.shape[1]), a.dtype, a.device))
        d = d.reshape(shape)
    else:
        d = torch.mm(b, a, out=_scratch(torch, scratch, "delta", (b.shape[0], a.shape[1]), a.dtype, a.device))
        if op.layer in ("conv1d", "embedding"):
            d = d.T
    # PEFT multiplies (B @ A) by the scale afterwards; the same order keeps the result bit-identical
    d.mul_(op.scale)
    if op.weight != 1.0:
        d.mul_(op.weight)
    return d


def _dora(torch: Any, op: _Lora, v: Any, m: Any) -> Any:
    if op.layer == "linear":
        norm = torch.linalg.norm(v, dim=1)
        return v * (m.reshape(-1) / norm).view(-1, 1)
    if op.layer in ("conv1d", "embedding"):
        norm = torch.linalg.norm(v.T, dim=1)  # per column: output unit of [in, out], embedding dim of [vocab, dim]
        return v * (m.reshape(-1) / norm).view(1, -1)
    dims = tuple(range(1, v.dim()))
    norm = v.norm(p=2, dim=dims)
    return v * (m.reshape(-1) / norm).view(-1, *([1] * (v.dim() - 1)))


def _all_finite(torch: Any, x: Any) -> bool:
    """Whether every element of ``x`` is finite.

    A sum is finite only if every element is (NaN and inf propagate), and on the CPU it costs a small
    fraction of ``isfinite(x).all()`` (about 60 us against 6.5 ms for a 2 MiB float32 block); a sum that
    overflows with finite elements only sends the block to the exact check. float16 sums in float32:
    its own range is too small for the sum of a block.
    """
    total = x.sum(dtype=torch.float32) if x.dtype == torch.float16 else x.sum()
    return math.isfinite(float(total)) or bool(torch.isfinite(x).all())


def _require_finite(torch: Any, t: _Tensor, wide: Any, out: Any) -> None:
    """Refuse a merged block that is not finite in the output dtype, naming the tensor.

    One check of the cast result covers both failures (NaN and inf survive every cast); only a failing
    block is looked at again, in the compute dtype, to tell which one it was.
    """
    if _all_finite(torch, out):
        return
    compute = "float64" if wide.dtype == torch.float64 else "float32"
    if not bool(torch.isfinite(wide).all()):
        raise NonFiniteValuesError(
            f"the merged tensor {t.name} holds NaN or inf values in {compute}", detail={"tensor": t.name},
            hint="lower the export weights; an adapter or base tensor with huge values overflows the merge")
    raise NonFiniteValuesError(
        f"the merged tensor {t.name} overflows {t.out_dtype}: finite in {compute}, inf after the cast",
        detail={"tensor": t.name, "dtype": t.out_dtype},
        hint="lower the export weights, or export with a wider dtype (bfloat16 or float32)")


def _require_cast_finite(torch: Any, t: _Tensor, src: Any, out: Any) -> None:
    """A dtype change of an untouched tensor must not turn finite base values into inf (float32 -> float16)."""
    if _all_finite(torch, out) or not bool((torch.isfinite(src) & ~torch.isfinite(out)).any()):
        return  # non-finite values the base already held are copied as they are
    raise NonFiniteValuesError(
        f"the base tensor {t.name} overflows {t.out_dtype}: finite as {t.src.dtype}, inf after the cast",
        detail={"tensor": t.name, "dtype": t.out_dtype}, hint="export with a wider dtype (bfloat16 or float32)")


def _row_blocked(t: _Tensor, device: str, out: Any) -> bool:
    """Whether ``t`` can be merged block of rows by block of rows: plain Linear LoRA deltas on the CPU.

    Row i of B@A is row i of B times A, and splitting a matmul by rows of its left operand keeps every
    element's sum in the same order (checked bit for bit against the full product), so each block is what
    PEFT's full-tensor merge gives for those rows, without tensor-sized float32 copies.
    """
    ops = t.ops
    return (out is not None and device == "cpu" and ops is not None and bool(ops.lora) and len(t.src.shape) == 2
            and not ops.replace and not ops.replace_is_noop and not ops.bias and ops.rows is None
            and all(op.layer == "linear" and op.magnitude is None for op in ops.lora)
            and t.src.shape[0] >= 2 * ROW_TAIL)


def _merge_rows(torch: Any, t: _Tensor, base_buf: Any, loaded: dict[tuple[int, str], Any], compute: Any,
                scratch: dict[str, Any], out: Any) -> Any:
    assert t.ops is not None
    rows, cols = t.src.shape
    src = base_buf.view(_torch_dtype(torch, t.src.dtype)).view(rows, cols)
    dst = out.view(_torch_dtype(torch, t.out_dtype)).view(rows, cols)
    factors = []
    for op in t.ops.lora:
        a = _as_tensor(torch, loaded[(op.a.adapter, op.a.key)], op.a.info.dtype, tuple(op.a.info.shape), "cpu",
                       compute)
        b = _as_tensor(torch, loaded[(op.b.adapter, op.b.key)], op.b.info.dtype, tuple(op.b.info.shape), "cpu",
                       compute)
        factors.append((op, a, b))
    step = max(ROW_TAIL, ROW_BLOCK // (cols * 4))
    i = 0
    while i < rows:
        j = min(i + step, rows)
        if rows - j < ROW_TAIL:
            j = rows
        w = _scratch(torch, scratch, "rows_w", (j - i, cols), compute, "cpu").copy_(src[i:j])
        for op, a, b in factors:
            d = torch.mm(b[i:j], a, out=_scratch(torch, scratch, "rows_d", (j - i, cols), compute, "cpu"))
            d.mul_(op.scale)  # PEFT's order: (B @ A) * scale, then added
            if op.weight != 1.0:
                d.mul_(op.weight)
            w += d
        _require_finite(torch, t, w, dst[i:j].copy_(w))
        i = j
    return dst


def _merge_tensor(torch: Any, t: _Tensor, base_buf: Any, loaded: dict[tuple[int, str], Any], device: str,
                  scratch: dict[str, Any] | None = None, out: Any = None) -> Any:
    """The merged tensor in the output dtype; ``scratch`` holds buffers reused from one tensor to the next.

    With ``out`` (a uint8 buffer of the output's size, on the computing device) the result is cast into it.
    """
    ops = t.ops
    assert ops is not None
    scratch = {} if scratch is None else scratch
    wide = "F64" in (t.src.dtype, t.out_dtype)
    compute = torch.float64 if wide else torch.float32
    shape = tuple(t.src.shape)
    if _row_blocked(t, device, out):
        return _merge_rows(torch, t, base_buf, loaded, compute, scratch, out)
    # a copy, never the read buffer itself (the writer compares against it), into a reused buffer
    src = _as_tensor(torch, base_buf, t.src.dtype, shape, device, None)
    w = _scratch(torch, scratch, "weight", shape, compute, src.device).copy_(src)
    work = w

    def get(src: _Source) -> Any:
        return _as_tensor(torch, loaded[(src.adapter, src.key)], src.info.dtype, tuple(src.info.shape), device,
                          compute)

    if ops.replace_is_noop:
        for src in ops.replace:
            if not torch.equal(get(src), w):
                raise _refuse(f"adapter {src.adapter}: {src.key!r} replaces {t.name} with different values, and a "
                              "replaced tensor can only be merged from a single adapter with weight 1.0",
                              tensor=t.name, adapter=src.adapter, key=src.key)
    elif ops.replace:
        first = get(ops.replace[0])
        for other in ops.replace[1:]:
            if not torch.equal(get(other), first):
                raise _refuse(f"adapter {other.adapter} holds two different stored copies of {t.name}",
                              tensor=t.name, keys=[s.key for s in ops.replace])
        w = first.clone()
    for op in ops.lora:
        d = _delta(torch, op, get(op.a), get(op.b), shape, scratch)
        if op.magnitude is not None:
            w = _dora(torch, op, w + d, get(op.magnitude))
        else:
            w += d
    for src, coeff in ops.bias:
        w += get(src) * coeff  # coeff = scale · weight (weight is 1.0 for a PEFT-equal merge)
    if ops.rows is not None:
        src, indices = ops.rows
        w.index_copy_(0, torch.tensor(indices, dtype=torch.long, device=w.device), get(src))
    if out is not None:  # the same rounding as .to(), without a fresh tensor-sized allocation
        result = out.view(_torch_dtype(torch, t.out_dtype)).view(shape).copy_(w)
        _require_finite(torch, t, w, result)
        return result
    result = w.to(_torch_dtype(torch, t.out_dtype))
    _require_finite(torch, t, w, result)
    return result.clone() if result.data_ptr() == work.data_ptr() else result  # the scratch buffer is used again


def merge_to_dir(
    shards: Sequence[BaseShard],
    adapters: Sequence[AdapterInput],
    out_dir: Path,
    *,
    dtype: str | None = None,
    device: str = "auto",
    progress: ProgressFn | None = None,
) -> list[OutputFile]:
    """Write the merged model's shards into ``out_dir`` (created if missing), one per base shard.

    Args:
        shards: the base's safetensors files, local, in the order to write them.
        adapters: validated against this base; merged as base + Σ weight·Δ.
        dtype: output float dtype ("bfloat16", "float16", "float32", "float64"); None keeps the base's.
        device: "auto" (CUDA if available), "cpu", or "cuda[:N]".
        progress: called as progress(tensors_done, tensors_total, bytes_done, bytes_total) from the calling
            thread; an exception it raises aborts the merge (a way to cancel).

    Returns:
        One OutputFile per shard, in order, with its sha256 computed while writing.

    Raises:
        MergeUnsupportedError: the merge cannot be done exactly (nothing is left in ``out_dir``).
        MergeUnavailableError: no torch, or a CUDA device asked for and absent.
    """
    plan = plan_merge(shards, adapters, dtype=dtype)
    torch = _import_torch()
    device = resolve_device(device)
    cuda = device.startswith("cuda")
    out_dir = Path(out_dir)
    inputs = [s.path for s in shards] + [a.path for a in adapters]
    for planned in plan.files:
        target = out_dir / planned.name
        if target.exists() and any(os.path.samefile(target, p) for p in inputs):
            raise _refuse(f"{target} is one of the merge's inputs; write to another folder", path=str(target))
    out_dir.mkdir(parents=True, exist_ok=True)

    stop = threading.Event()
    read_q: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_DEPTH)
    write_q: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_DEPTH)
    slab = CHUNK_SIZE  # the largest buffer the pool hands out: a chunk read or cast, a touched tensor or its output
    for tensors in plan.tensors:
        for t in tensors:
            wider = max(1.0, DTYPE_SIZES[t.out_dtype] / DTYPE_SIZES[t.src.dtype])
            slab = max(slab, math.ceil(CHUNK_SIZE * wider) if t.ops is None else
                       math.prod(t.src.shape) * max(DTYPE_SIZES[t.src.dtype], DTYPE_SIZES[t.out_dtype]))
    pool = _Pool(torch, BYTE_BUDGET, slab, cuda, stop)
    reader = _Reader(plan, shards, adapters, pool, read_q, stop, torch)
    writer = _Writer(plan, out_dir, write_q, stop, torch, pool)
    totals = (plan.tensors_total, plan.bytes_total)
    reported: tuple[int, int] | None = None
    last_call = 0.0

    def tick(final: bool = False) -> None:
        nonlocal reported, last_call
        if progress is None:
            return
        done = totals if final else writer.done
        now = time.monotonic()
        if done == reported or (not final and reported and done[0] == reported[0] and now - last_call < 0.1):
            return
        reported, last_call = done, now
        progress(done[0], totals[0], done[1], totals[1])

    ok = False
    reader.start()
    writer.start()
    try:
        with _on_device(torch, device):
            _pump(torch, device, read_q, write_q, reader, writer, stop, tick, pool)
        _put(write_q, _DONE, stop)
        writer.join()
        if writer.error is not None:
            raise writer.error
        tick(final=True)
        ok = True
        return list(writer.outputs)
    except _Stop:
        raise writer.error or reader.error or RuntimeError("merge stopped") from None
    finally:
        stop.set()
        reader.join()
        writer.join()
        if not ok:
            for path in writer.created:
                path.unlink(missing_ok=True)


def _pump(torch: Any, device: str, read_q: queue.Queue[Any], write_q: queue.Queue[Any], reader: _Reader,
          writer: _Writer, stop: threading.Event, tick: Callable[[], None], pool: _Pool) -> None:
    """The calling thread's part: compute what the reader hands over and pass it to the writer."""
    cuda = device.startswith("cuda")
    scratch: dict[str, Any] = {}
    tick()
    while True:
        if writer.error is not None:
            raise writer.error
        try:
            item = read_q.get(timeout=0.1)
        except queue.Empty:
            if not reader.is_alive() and read_q.empty():
                raise reader.error or RuntimeError("the merge reader stopped early") from None
            continue
        if item is _DONE:
            return
        kind = item[0]
        if kind in ("open", "close"):
            _put(write_q, item, stop)
        elif kind == "chunk":
            _, t, data, last = item
            if t.out_dtype != t.src.dtype:  # a torch uint8 buffer from the reader, cast into a pooled one
                src = data.view(_torch_dtype(torch, t.src.dtype))
                out = pool.take(src.numel() * DTYPE_SIZES[t.out_dtype], wait=False)
                cast = out.view(_torch_dtype(torch, t.out_dtype)).copy_(src)
                if DTYPE_SIZES[t.out_dtype] < DTYPE_SIZES[t.src.dtype]:  # only a narrower dtype can overflow
                    _require_cast_finite(torch, t, src, cast)
                pool.give(data)
                data = out
            _put(write_q, ("data", data, last, None, None, (data,)), stop)
        else:
            _, t, base_buf, loaded = item
            host = pool.take(math.prod(t.src.shape) * DTYPE_SIZES[t.out_dtype], wait=False)
            with torch.no_grad():
                event = None
                if cuda:  # copy back into pinned memory; the writer waits on the event, not this thread
                    flat = _merge_tensor(torch, t, base_buf, loaded, device, scratch).reshape(-1)
                    host.view(flat.dtype).copy_(flat, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record()
                else:
                    _merge_tensor(torch, t, base_buf, loaded, device, scratch, out=host)
            original = base_buf if t.out_dtype == t.src.dtype else None
            # every buffer goes back to the pool once written (after the event: CUDA copies read them until then)
            _put(write_q, ("data", host, True, event, original, (host, base_buf, *loaded.values())), stop)
        tick()


# ------------------------------------------------------------------------------------------------
# index


def write_index(
    out_dir: Path, outputs: Sequence[OutputFile], base_index_json: bytes | Mapping[str, Any]
) -> OutputFile:
    """Write ``model.safetensors.index.json`` for a sharded output.

    The base's bytes are kept verbatim when the tensor data size is unchanged (so the index dedupes to the
    base's blob); otherwise ``metadata.total_size`` is updated. The weight_map must name only output files.
    """
    raw = bytes(base_index_json) if isinstance(base_index_json, (bytes, bytearray)) else None
    index = json.loads(raw) if raw is not None else json.loads(json.dumps(base_index_json))
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise _refuse("the base's model.safetensors.index.json has no weight_map")
    names = {o.name for o in outputs}
    missing = sorted(set(weight_map.values()) - names)
    if missing:
        raise _refuse(f"the base index names shards that were not written: {missing[:5]}", missing=missing[:20])
    total = sum(o.data_size for o in outputs)
    metadata = index.get("metadata")
    if not isinstance(metadata, dict):
        metadata = index["metadata"] = {}
    if raw is None or metadata.get("total_size", total) != total:
        metadata["total_size"] = total
        raw = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode("utf-8")
    path = Path(out_dir) / INDEX_NAME
    partial = path.with_name(f".{INDEX_NAME}.partial")
    partial.write_bytes(raw)
    os.replace(partial, path)
    base_raw = bytes(base_index_json) if isinstance(base_index_json, (bytes, bytearray)) else None
    return OutputFile(INDEX_NAME, len(raw), "sha256:" + hashlib.sha256(raw).hexdigest(), raw != base_raw, 0)
