"""Strict safetensors header parser: TESTPLAN B1-B9 (parser part), value scan, and B-fuzz (differential)."""

from __future__ import annotations

import json
import re
import struct
import tracemalloc
from typing import Any

import numpy as np
import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from loreg.registry import errors
from loreg.registry.formats import safetensors as st
from loreg.registry.formats import values as sv

CAP = st.MAX_HEADER_SIZE_DEFAULT
NUMPY_DTYPES = {"F64", "F32", "F16", "I64", "U64", "I32", "U32", "I16", "U16", "I8", "U8", "BOOL", "C64"}
F8_TORCH = {
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
    "F8_E8M0": torch.float8_e8m0fnu,
}


def hdr(j: bytes) -> bytes:
    return struct.pack("<Q", len(j)) + j


class Reader:
    """A read_range over bytes that records what was asked and returned."""

    def __init__(self, data: bytes):
        self.data = data
        self.calls: list[tuple[int, int]] = []
        self.bytes_read = 0

    def __call__(self, start: int, end: int) -> bytes:
        self.calls.append((start, end))
        out = self.data[start:end]
        self.bytes_read += len(out)
        return out


def parse(data: bytes, **kwargs: Any) -> st.Header:
    return st.read_header(Reader(data), len(data), **kwargs)


def entry(dtype: str, shape: list[Any], start: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


def encode_pairs(pairs: list[tuple[str, Any]]) -> bytes:
    """A JSON object from key/value pairs; keys may repeat (a dict could not hold that)."""
    return ("{" + ",".join(f"{json.dumps(k)}:{json.dumps(v, separators=(',', ':'))}" for k, v in pairs) + "}").encode()


def build(pairs: list[tuple[str, Any]], data: bytes, *, pad: bool = True) -> bytes:
    j = encode_pairs(pairs)
    if pad:  # as safetensors writes it: spaces up to a multiple of 8
        j += b" " * (-len(j) % 8)
    return hdr(j) + data


VALID = build(
    [("a", entry("F32", [2, 2], 0, 16)), ("b", entry("F16", [3], 16, 22))],
    bytes(range(22)),
)


def reference(data: bytes) -> dict[str, dict[str, Any]]:
    return {name: info for name, info in safetensors.deserialize(data)}


# ---------------------------------------------------------------------------------------- positive


def test_numpy_saved_file_parses_with_dtypes_shapes_offsets_and_metadata(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "f64": rng.standard_normal((3, 2)),
        "f32": rng.standard_normal((4, 5)).astype(np.float32),
        "f16": rng.standard_normal((7,)).astype(np.float16),
        "i64": np.arange(3, dtype=np.int64),
        "u32": np.arange(6, dtype=np.uint32).reshape(2, 3),
        "i8": np.arange(-4, 4, dtype=np.int8),
        "u8": np.arange(5, dtype=np.uint8),
        "flag": np.array([True, False, True]),
        "c64": np.array([1 + 2j], dtype=np.complex64),
        "scalar": np.array(1.5, dtype=np.float32),
    }
    path = tmp_path / "m.safetensors"
    safetensors.numpy.save_file(arrays, str(path), metadata={"format": "pt", "note": "ünïcode"})
    raw = path.read_bytes()

    header = st.read_header_from_file(path)

    assert header == parse(raw)
    assert header.metadata == {"format": "pt", "note": "ünïcode"}
    assert header.file_size == len(raw)
    expected_dtype = {"f64": "F64", "f32": "F32", "f16": "F16", "i64": "I64", "u32": "U32", "i8": "I8",
                      "u8": "U8", "flag": "BOOL", "c64": "C64", "scalar": "F32"}
    assert set(header.tensors) == set(arrays)
    position = 0
    for name, info in header.tensors.items():  # data-offset order, contiguous
        assert info.start == position
        position = info.end
        assert info.name == name
        assert info.dtype == expected_dtype[name]
        assert info.shape == arrays[name].shape
        assert info.numel == arrays[name].size
        assert info.nbytes == arrays[name].nbytes
        chunks = st.iter_tensor_chunks(Reader(raw), header, name, chunk_size=5)
        assert b"".join(chunks) == arrays[name].tobytes()


def test_torch_saved_bf16_and_float8_tensors_parse():
    tensors = {
        "bf16": torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.bfloat16),
        "e4m3": torch.tensor([1.0, -0.5, 2.0], dtype=torch.float8_e4m3fn),
        "e5m2": torch.tensor([1.0, 4.0], dtype=torch.float8_e5m2),
        "e4m3fnuz": torch.tensor([1.0], dtype=torch.float8_e4m3fnuz),
        "u16": torch.arange(3).to(torch.uint16),
    }
    raw = safetensors.torch.save(tensors)

    header = parse(raw)

    got = {name: (t.dtype, t.shape) for name, t in header.tensors.items()}
    assert got == {
        "bf16": ("BF16", (2, 2)),
        "e4m3": ("F8_E4M3", (3,)),
        "e5m2": ("F8_E5M2", (2,)),
        "e4m3fnuz": ("F8_E4M3FNUZ", (1,)),
        "u16": ("U16", (3,)),
    }
    assert header.metadata is None
    for name, t in tensors.items():
        data = b"".join(st.iter_tensor_chunks(Reader(raw), header, name))
        assert data == t.contiguous().view(torch.uint8).numpy().tobytes()


