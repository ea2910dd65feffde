"""Merge engine: a base model's safetensors shards + PEFT LoRA adapters -> merged shards (PEFT_FORMAT.md §4-§5).

Imports only torch (inside functions), numpy, safetensors, ``loreg.registry.errors`` and the pure
``formats`` modules ``lora`` (the LoRA rules) and ``safetensors`` (the header parser): it runs on a bare GPU
machine with no web stack, pydantic or re2 (tests/merge/test_engine_imports.py checks it). The adapters'
``config`` and ``report`` are read by attribute (``plan.AdapterConfigLike`` / ``plan.ReportLike``), so a
caller without ``formats.peft`` may pass look-alikes.

Modules: ``plan`` (headers only: what each adapter does to each base tensor, the output layout),
``pipeline`` (the threads and their typed messages), ``ops`` (the tensor math), ``outfile`` (hashed,
O_DIRECT output files); this module is the entry point.

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
that was not in the page cache is dropped from it behind the reads, see pipeline.Reader._read_base), the calling
thread computing (on CUDA when device="auto" finds one; IEEE float32 matmuls are forced while it runs, TF32
would lose digits of the delta), and a writer thread hashing while it writes. The writer gathers each file's
bytes in aligned staging buffers and writes them with O_DIRECT where the file system takes it (see outfile.OutFile:
a merged model is written once and not read back soon, and fresh page-cache pages cost more than the merge's
arithmetic); elsewhere it writes through the page cache. Host buffers are reused slabs
under a byte budget (BYTE_BUDGET) and plain Linear deltas are merged on the CPU in blocks of rows (ROW_BLOCK),
so memory stays flat. Files are written as ``.<name>.partial`` and renamed when complete; on any error every
file this call created is removed. ``progress(tensors_done, tensors_total, bytes_done, bytes_total)`` is
called from the calling thread (bytes are output-file bytes, headers included), the last call with the
totals; an exception it raises aborts the merge.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from loreg.registry.merge import ops, pipeline
from loreg.registry.merge.pipeline import ProgressFn
from loreg.registry.merge.plan import (
    MERGE_DTYPES,
    AdapterInput,
    BaseShard,
    MergePlan,
    OutputFile,
    PlannedFile,
    normalize_dtype,
    plan_merge,
    refuse,
)

__all__ = [
    "INDEX_NAME", "MERGE_DTYPES", "AdapterInput", "BaseShard", "MergePlan", "OutputFile", "PlannedFile",
    "ProgressFn", "merge_to_dir", "normalize_dtype", "plan_merge", "resolve_device", "write_index",
]

INDEX_NAME = "model.safetensors.index.json"
resolve_device = ops.resolve_device


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
    torch = ops.import_torch()
    device = ops.resolve_device(device)
    out_dir = Path(out_dir)
    inputs = [s.path for s in shards] + [a.path for a in adapters]
    for planned in plan.files:
        target = out_dir / planned.name
        if target.exists() and any(os.path.samefile(target, p) for p in inputs):
            raise refuse(f"{target} is one of the merge's inputs; write to another folder", path=str(target))
    out_dir.mkdir(parents=True, exist_ok=True)
    return pipeline.run(plan, shards, adapters, out_dir, torch, device, progress)


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
        raise refuse("the base's model.safetensors.index.json has no weight_map")
    names = {o.name for o in outputs}
    missing = sorted(set(weight_map.values()) - names)
    if missing:
        raise refuse(f"the base index names shards that were not written: {missing[:5]}", missing=missing[:20])
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
