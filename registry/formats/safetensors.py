"""Strict safetensors header parser (pure, standard library only: bytes in, dataclasses or errors out).

File layout: 8-byte little-endian N, N bytes of UTF-8 JSON (an object, optionally followed by 0x20
padding), then the data section, covered exactly by the tensors' ``data_offsets``.

Stricter than safetensors itself (which accepts duplicate keys, leading whitespace, extra fields):
the header must start with ``{``; only spaces may follow the object; no repeated key anywhere; no
float, NaN or Infinity literal; entries have exactly ``dtype``, ``shape``, ``data_offsets``;
``__metadata__`` maps strings to strings. Shapes and offsets are bounded before any arithmetic,
and no allocation is sized by a header value; parsing costs memory in proportion to the header's
length alone (about 25x at worst), which the caller caps. Dtypes are safetensors 0.8.0's; the sub-byte ones (F4, F6_*) are
refused with DtypeUnsupportedError, so every parsed dtype is a key of ``DTYPE_SIZES``.

Public: ``MAX_HEADER_SIZE_DEFAULT``, ``DTYPE_SIZES``, ``FLOAT_DTYPES``, ``SUBBYTE_DTYPES``,
``TensorInfo``, ``Header``, ``header_length``, ``parse_header``, ``read_header``,
``read_header_from_file``, ``iter_tensor_chunks``, ``sniff_length``, ``refused_format``. The value scan
(numpy) is formats/values.py, so that the merge engine's parser needs nothing outside the standard library.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from loreg.registry.errors import (
    DtypeUnknownError,
    DtypeUnsupportedError,
    DuplicateKeyError,
    HeaderInvalidError,
    HeaderTooLargeError,
    LoregError,
    OffsetInvalidError,
    ShapeInvalidError,
    SizeMismatchError,
    TrailingDataError,
)

MAX_HEADER_SIZE_DEFAULT = 8 * 1024 * 1024

# safetensors 0.8.0's Dtype enum, less the sub-byte members.
DTYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "F8_E4M3FNUZ": 1,
    "F8_E5M2FNUZ": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "C64": 8,
    "F64": 8,
    "I64": 8,
    "U64": 8,
}
# Known to safetensors 0.8.0 but packed below one byte per element: refused (no LoRA uses them).
SUBBYTE_DTYPES: frozenset[str] = frozenset({"F4", "F6_E2M3", "F6_E3M2"})
FLOAT_DTYPES: frozenset[str] = frozenset(
    {"F16", "BF16", "F32", "F64", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ"}
)

MAX_NDIM = 32
# 2**48 elements is far beyond any real tensor and keeps every product small.
MAX_NUMEL = 1 << 48
MAX_OFFSET = (1 << 63) - 1
_MAX_INT_DIGITS = 20  # u64 max has 20 digits; longer literals are never converted
_SHOWN_CHARS = 256  # names echoed in error details are cut here
_FIELDS = frozenset({"dtype", "shape", "data_offsets"})


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # offset in the data section (after 8 + header_size)
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Header:
    tensors: dict[str, TensorInfo]  # in data-offset order
    metadata: dict[str, str] | None
    header_size: int  # N, the JSON length including its space padding

    @property
    def data_offset(self) -> int:
        return 8 + self.header_size

    @property
    def data_size(self) -> int:
        return next(reversed(self.tensors.values())).end if self.tensors else 0

    @property
    def file_size(self) -> int:
        return self.data_offset + self.data_size


def shown_text(text: str) -> str:
    """A user string cut to a length fit for an error message."""
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "…"


def _check_text(text: str) -> None:
    # json accepts lone surrogate escapes ("\ud800"); they are not UTF-8 and safetensors refuses them.
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise HeaderInvalidError("header holds a string with a lone surrogate escape") from None


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        _check_text(key)
        if isinstance(value, str):
            _check_text(value)
        if key in obj:
            raise DuplicateKeyError(f"header repeats the key {shown_text(key)!r}", detail={"key": shown_text(key)})
        obj[key] = value
    return obj


def _parse_int(literal: str) -> int:
    if literal == "-0":
        raise HeaderInvalidError("header holds the literal -0")
    digits = literal.lstrip("-")
    if len(digits) > _MAX_INT_DIGITS:
        # Never convert huge literals; any value past u64 is refused downstream with the tensor named.
        return -(1 << 64) if literal.startswith("-") else 1 << 64
    return int(literal)


def _refuse_float(literal: str) -> Any:
    raise HeaderInvalidError(f"header holds a float literal {shown_text(literal)!r}; only integers are allowed")


def _refuse_constant(literal: str) -> Any:
    raise HeaderInvalidError(f"header holds the literal {literal}; not JSON")


_DECODER = json.JSONDecoder(
    object_pairs_hook=_object_pairs,
    parse_float=_refuse_float,
    parse_int=_parse_int,
    parse_constant=_refuse_constant,
    strict=True,
)


def header_length(prefix: bytes, *, max_header_size: int = MAX_HEADER_SIZE_DEFAULT) -> int:
    """The header length N from a file's first 8 bytes, refused above ``max_header_size``."""
    if len(prefix) < 8:
        raise HeaderInvalidError(
            f"file is {len(prefix)} bytes, shorter than the 8-byte length prefix", detail={"size": len(prefix)}
        )
    n = int.from_bytes(bytes(prefix[:8]), "little")
    if n > max_header_size:
        raise HeaderTooLargeError(
            f"header length {n} is over the cap of {max_header_size} bytes",
            detail={"header_size": n, "max_header_size": max_header_size},
        )
    if n == 0:
        raise HeaderInvalidError("header length is 0", detail={"header_size": 0})
    return n