def test_file_without_tensors_parses():
    raw = safetensors.numpy.save({}, metadata={"k": "v"})
    header = parse(raw)
    assert header.tensors == {}
    assert header.metadata == {"k": "v"}
    assert header.data_size == 0
    assert header.file_size == len(raw)
    assert parse(hdr(b"{}")).tensors == {}


def test_trailing_space_padding_is_accepted():
    body = encode_pairs([("a", entry("F32", [1], 0, 4))])
    raw = hdr(body + b" " * 13) + b"\0\0\x80?"
    header = parse(raw)
    assert header.header_size == len(body) + 13
    assert header.data_offset == 8 + len(body) + 13
    assert header.tensors["a"].start == 0
    assert reference(raw)["a"]["shape"] == [1]


def test_tensors_come_in_data_offset_order_whatever_the_header_order():
    raw = build(
        [("late", entry("U8", [2], 4, 6)), ("early", entry("U8", [4], 0, 4)), ("mid", entry("U8", [0], 4, 4))],
        b"\x01" * 6,
    )
    header = parse(raw)
    assert list(header.tensors) == ["early", "mid", "late"]
    assert header.data_size == 6


def test_zero_size_tensors_may_share_an_offset():
    raw = build([("x", entry("F32", [0, 64], 0, 0)), ("y", entry("F16", [64, 0], 0, 0)),
                 ("z", entry("U8", [1], 0, 1))], b"\x07")
    header = parse(raw)
    assert [t.numel for t in header.tensors.values()] == [0, 0, 1]


def test_header_length_accepts_exactly_the_cap():
    assert st.header_length(struct.pack("<Q", CAP)) == CAP
    assert st.header_length(struct.pack("<Q", 100) + b"rest ignored", max_header_size=100) == 100


# ---------------------------------------------------------------------------------------- B1


def test_length_prefix_over_the_reference_limit_is_refused_after_reading_only_the_prefix():
    raw = struct.pack("<Q", 100_000_001) + VALID[8:]
    reader = Reader(raw)

    with pytest.raises(errors.HeaderTooLargeError) as exc:
        st.read_header(reader, len(raw))

    assert exc.value.detail["header_size"] == 100_000_001
    assert reader.bytes_read <= 8 + CAP
    assert reader.calls == [(0, 8)]


def test_length_prefix_one_over_the_cap_is_refused_after_reading_only_the_prefix():
    body = encode_pairs([("a", entry("U8", [1], 0, 1))])
    raw = hdr(body + b" " * (CAP + 1 - len(body))) + b"\x01"
    reader = Reader(raw)

    with pytest.raises(errors.HeaderTooLargeError) as exc:
        st.read_header(reader, len(raw))

    assert exc.value.detail == {"header_size": CAP + 1, "max_header_size": CAP}
    assert reader.bytes_read <= 8 + CAP
    # the cap is the only reason: one byte more of allowance and the same file is fine
    assert parse(raw, max_header_size=CAP + 1).tensors["a"].nbytes == 1


