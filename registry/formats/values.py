"""The value check of safetensors data: non-finite and all-zero tensors, streamed, bounded memory.

Separate from the header parser (formats/safetensors.py, standard library only) because it needs
numpy; the merge engine uses the parser and its own finite checks, never this module.

Public: ``ValueStats``, ``scan_values`` (one tensor's bytes in pieces), ``StreamScan`` and
``StreamScanner`` (every tensor of a file, as its bytes stream past during an upload).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from loreg.registry.errors import DtypeUnknownError, DtypeUnsupportedError, LoregError, SizeMismatchError
from loreg.registry.formats.safetensors import (
    DTYPE_SIZES,
    MAX_HEADER_SIZE_DEFAULT,
    SUBBYTE_DTYPES,
    Header,
    TensorInfo,
    header_length,
    parse_header,
    shown_text,
)


@dataclass(frozen=True)
class ValueStats:
    nonfinite: int  # NaN and ±inf elements
    all_zero: bool  # every element is ±0 (vacuously true for no elements)


# Each scanner gets whole elements and answers (count of non-finite, whether any element is nonzero).
def _scan_numpy(np_dtype: str) -> Callable[[memoryview, bool], tuple[int, bool]]:
    def scan(buf: memoryview, want_nonzero: bool) -> tuple[int, bool]:
        values = np.frombuffer(buf, dtype=np_dtype)
        nonfinite = values.size - int(np.count_nonzero(np.isfinite(values)))
        return nonfinite, want_nonzero and bool(np.count_nonzero(values))  # NaN counts as nonzero, -0 as zero

    return scan


def _scan_bits(
    uint_dtype: str, nonfinite: Callable[[np.ndarray], np.ndarray], nonzero: Callable[[np.ndarray], np.ndarray]
) -> Callable[[memoryview, bool], tuple[int, bool]]:
    def scan(buf: memoryview, want_nonzero: bool) -> tuple[int, bool]:
        bits = np.frombuffer(buf, dtype=uint_dtype)
        return int(np.count_nonzero(nonfinite(bits))), want_nonzero and bool(np.any(nonzero(bits)))

    return scan


def _no_nonfinite(bits: np.ndarray) -> np.ndarray:
    return np.zeros(0, dtype=bool)


_SCANNERS: dict[str, Callable[[memoryview, bool], tuple[int, bool]]] = {
    "F16": _scan_numpy("<f2"),
    "F32": _scan_numpy("<f4"),
    "F64": _scan_numpy("<f8"),
    "C64": _scan_numpy("<c8"),
    # bfloat16: exponent all ones is inf or NaN.
    "BF16": _scan_bits("<u2", lambda b: (b & 0x7F80) == 0x7F80, lambda b: (b & 0x7FFF) != 0),
    # e4m3fn: no inf, NaN is S.1111.111.
    "F8_E4M3": _scan_bits("u1", lambda b: (b & 0x7F) == 0x7F, lambda b: (b & 0x7F) != 0),
    # e5m2: IEEE-like, exponent all ones is inf or NaN.
    "F8_E5M2": _scan_bits("u1", lambda b: (b & 0x7C) == 0x7C, lambda b: (b & 0x7F) != 0),
    # fnuz variants: 0x80 (the would-be -0) is the only NaN, no inf.
    "F8_E4M3FNUZ": _scan_bits("u1", lambda b: b == 0x80, lambda b: b != 0),
    "F8_E5M2FNUZ": _scan_bits("u1", lambda b: b == 0x80, lambda b: b != 0),
    # e8m0: unsigned exponent only; 0xFF is NaN and no value is zero.
    "F8_E8M0": _scan_bits("u1", lambda b: b == 0xFF, lambda b: np.ones(b.shape, dtype=bool)),
}
for _int_dtype in ("BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64"):
    _SCANNERS[_int_dtype] = _scan_bits("u1", _no_nonfinite, lambda b: b != 0)


class _Tally:
    """One tensor's running facts over pieces of any size: an element split across pieces is
    completed from the next one, so memory stays at one piece."""

    def __init__(self, dtype: str):
        self.dtype = dtype
        self._scan, self._size = _SCANNERS[dtype], DTYPE_SIZES[dtype]
        self.nonfinite, self.any_nonzero, self.carry = 0, False, b""

    def feed(self, view: memoryview) -> None:
        if self.carry:
            need = self._size - len(self.carry)
            self.carry += bytes(view[:need])
            view = view[need:]
            if len(self.carry) < self._size:
                return
            self._count(memoryview(self.carry))
            self.carry = b""
        whole = len(view) - len(view) % self._size
        if whole:
            self._count(view[:whole])
        self.carry = bytes(view[whole:])

    def _count(self, view: memoryview) -> None:
        bad, nonzero = self._scan(view, not self.any_nonzero)
        self.nonfinite += bad
        self.any_nonzero = self.any_nonzero or nonzero


def scan_values(chunks: Iterable[bytes], dtype: str) -> ValueStats:
    """Count non-finite values and check for all-zero over a tensor's bytes given in pieces of any size."""
    if dtype in SUBBYTE_DTYPES:
        raise DtypeUnsupportedError(f"cannot scan the sub-byte dtype {dtype}", detail={"dtype": dtype})
    if dtype not in DTYPE_SIZES:
        shown = shown_text(str(dtype))
        raise DtypeUnknownError(f"unknown dtype {shown!r}", detail={"dtype": shown})
    tally = _Tally(dtype)
    for chunk in chunks:
        tally.feed(memoryview(chunk).cast("B"))
    if tally.carry:
        raise SizeMismatchError(
            f"{dtype} data ends with {len(tally.carry)} bytes of a partial element",
            detail={"dtype": dtype, "trailing_bytes": len(tally.carry)},
        )
    return ValueStats(nonfinite=tally.nonfinite, all_zero=not tally.any_nonzero)