# Magic that needs no context to refuse: pickle's PROTO opcode (protocols 2-5) and zip (torch.save).
# A safetensors length prefix can start with the same bytes (N = 640 is 80 02 00 ..), so a file is
# refused only when its first bytes do not also open a strict safetensors header.
_REFUSED_MAGIC = (
    (tuple(bytes([0x80, p]) for p in range(2, 6)), "pickle"),
    ((b"PK\x03\x04", b"PK\x05\x06"), "zip (torch.save)"),
)
SNIFF_PREFIX = 4


def _magic(head: bytes) -> str | None:
    for prefixes, name in _REFUSED_MAGIC:
        if bytes(head[:4]).startswith(prefixes):
            return name
    return None


def sniff_length(head: bytes, *, max_header_size: int = MAX_HEADER_SIZE_DEFAULT) -> int:
    """How many leading bytes ``refused_format`` needs: 4, or 8 + N when the magic could be a length prefix."""
    if len(head) < SNIFF_PREFIX or _magic(head) is None:
        return SNIFF_PREFIX
    if len(head) < 8:
        return 8
    n = int.from_bytes(bytes(head[:8]), "little")
    return 8 + n if 0 < n <= max_header_size else 8


def refused_format(head: bytes, *, max_header_size: int = MAX_HEADER_SIZE_DEFAULT) -> str | None:
    """The refused format (pickle, zip) a file's first ``sniff_length`` bytes reveal, or None.

    Bytes that open a strict safetensors header are safetensors, whatever their first two bytes.
    """
    name = _magic(head)
    if name is None:
        return None
    need = sniff_length(head, max_header_size=max_header_size)
    if need > 8 and len(head) >= need:
        try:
            parse_header(bytes(head[8:need]))
        except LoregError:
            return name
        return None
    return name


