"""The merge's tensor math: ΔW per layer kind, DoRA, stored copies and token rows, finite checks (PEFT_FORMAT.md §4-§5).

torch is passed in (imported by ``import_torch`` when a merge starts), so importing this module costs nothing.
Every function takes a planned tensor and the raw uint8 buffers the reader filled and returns the merged
tensor in the output dtype: float32 arithmetic (float64 for F64 tensors), one rounding at the end.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

from loreg.registry.errors import MergeUnavailableError, MergeUnsupportedError, NonFiniteValuesError
from loreg.registry.formats import lora
from loreg.registry.formats.safetensors import DTYPE_SIZES
from loreg.registry.merge.plan import LoraOp, PlannedTensor, Source, refuse

ROW_BLOCK = 2 << 20  # bytes of float32 rows a Linear weight is merged in at a time (CPU, cache-sized)
ROW_TAIL = 32  # a last block of fewer rows joins the one before (no tiny matmuls: same kernels as PEFT's)

Loaded = dict[tuple[int, str], Any]  # (adapter index, key) -> uint8 buffer of that adapter tensor


def import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise MergeUnavailableError("merging needs torch; install loreg[merge]", hint="pip install 'loreg[merge]'") \
            from None
    return torch


def torch_dtype(torch: Any, name: str) -> Any:
    return {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}[name]


def resolve_device(device: str = "auto") -> str:
    """"auto" -> "cuda" when torch sees a GPU, else "cpu"; an explicit CUDA device must exist."""
    torch = import_torch()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MergeUnavailableError(f"device {device!r} was asked for but torch sees no CUDA device")
    if device != "cpu" and not device.startswith("cuda"):
        raise MergeUnsupportedError(f"device {device!r} is not 'auto', 'cpu' or 'cuda[:N]'")
    return device


@contextlib.contextmanager
def on_device(torch: Any, device: str) -> Iterator[None]:
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



def _as_tensor(torch: Any, buf: Any, dtype: str, shape: tuple[int, ...], device: str, compute: Any) -> Any:
    t = buf.to(device, non_blocking=True) if device != "cpu" else buf
    t = t.view(torch_dtype(torch, dtype)).reshape(shape)
    return t if compute is None else t.to(compute)


def _scratch(torch: Any, scratch: dict[str, Any], key: str, shape: Sequence[int], dtype: Any, device: str) -> Any:
    """A reused buffer of ``shape``: fresh multi-MB tensors for every tensor cost a page fault per 4 KiB."""
    numel = math.prod(shape)
    buf = scratch.get(key)
    if buf is None or buf.numel() < numel or buf.dtype != dtype:
        buf = scratch[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel].view(*shape)


def _delta(torch: Any, op: LoraOp, a: Any, b: Any, shape: tuple[int, ...], scratch: dict[str, Any]) -> Any:
    if op.layer == lora.CONV:
        b2, a2 = b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1)
        d = torch.mm(b2, a2, out=_scratch(torch, scratch, "delta", (b2.shape[0], a2.shape[1]), a.dtype, a.device))
        d = d.reshape(shape)
    else:
        d = torch.mm(b, a, out=_scratch(torch, scratch, "delta", (b.shape[0], a.shape[1]), a.dtype, a.device))
        if op.layer in (lora.CONV1D, lora.EMBEDDING):
            d = d.T
    # PEFT multiplies (B @ A) by the scale afterwards; the same order keeps the result bit-identical
    d.mul_(op.scale)
    if op.weight != 1.0:
        d.mul_(op.weight)
    return d


def _dora(torch: Any, op: LoraOp, v: Any, m: Any) -> Any:
    if op.layer == lora.LINEAR:
        norm = torch.linalg.norm(v, dim=1)
        return v * (m.reshape(-1) / norm).view(-1, 1)
    if op.layer in (lora.CONV1D, lora.EMBEDDING):
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


def _require_finite(torch: Any, t: PlannedTensor, wide: Any, out: Any) -> None:
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


def require_cast_finite(torch: Any, t: PlannedTensor, src: Any, out: Any) -> None:
    """A dtype change of an untouched tensor must not turn finite base values into inf (float32 -> float16)."""
    if _all_finite(torch, out) or not bool((torch.isfinite(src) & ~torch.isfinite(out)).any()):
        return  # non-finite values the base already held are copied as they are
    raise NonFiniteValuesError(
        f"the base tensor {t.name} overflows {t.out_dtype}: finite as {t.src.dtype}, inf after the cast",
        detail={"tensor": t.name, "dtype": t.out_dtype}, hint="export with a wider dtype (bfloat16 or float32)")


def cast_into(torch: Any, t: PlannedTensor, data: Any, out: Any) -> None:
    """Cast a piece of an untouched tensor (uint8 ``data``) into ``out``, a uint8 buffer of the output's size."""
    src = data.view(torch_dtype(torch, t.src.dtype))
    cast = out.view(torch_dtype(torch, t.out_dtype)).copy_(src)
    if DTYPE_SIZES[t.out_dtype] < DTYPE_SIZES[t.src.dtype]:  # only a narrower dtype can overflow
        require_cast_finite(torch, t, src, cast)


def _row_blocked(t: PlannedTensor, device: str, out: Any) -> bool:
    """Whether ``t`` can be merged block of rows by block of rows: plain Linear LoRA deltas on the CPU.

    Row i of B@A is row i of B times A, and splitting a matmul by rows of its left operand keeps every
    element's sum in the same order (checked bit for bit against the full product), so each block is what
    PEFT's full-tensor merge gives for those rows, without tensor-sized float32 copies.
    """
    ops = t.ops
    return (out is not None and device == "cpu" and ops is not None and bool(ops.lora) and len(t.src.shape) == 2
            and not ops.replace and not ops.replace_is_noop and not ops.bias and ops.rows is None
            and all(op.layer == lora.LINEAR and op.magnitude is None for op in ops.lora)
            and t.src.shape[0] >= 2 * ROW_TAIL)


def _merge_rows(torch: Any, t: PlannedTensor, base_buf: Any, loaded: Loaded, compute: Any,
                scratch: dict[str, Any], out: Any) -> Any:
    assert t.ops is not None
    rows, cols = t.src.shape
    src = base_buf.view(torch_dtype(torch, t.src.dtype)).view(rows, cols)
    dst = out.view(torch_dtype(torch, t.out_dtype)).view(rows, cols)
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


def merge_tensor(torch: Any, t: PlannedTensor, base_buf: Any, loaded: Loaded, device: str,
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

    def get(src: Source) -> Any:
        return _as_tensor(torch, loaded[(src.adapter, src.key)], src.info.dtype, tuple(src.info.shape), device,
                          compute)

    if ops.replace_is_noop:
        for src in ops.replace:
            if not torch.equal(get(src), w):
                raise refuse(f"adapter {src.adapter}: {src.key!r} replaces {t.name} with different values, and a "
                             "replaced tensor can only be merged from a single adapter with weight 1.0",
                             tensor=t.name, adapter=src.adapter, key=src.key)
    elif ops.replace:
        first = get(ops.replace[0])
        for other in ops.replace[1:]:
            if not torch.equal(get(other), first):
                raise refuse(f"adapter {other.adapter} holds two different stored copies of {t.name}",
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
        result = out.view(torch_dtype(torch, t.out_dtype)).view(shape).copy_(w)
        _require_finite(torch, t, w, result)
        return result
    result = w.to(torch_dtype(torch, t.out_dtype))
    _require_finite(torch, t, w, result)
    return result.clone() if result.data_ptr() == work.data_ptr() else result  # the scratch buffer is used again