def test_small_cap_applies_to_read_header_from_file(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(VALID)
    with pytest.raises(errors.HeaderTooLargeError):
        st.read_header_from_file(path, max_header_size=len(VALID) - 8 - 23)
    assert st.read_header_from_file(path).file_size == len(VALID)


# ---------------------------------------------------------------------------------------- B2


def test_length_prefix_longer_than_the_file_is_refused():
    raw = hdr(b'{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}}') + b"\0" * 16
    raw = struct.pack("<Q", 1_000_000) + raw[8:]
    reader = Reader(raw)

    with pytest.raises(errors.HeaderInvalidError) as exc:
        st.read_header(reader, len(raw))

    assert exc.value.detail == {"header_size": 1_000_000, "file_size": len(raw)}
    assert reader.calls == [(0, 8)]


@pytest.mark.parametrize("raw", [b"", b"\x02\0\0\0\0\0\0"], ids=["empty", "seven-bytes"])
def test_file_shorter_than_the_length_prefix_is_refused(raw):
    with pytest.raises(errors.HeaderInvalidError):
        parse(raw)
    with pytest.raises(errors.HeaderInvalidError):
        st.header_length(raw)


def test_zero_header_length_is_refused():
    with pytest.raises(errors.HeaderInvalidError):
        parse(struct.pack("<Q", 0) + b"{}")
    with pytest.raises(errors.HeaderInvalidError):
        st.parse_header(b"")


def test_short_read_from_storage_is_refused():
    with pytest.raises(errors.SizeMismatchError):
        st.read_header(lambda s, e: VALID[s:e][:-1], len(VALID))


# ---------------------------------------------------------------------------------------- B3


def test_bytes_after_the_last_tensor_are_refused():
    raw = VALID + b"PK\x03\x04" + bytes(100)
    with pytest.raises(errors.TrailingDataError) as exc:
        parse(raw)
    assert exc.value.detail["extra_bytes"] == 104


# ---------------------------------------------------------------------------------------- B4


def test_data_section_two_bytes_short_is_refused_naming_the_cut_tensor():
    with pytest.raises(errors.SizeMismatchError) as exc:
        parse(VALID[:-2])
    assert exc.value.detail == {"tensor": "b", "missing_bytes": 2}


# ---------------------------------------------------------------------------------------- B5


def test_offset_gap_is_refused_naming_the_tensor():
    raw = hdr(b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}') + bytes(16)
    with pytest.raises(errors.OffsetInvalidError) as exc:
        parse(raw)
    assert exc.value.detail["tensor"] == "a"
    assert exc.value.detail["expected_start"] == 0


def test_gap_between_tensors_is_refused_naming_the_tensor():
    raw = build([("a", entry("F32", [1], 0, 4)), ("b", entry("F32", [1], 8, 12))], bytes(12))
    with pytest.raises(errors.OffsetInvalidError) as exc:
        parse(raw)
    assert exc.value.detail["tensor"] == "b"


def test_overlapping_offsets_are_refused_naming_the_tensor():
    raw = build([("a", entry("F32", [2], 0, 8)), ("b", entry("F32", [2], 0, 8))], bytes(8))
    with pytest.raises(errors.OffsetInvalidError) as exc:
        parse(raw)
    assert exc.value.detail["tensor"] == "b"


@pytest.mark.parametrize("offsets", [[8, 4], [-4, 0], [0, 2**64]], ids=["start-after-end", "negative", "past-u64"])
def test_impossible_offsets_are_refused_naming_the_tensor(offsets):
    raw = build([("w", {"dtype": "U8", "shape": [4], "data_offsets": offsets})], bytes(4))
    with pytest.raises(errors.OffsetInvalidError) as exc:
        parse(raw)
    assert exc.value.detail["tensor"] == "w"


# ---------------------------------------------------------------------------------------- B6


def test_overflowing_shape_is_refused_without_allocating():
    raw = hdr(b'{"a":{"dtype":"I32","shape":[2,9223372036854775807],"data_offsets":[0,16]}}') + bytes(16)
    tracemalloc.start()
    try:
        with pytest.raises(errors.ShapeInvalidError) as exc:
            parse(raw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert exc.value.detail["tensor"] == "a"
    assert peak < 1 << 20


def test_shape_disagreeing_with_offsets_is_a_size_mismatch():
    raw = build([("a", entry("F32", [3], 0, 8))], bytes(8))
    with pytest.raises(errors.SizeMismatchError) as exc:
        parse(raw)
    assert exc.value.detail == {"tensor": "a", "expected": 12, "actual": 8}


@pytest.mark.parametrize(
    "shape",
    [[-1], [True], ["2"], [[2]], [None], [0, 2**60], [2**40, 2**40], [10**30], [1] * 33],
    ids=["negative", "bool", "string", "nested", "null", "absurd-zero-size", "numel-overflow", "huge-literal",
         "too-many-dims"],
)
def test_malformed_shape_is_refused_naming_the_tensor(shape):
    raw = build([("a", {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]})], bytes(4))
    with pytest.raises(errors.ShapeInvalidError) as exc:
        parse(raw)
    assert exc.value.detail["tensor"] == "a"


# ---------------------------------------------------------------------------------------- B7


def test_duplicate_tensor_key_is_refused_naming_the_key():
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    raw = build([(key, entry("F32", [1], 0, 4)), (key, entry("F32", [2], 0, 8))], bytes(8))
    assert reference(raw)[key]  # the reference library keeps one of the two and says nothing

    with pytest.raises(errors.DuplicateKeyError) as exc:
        parse(raw)
    assert exc.value.detail == {"key": key}


@pytest.mark.parametrize(
    "header",
    [
        b'{"a":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
        b'{"__metadata__":{"k":"1","k":"2"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
        b'{"__metadata__":{},"__metadata__":{},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    ],
    ids=["in-entry", "in-metadata", "metadata-twice"],
)
def test_duplicate_key_anywhere_is_refused(header):
    with pytest.raises(errors.DuplicateKeyError) as exc:
        parse(hdr(header) + bytes(4))
    assert exc.value.detail["key"] in {"dtype", "k", "__metadata__"}


# ---------------------------------------------------------------------------------------- B8

A = b'"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
MALFORMED_HEADERS = {
    "leading-space": b" {" + A + b"}",
    "leading-newline": b"\n{" + A + b"}",
    "nul-padding": b"{" + A + b"}\x00\x00\x00",
    "newline-padding": b"{" + A + b"}\n",
    "trailing-garbage": b"{" + A + b"} x",
    "second-object": b"{" + A + b"}{}",
    "list": b"[1,2]",
    "invalid-utf8-key": b'{"\xff":1}',
    "utf8-bom": b"\xef\xbb\xbf{" + A + b"}",
    "utf16": ("{" + A.decode() + "}").encode("utf-16-le"),
    "lone-surrogate-key": b'{"\\ud800":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    "lone-surrogate-metadata": b'{"__metadata__":{"k":"\\udc00"},' + A + b"}",
    "metadata-int-value": b'{"__metadata__":{"k":1},' + A + b"}",
    "metadata-list": b'{"__metadata__":["k"],' + A + b"}",
    "metadata-null": b'{"__metadata__":null,' + A + b"}",
    "nan": b'{"__metadata__":{"k":NaN},' + A + b"}",
    "infinity": b'{"a":{"dtype":"F32","shape":[Infinity],"data_offsets":[0,4]}}',
    "minus-infinity": b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[-Infinity,4]}}',
    "float-1e400": b'{"a":{"dtype":"F32","shape":[1e400],"data_offsets":[0,4]}}',
    "float-offset": b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4.0]}}',
    "float-shape": b'{"a":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}',
    "minus-zero": b'{"a":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}',
    "missing-field": b'{"a":{"dtype":"F32","shape":[1]}}',
    "extra-field": b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":1}}',
    "entry-not-object": b'{"a":[1]}',
    "shape-not-list": b'{"a":{"dtype":"F32","shape":1,"data_offsets":[0,4]}}',
    "offsets-three": b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4,4]}}',
    "offsets-strings": b'{"a":{"dtype":"F32","shape":[1],"data_offsets":["0","4"]}}',
    "offsets-bool": b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[false,4]}}',
    "dtype-not-string": b'{"a":{"dtype":4,"shape":[1],"data_offsets":[0,4]}}',
    "control-char": b'{"a\x01":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
    "truncated-json": b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}',
    "deep-nesting": b'{"__metadata__":' + b"[" * 100_000 + b"]" * 100_000 + b"}",
}