def _decode(header_json: bytes) -> dict[str, Any]:
    if not header_json:
        raise HeaderInvalidError("header is empty", detail={"header_size": 0})
    if header_json[:1] != b"{":
        raise HeaderInvalidError(
            "header must start with '{' (no leading whitespace or padding)", detail={"first_byte": header_json[0]}
        )
    try:
        text = bytes(header_json).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise HeaderInvalidError("header is not valid UTF-8", detail={"position": exc.start}) from None
    try:
        obj, end = _DECODER.raw_decode(text)
    except RecursionError:
        raise HeaderInvalidError("header JSON is nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise HeaderInvalidError(f"header is not valid JSON: {exc.msg}", detail={"position": exc.pos}) from None
    if text[end:].strip(" "):
        raise HeaderInvalidError(
            "only space (0x20) padding may follow the header's JSON object", detail={"position": end}
        )
    return obj


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(type(v) is int for v in value)


def _tensor_entry(name: str, entry: Any) -> TensorInfo:
    shown = shown_text(name)
    if not isinstance(entry, dict):
        raise HeaderInvalidError(f"entry for tensor {shown!r} is not an object", detail={"tensor": shown})
    keys = set(entry)
    if keys != _FIELDS:
        raise HeaderInvalidError(
            f"entry for tensor {shown!r} must have exactly dtype, shape, data_offsets",
            detail={
                "tensor": shown,
                "missing": sorted(_FIELDS - keys),
                "unexpected": sorted(shown_text(k) for k in keys - _FIELDS)[:16],
            },
        )

    dtype = entry["dtype"]
    if not isinstance(dtype, str):
        raise HeaderInvalidError(f"dtype of tensor {shown!r} is not a string", detail={"tensor": shown})
    if dtype in SUBBYTE_DTYPES:
        raise DtypeUnsupportedError(
            f"tensor {shown!r} has the sub-byte dtype {dtype}, which loreg does not store",
            detail={"tensor": shown, "dtype": dtype},
        )
    if dtype not in DTYPE_SIZES:
        raise DtypeUnknownError(
            f"tensor {shown!r} has an unknown dtype {shown_text(dtype)!r}", detail={"tensor": shown, "dtype": shown_text(dtype)}
        )

    shape = entry["shape"]
    if not isinstance(shape, list):
        raise HeaderInvalidError(f"shape of tensor {shown!r} is not a list", detail={"tensor": shown})
    if len(shape) > MAX_NDIM:
        raise ShapeInvalidError(
            f"tensor {shown!r} has {len(shape)} dimensions, over {MAX_NDIM}",
            detail={"tensor": shown, "ndim": len(shape)},
        )
    numel = 1
    for dim in shape:
        if type(dim) is not int:
            raise ShapeInvalidError(
                f"shape of tensor {shown!r} holds a {type(dim).__name__}, not an integer", detail={"tensor": shown}
            )
        if dim < 0 or dim > MAX_NUMEL:
            raise ShapeInvalidError(
                f"tensor {shown!r} has the dimension {dim}, outside [0, {MAX_NUMEL}]",
                detail={"tensor": shown, "dim": dim},
            )
        numel *= dim
        if numel > MAX_NUMEL:
            raise ShapeInvalidError(
                f"tensor {shown!r} has more than {MAX_NUMEL} elements", detail={"tensor": shown}
            )

    offsets = entry["data_offsets"]
    if not (_int_list(offsets) and len(offsets) == 2):
        raise HeaderInvalidError(
            f"data_offsets of tensor {shown!r} is not a list of two integers", detail={"tensor": shown}
        )
    start, end = offsets
    if not (0 <= start <= end <= MAX_OFFSET):
        raise OffsetInvalidError(
            f"tensor {shown!r} has invalid data_offsets [{start}, {end}]",
            detail={"tensor": shown, "start": start, "end": end},
        )
    expected = numel * DTYPE_SIZES[dtype]
    if end - start != expected:
        raise SizeMismatchError(
            f"tensor {shown!r} spans {end - start} bytes, but {dtype} {shape} needs {expected}",
            detail={"tensor": shown, "expected": expected, "actual": end - start},
        )
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), start=start, end=end)