@dataclass(frozen=True)
class StreamScan:
    """Value facts of every tensor of a safetensors file, gathered while its bytes streamed past."""

    header_size: int
    nonfinite: dict[str, int]  # tensor -> count of NaN/inf values (only tensors that have any)
    zero: list[str]  # tensors whose values are all zero


class StreamScanner:
    """Scans a safetensors file as it streams (e.g. during an upload), in one pass, bounded memory.

    ``feed`` the bytes in order, then ``finish()``: a StreamScan if the bytes were a strict
    safetensors file of exactly the header's size, else None (the caller falls back to reading the
    stored file, and the strict parser then says what is wrong). Never raises on bad input.
    """

    def __init__(self, *, max_header_size: int = MAX_HEADER_SIZE_DEFAULT):
        self._max = max_header_size
        self._buf = bytearray()
        self._header: Header | None = None
        self._failed = False
        self._pos = 0  # bytes of the data section seen
        self._spans: list[TensorInfo] = []
        self._idx = 0
        self._tally: _Tally | None = None
        self._stats: dict[str, tuple[int, bool]] = {}

    def feed(self, chunk: bytes | memoryview) -> None:
        if self._failed or not chunk:
            return
        view = memoryview(chunk).cast("B")
        try:
            if self._header is None:
                view = self._feed_header(view)
                if self._header is None or not view:
                    return
            self._feed_data(view)
        except LoregError:
            self._failed = True

    def _feed_header(self, view: memoryview) -> memoryview:
        need = 8 if len(self._buf) < 8 else 8 + header_length(bytes(self._buf[:8]), max_header_size=self._max)
        while True:
            take = min(len(view), need - len(self._buf))
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) < need:
                return view
            if need == 8:
                need = 8 + header_length(bytes(self._buf), max_header_size=self._max)
                continue
            self._header = parse_header(bytes(self._buf[8:]))
            self._spans = [t for t in self._header.tensors.values()]
            self._buf = bytearray()
            return view

    def _feed_data(self, view: memoryview) -> None:
        assert self._header is not None
        while view:
            if self._idx >= len(self._spans):
                self._failed = True  # bytes past the last tensor: the strict parser will refuse them
                return
            t = self._spans[self._idx]
            if self._pos < t.start:  # a gap: the strict parser refuses it; stop scanning
                self._failed = True
                return
            take = min(len(view), t.end - self._pos)
            if t.dtype in _SCANNERS:
                if self._tally is None:
                    self._tally = _Tally(t.dtype)
                self._tally.feed(view[:take])
            view = view[take:]
            self._pos += take
            if self._pos == t.end:
                self._close_tensor(t)

    def _close_tensor(self, t: TensorInfo) -> None:
        tally, self._tally = self._tally, None
        self._stats[t.name] = (tally.nonfinite, not tally.any_nonzero) if tally else (0, True)
        self._idx += 1
        while self._idx < len(self._spans) and self._spans[self._idx].start == self._spans[self._idx].end:
            empty = self._spans[self._idx]
            self._stats[empty.name] = (0, True)
            self._idx += 1

    def finish(self) -> StreamScan | None:
        if self._failed or self._header is None:
            return None
        while self._idx < len(self._spans) and self._pos == self._spans[self._idx].start == self._spans[self._idx].end:
            self._close_tensor(self._spans[self._idx])
        if self._idx != len(self._spans) or self._pos != self._header.data_size:
            return None
        return StreamScan(
            header_size=self._header.header_size,
            nonfinite={k: v[0] for k, v in self._stats.items() if v[0]},
            zero=[k for k, v in self._stats.items() if v[1]],
        )