@pytest.mark.parametrize("header", list(MALFORMED_HEADERS.values()), ids=list(MALFORMED_HEADERS))
def test_malformed_header_is_refused(header):
    with pytest.raises(errors.HeaderInvalidError):
        parse(hdr(header) + bytes(4))


@pytest.mark.parametrize("name", ["leading-space", "extra-field", "metadata-null"])
def test_reference_library_accepts_what_loreg_refuses(name):
    # why loreg has its own parser: safetensors 0.8.0 lets these through
    assert "a" in reference(hdr(MALFORMED_HEADERS[name]) + bytes(4)) or name == "metadata-null"


def test_error_details_cut_long_names():
    name = "n" * 5000
    raw = build([(name, entry("F32", [1], 4, 8))], bytes(8))
    with pytest.raises(errors.OffsetInvalidError) as exc:
        parse(raw)
    assert len(exc.value.detail["tensor"]) < 300


# ---------------------------------------------------------------------------------------- B9


def test_unknown_dtype_is_refused_naming_the_tensor():
    raw = build([("a", entry("F128", [1], 0, 16))], bytes(16))
    with pytest.raises(errors.DtypeUnknownError) as exc:
        parse(raw)
    assert exc.value.detail == {"tensor": "a", "dtype": "F128"}


@pytest.mark.parametrize("dtype", ["F4", "F6_E2M3", "F6_E3M2"])
def test_subbyte_dtypes_are_refused_as_unsupported(dtype):
    raw = build([("a", entry(dtype, [8], 0, 8 * int(dtype[1]) // 8))], bytes(8 * int(dtype[1]) // 8))
    assert reference(raw)["a"]["dtype"] == dtype  # legal safetensors
    with pytest.raises(errors.DtypeUnsupportedError) as exc:
        parse(raw)
    assert exc.value.detail == {"tensor": "a", "dtype": dtype}


def test_integer_and_bool_tensors_parse_for_the_validator_to_judge():
    raw = build([("i", entry("I32", [8, 64], 0, 2048)), ("b", entry("BOOL", [3], 2048, 2051))], bytes(2051))
    header = parse(raw)
    assert header.tensors["i"].dtype == "I32"
    assert header.tensors["b"].dtype == "BOOL"


def test_zero_element_tensor_parses():
    header = parse(build([("a", entry("F32", [0, 64], 0, 0))], b""))
    assert header.tensors["a"].shape == (0, 64)
    assert header.tensors["a"].numel == 0
    assert header.tensors["a"].nbytes == 0


def test_dtype_table_is_the_reference_dtype_list():
    with pytest.raises(safetensors.SafetensorError) as exc:
        reference(build([("a", entry("NOPE", [1], 0, 1))], bytes(1)))
    listed = set(re.findall(r"`([A-Z0-9_]+)`", str(exc.value).split("expected one of", 1)[1]))
    assert listed == set(st.DTYPE_SIZES) | st.SUBBYTE_DTYPES
    assert st.FLOAT_DTYPES <= set(st.DTYPE_SIZES)
    for dtype, size in st.DTYPE_SIZES.items():
        raw = build([("a", entry(dtype, [3], 0, 3 * size))], bytes(3 * size))
        assert reference(raw)["a"]["dtype"] == dtype
        assert parse(raw).tensors["a"].nbytes == 3 * size


# ---------------------------------------------------------------------------------------- values


def torch_bytes(values: list[float], dtype: torch.dtype) -> bytes:
    return torch.tensor(values, dtype=torch.float32).to(dtype).view(torch.uint8).numpy().tobytes()


@pytest.mark.parametrize(
    ("dtype", "torch_dtype"), [("F32", torch.float32), ("F16", torch.float16), ("BF16", torch.bfloat16),
                               ("F64", torch.float64), ("F8_E5M2", torch.float8_e5m2)]
)
def test_scan_counts_nan_and_inf(dtype, torch_dtype):
    data = torch_bytes([1.0, float("nan"), 0.0, float("inf"), -float("inf"), -2.0], torch_dtype)
    assert sv.scan_values([data], dtype) == sv.ValueStats(nonfinite=3, all_zero=False)


@pytest.mark.parametrize(("dtype", "torch_dtype"), [("F8_E4M3", torch.float8_e4m3fn)])
def test_scan_counts_nan_in_formats_without_inf(dtype, torch_dtype):
    data = torch_bytes([1.0, float("nan"), 0.0], torch_dtype)
    assert sv.scan_values([data], dtype).nonfinite == 1


@pytest.mark.parametrize("dtype", sorted(F8_TORCH))
def test_scan_agrees_with_torch_on_every_float8_bit_pattern(dtype):
    as_float = torch.arange(256, dtype=torch.uint8).view(F8_TORCH[dtype]).float()
    for byte in range(256):
        value = as_float[byte].item()
        expected = sv.ValueStats(nonfinite=int(not np.isfinite(value)), all_zero=value == 0)
        assert sv.scan_values([bytes([byte])], dtype) == expected, (dtype, hex(byte), value)


def test_scan_agrees_with_torch_on_every_bf16_bit_pattern():
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    as_float = bits.view(torch.bfloat16).float()
    data = bits.numpy().astype("<i2").tobytes()
    nonfinite = int((~torch.isfinite(as_float)).sum())
    assert sv.scan_values([data], "BF16").nonfinite == nonfinite
    zeros = bits[as_float == 0].numpy().astype("<i2").tobytes()
    assert len(zeros) == 4  # +0 and -0
    assert sv.scan_values([zeros], "BF16").all_zero


@pytest.mark.parametrize("dtype", ["F32", "F64", "F16", "BF16", "C64", "I32"])
def test_scan_gives_the_same_answer_whatever_the_chunk_boundaries(dtype):
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, size=8 * 37, dtype=np.uint8).tobytes()
    whole = sv.scan_values([data], dtype)
    assert whole.nonfinite > 0 or dtype in {"I32", "F64"}
    for size in (1, 2, 3, 5, 7, 9, 64):
        chunks = [data[i : i + size] for i in range(0, len(data), size)]
        assert sv.scan_values(iter(chunks), dtype) == whole
    uneven = [data[:3], b"", data[3:4], data[4:101], data[101:]]
    assert sv.scan_values(uneven, dtype) == whole


def test_scan_finds_a_nan_split_across_chunks():
    data = np.array([0.0, np.nan, 0.0], dtype="<f4").tobytes()
    assert sv.scan_values([data[:6], data[6:]], "F32") == sv.ValueStats(nonfinite=1, all_zero=False)


@pytest.mark.parametrize(
    ("dtype", "data"),
    [
        ("F32", np.array([0.0, -0.0], dtype="<f4").tobytes()),
        ("F64", np.array([-0.0], dtype="<f8").tobytes()),
        ("F16", np.array([-0.0, 0.0], dtype="<f2").tobytes()),
        ("BF16", b"\x00\x80\x00\x00"),
        ("F8_E4M3", b"\x80\x00"),
        ("F8_E5M2", b"\x80"),
        ("I8", b"\x00\x00"),
    ],
)
def test_scan_counts_negative_zero_as_zero(dtype, data):
    assert sv.scan_values([data[:1], data[1:]], dtype) == sv.ValueStats(nonfinite=0, all_zero=True)


def test_scan_sees_a_single_nonzero_element():
    data = np.zeros(1000, dtype="<f4")
    data[999] = 1e-45  # the smallest subnormal
    assert sv.scan_values([data.tobytes()], "F32").all_zero is False
    assert sv.scan_values([b"\x00\x00\x01\x00"], "BF16").all_zero is False
    assert sv.scan_values([b"\x00\x80"], "F8_E4M3FNUZ") == sv.ValueStats(nonfinite=1, all_zero=False)


def test_scan_of_no_bytes_is_vacuously_all_zero():
    assert sv.scan_values([], "F32") == sv.ValueStats(nonfinite=0, all_zero=True)


def test_scan_refuses_a_partial_trailing_element():
    with pytest.raises(errors.SizeMismatchError):
        sv.scan_values([b"\0\0", b"\0\0\0"], "F32")


def test_scan_refuses_unknown_and_subbyte_dtypes():
    with pytest.raises(errors.DtypeUnknownError):
        sv.scan_values([b"\0"], "F128")
    with pytest.raises(errors.DtypeUnsupportedError):
        sv.scan_values([b"\0"], "F4")


def test_tensor_chunks_stream_the_tensor_in_bounded_pieces():
    values = np.arange(100, dtype="<f4")
    values[57] = np.inf
    raw = build([("pad", entry("U8", [3], 0, 3)), ("w", entry("F32", [100], 3, 403))], b"abc" + values.tobytes())
    header = parse(raw)

    chunks = list(st.iter_tensor_chunks(Reader(raw), header, "w", chunk_size=7))

    assert all(len(c) <= 7 for c in chunks)
    assert b"".join(chunks) == values.tobytes()
    stats = sv.scan_values(st.iter_tensor_chunks(Reader(raw), header, "w", chunk_size=7), "F32")
    assert stats == sv.ValueStats(nonfinite=1, all_zero=False)
    assert list(st.iter_tensor_chunks(Reader(raw), parse(build([("e", entry("F32", [0], 0, 0))], b"")), "e")) == []


def test_tensor_chunks_refuse_a_short_read():
    header = parse(VALID)
    with pytest.raises(errors.SizeMismatchError):
        list(st.iter_tensor_chunks(lambda s, e: VALID[s : e - 1], header, "a"))


# ---------------------------------------------------------------------------------------- B-fuzz

FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
MUTATIONS = ["length_bit", "offset", "drop_key", "dup_key", "append", "truncate", "dtype", "shape", "byte"]


@hs.composite
def valid_parts(draw) -> tuple[list[tuple[str, Any]], bytes]:
    names = draw(hs.lists(hs.text("abc._é", min_size=1, max_size=6), max_size=4, unique=True))
    entries: list[tuple[str, Any]] = []
    data = b""
    for name in names:
        dtype = draw(hs.sampled_from(sorted(st.DTYPE_SIZES)))
        shape = draw(hs.lists(hs.integers(0, 3), max_size=3))
        size = int(np.prod(shape, dtype=np.int64)) * st.DTYPE_SIZES[dtype]
        entries.append((name, entry(dtype, shape, len(data), len(data) + size)))
        data += draw(hs.binary(min_size=size, max_size=size))
    entries = draw(hs.permutations(entries))  # header order need not be offset order
    if draw(hs.booleans()):
        metadata = draw(hs.dictionaries(hs.text(max_size=4), hs.text(max_size=4), max_size=2))
        entries.insert(draw(hs.integers(0, len(entries))), ("__metadata__", metadata))
    return entries, data


@hs.composite
def mutated_files(draw) -> bytes:
    pairs, data = draw(valid_parts())
    pairs = [(k, json.loads(json.dumps(v))) for k, v in pairs]  # private copies to edit
    tensors = [i for i, (k, _) in enumerate(pairs) if k != "__metadata__"]
    kind = draw(hs.sampled_from(MUTATIONS))
    if kind in {"offset", "drop_key", "dup_key", "dtype", "shape"} and not tensors:
        kind = "append"
    if tensors:
        target = pairs[draw(hs.sampled_from(tensors))][1]
    if kind == "offset":
        target["data_offsets"][draw(hs.integers(0, 1))] += draw(hs.sampled_from([-1, 1]))
    elif kind == "drop_key":
        del pairs[draw(hs.sampled_from(tensors))]
    elif kind == "dup_key":
        name = pairs[draw(hs.sampled_from(tensors))][0]
        pairs.insert(draw(hs.integers(0, len(pairs))), (name, draw(hs.sampled_from([p[1] for p in pairs]))))
    elif kind == "dtype":
        target["dtype"] = draw(hs.sampled_from(sorted(st.DTYPE_SIZES) + ["F4", "F128", "f32", ""]))
    elif kind == "shape":
        shape = target["shape"]
        change = draw(hs.sampled_from(["inc", "dec", "add", "drop", "weird"]))
        if change == "add" or not shape:
            shape.insert(draw(hs.integers(0, len(shape))), draw(hs.sampled_from([0, 1, 2])))
        elif change == "drop":
            shape.pop(draw(hs.integers(0, len(shape) - 1)))
        else:
            i = draw(hs.integers(0, len(shape) - 1))
            if change == "weird":
                shape[i] = draw(hs.sampled_from([-1, 2**63 - 1, 2**64, True, "1", None, [1]]))
            else:
                shape[i] += 1 if change == "inc" else -1
    raw = build(pairs, data, pad=draw(hs.booleans()))
    if kind == "length_bit":
        bit = draw(hs.integers(0, 63))
        raw = (int.from_bytes(raw[:8], "little") ^ (1 << bit)).to_bytes(8, "little") + raw[8:]
    elif kind == "append":
        raw += draw(hs.binary(min_size=1, max_size=16))
    elif kind == "truncate":
        raw = raw[: draw(hs.integers(0, max(0, len(raw) - 1)))]
    elif kind == "byte":
        i = draw(hs.integers(0, len(raw) - 1))
        raw = raw[:i] + bytes([raw[i] ^ draw(hs.integers(1, 255))]) + raw[i + 1 :]
    return raw


def accepted_like_the_reference(raw: bytes) -> st.Header | None:
    """Parse with loreg; if it accepts, the reference library must accept and agree on every tensor."""
    try:
        header = parse(raw)
    except errors.LoregError:
        return None
    ref = reference(raw)  # raises (and fails the test) if safetensors refuses what loreg accepted
    assert set(ref) == set(header.tensors)
    for name, info in header.tensors.items():
        assert ref[name]["dtype"] == info.dtype
        assert tuple(ref[name]["shape"]) == info.shape
        assert bytes(ref[name]["data"]) == raw[header.data_offset + info.start : header.data_offset + info.end]
    if all(t.dtype in NUMPY_DTYPES for t in header.tensors.values()):
        arrays = safetensors.numpy.load(raw)
        assert set(arrays) == set(header.tensors)
        for name, info in header.tensors.items():
            assert arrays[name].shape == info.shape
            assert arrays[name].tobytes() == bytes(ref[name]["data"])
    return header


@FUZZ
@given(valid_parts(), hs.booleans())
def test_valid_files_are_accepted_and_agree_with_the_reference(parts, pad):
    pairs, data = parts
    raw = build(pairs, data, pad=pad)
    header = accepted_like_the_reference(raw)
    assert header is not None
    assert header.file_size == len(raw)
    metadata = [v for k, v in pairs if k == "__metadata__"]
    assert header.metadata == (metadata[0] if metadata else None)


@pytest.mark.slow
@FUZZ
@given(mutated_files())
def test_mutated_files_are_refused_with_loreg_errors_or_accepted_like_the_reference(raw):
    accepted_like_the_reference(raw)


JSON_TOKENS = [
    "{", "}", "[", "]", ":", ",", " ", '"a"', '"b"', '"dtype"', '"shape"', '"data_offsets"', '"__metadata__"',
    '"F32"', '"BF16"', '"U8"', '"F4"', "0", "1", "4", "-1", "-0", "1.0", "1e400", "NaN", "true", "null",
    '"\\ud800"', '"\\u00e9"', '"\\"', "\\", "\x00", "\n", "\xff",
]


@FUZZ
@given(hs.lists(hs.sampled_from(JSON_TOKENS), max_size=40), hs.booleans())
def test_token_soup_headers_raise_only_loreg_errors_or_agree_with_the_reference(tokens, entry_prefix):
    text = "".join(tokens)
    if entry_prefix:  # start inside a well-formed entry so the soup reaches the deeper checks
        text = '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}' + text
    body = text.encode("utf-8", "surrogatepass")
    try:
        header = st.parse_header(body)
    except errors.LoregError:
        return
    accepted_like_the_reference(hdr(body) + bytes(header.data_size))


@pytest.mark.parametrize("n", [640, 896, 1152, 1408, 640 + 65536, 1408 + 3 * 65536])
def test_header_length_that_looks_like_pickle_is_safetensors_when_the_header_parses(n: int) -> None:
    j = json.dumps({"__metadata__": {"pad": ""}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    head = struct.pack("<Q", n) + j.encode() + b" " * (n - len(j))
    assert head[0] == 0x80 and 2 <= head[1] <= 5
    assert st.sniff_length(head[:4]) == 8
    assert st.sniff_length(head[:8]) == 8 + n
    assert st.refused_format(head) is None
    assert st.refused_format(head[:-1]) == "pickle"  # cut short: the header cannot be shown valid
    assert st.refused_format(head[:8] + b"[" + head[9:]) == "pickle"


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_pickles_are_refused_by_their_first_bytes(protocol: int) -> None:
    import pickle

    data = pickle.dumps({"a": list(range(100))}, protocol=protocol)
    head = data[: st.sniff_length(data[: st.sniff_length(data)])]
    assert st.refused_format(head) == "pickle"
    assert st.refused_format(b"PK\x03\x04" + bytes(60)) == "zip (torch.save)"
    assert st.refused_format(b'{"a"') is None