def parse_header(header_json: bytes, *, file_size: int | None = None) -> Header:
    """Parse the N header bytes; with ``file_size``, also check the data section fills the rest exactly."""
    obj = _decode(header_json)
    header_size = len(header_json)
    metadata: dict[str, str] | None = None
    infos: list[TensorInfo] = []
    for key, value in obj.items():
        if key == "__metadata__":
            if not isinstance(value, dict):
                raise HeaderInvalidError("__metadata__ is not an object", detail={"key": key})
            for mkey, mvalue in value.items():
                if not isinstance(mvalue, str):
                    raise HeaderInvalidError(
                        f"__metadata__ value for {shown_text(mkey)!r} is not a string", detail={"key": shown_text(mkey)}
                    )
            metadata = dict(value)
        else:
            infos.append(_tensor_entry(key, value))

    # Stable sort: zero-size tensors sharing an offset keep their header order.
    infos.sort(key=lambda t: (t.start, t.end))
    position = 0
    for info in infos:
        if info.start != position:
            kind = "overlaps the previous tensor" if info.start < position else "leaves a gap"
            raise OffsetInvalidError(
                f"tensor {shown_text(info.name)!r} starts at {info.start}, expected {position}: it {kind}",
                detail={"tensor": shown_text(info.name), "start": info.start, "expected_start": position},
            )
        position = info.end
    header = Header(tensors={t.name: t for t in infos}, metadata=metadata, header_size=header_size)

    if file_size is not None:
        if file_size < header.data_offset:
            raise HeaderInvalidError(
                f"header length {header_size} runs past the end of a {file_size}-byte file",
                detail={"header_size": header_size, "file_size": file_size},
            )
        if file_size > header.file_size:
            raise TrailingDataError(
                f"{file_size - header.file_size} bytes follow the last tensor",
                detail={"extra_bytes": file_size - header.file_size},
            )
        if file_size < header.file_size:
            available = file_size - header.data_offset
            short = next(t for t in infos if t.end > available)
            raise SizeMismatchError(
                f"data section is {header.file_size - file_size} bytes short; tensor {shown_text(short.name)!r} is cut",
                detail={"tensor": shown_text(short.name), "missing_bytes": header.file_size - file_size},
            )
    return header


def _read_exact(read_range: Callable[[int, int], bytes], start: int, end: int) -> bytes:
    data = read_range(start, end)
    if len(data) != end - start:
        raise SizeMismatchError(
            f"reading bytes [{start}, {end}) returned {len(data)} bytes",
            detail={"start": start, "end": end, "returned": len(data)},
        )
    return data


def read_header(
    read_range: Callable[[int, int], bytes], file_size: int, *, max_header_size: int = MAX_HEADER_SIZE_DEFAULT
) -> Header:
    """Read and check a header with two ranged reads of at most 8 + N bytes in all.

    ``read_range(start, end)`` returns bytes [start, end) of the file.
    """
    if file_size < 8:
        raise HeaderInvalidError(
            f"file is {file_size} bytes, shorter than the 8-byte length prefix", detail={"size": file_size}
        )
    n = header_length(_read_exact(read_range, 0, 8), max_header_size=max_header_size)
    if n > file_size - 8:
        raise HeaderInvalidError(
            f"header length {n} runs past the end of a {file_size}-byte file",
            detail={"header_size": n, "file_size": file_size},
        )
    return parse_header(_read_exact(read_range, 8, 8 + n), file_size=file_size)


def read_header_from_file(path: str | os.PathLike[str], *, max_header_size: int = MAX_HEADER_SIZE_DEFAULT) -> Header:
    with open(path, "rb") as f:

        def read_range(start: int, end: int) -> bytes:
            f.seek(start)
            return f.read(end - start)

        return read_header(read_range, os.fstat(f.fileno()).st_size, max_header_size=max_header_size)


def iter_tensor_chunks(
    read_range: Callable[[int, int], bytes], header: Header, name: str, chunk_size: int = 1 << 20
) -> Iterator[bytes]:
    """The bytes of tensor ``name`` (KeyError if absent), in pieces of at most ``chunk_size``."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    info = header.tensors[name]
    position, end = header.data_offset + info.start, header.data_offset + info.end
    while position < end:
        stop = min(position + chunk_size, end)
        yield _read_exact(read_range, position, stop)
        position = stop
