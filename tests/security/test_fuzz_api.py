"""B-fuzz through the API: a valid adapter with one mutation of its safetensors bytes.

Whatever the mutation, the server answers 201/200 or a 4xx from the error table, never a 5xx; a
refusal stores nothing; an acceptance stores bytes that the reference safetensors library loads
to the same tensors (loreg never accepts what safetensors refuses).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.security.conftest import SQLITE_ONLY, Pusher, assert_known_refusal, assert_nothing_stored, snapshot

DTYPES = ["F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F128", "f32", ""]


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header_json: bytes, rest: bytes) -> bytes:
    header_json += b" " * (-(len(header_json) + 8) % 8)
    return struct.pack("<Q", len(header_json)) + header_json + rest


def _tensor_names(header: dict[str, Any]) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


@st.composite
def mutations(draw: st.DrawFn, valid: bytes) -> tuple[str, bytes]:
    header, rest = _split(valid)
    names = _tensor_names(header)
    kind = draw(st.sampled_from(["bit flip in length", "offset", "drop key", "duplicate key", "append", "dtype"]))
    if kind == "bit flip in length":
        bit = draw(st.integers(0, 63))
        n = struct.unpack("<Q", valid[:8])[0] ^ (1 << bit)
        return f"{kind} {bit}", struct.pack("<Q", n) + valid[8:]
    name = draw(st.sampled_from(names))
    if kind == "offset":
        which = draw(st.integers(0, 1))
        delta = draw(st.sampled_from([-1, 1]))
        entry = dict(header[name])
        offsets = list(entry["data_offsets"])
        offsets[which] += delta
        entry["data_offsets"] = offsets
        return f"{kind} {name} [{which}] {delta:+d}", _join(json.dumps({**header, name: entry}).encode(), rest)
    if kind == "drop key":
        return f"{kind} {name}", _join(json.dumps({k: v for k, v in header.items() if k != name}).encode(), rest)
    if kind == "duplicate key":
        text = json.dumps(header)
        extra = json.dumps({name: header[name]})[1:-1]
        return f"{kind} {name}", _join((text[:-1] + ", " + extra + "}").encode(), rest)
    if kind == "append":
        tail = draw(st.binary(min_size=1, max_size=64))
        return f"{kind} {len(tail)}", valid + tail
    dtype = draw(st.sampled_from(DTYPES))
    return f"{kind} {name} {dtype}", _join(json.dumps({**header, name: {**header[name], "dtype": dtype}}).encode(), rest)


@pytest.mark.slow
@SQLITE_ONLY
def test_mutated_adapters_never_get_a_5xx(pusher: Pusher, registry: Any, tiny_llama: dict[str, Path]) -> None:
    valid = (tiny_llama["adapter"] / "adapter_model.safetensors").read_bytes()
    seen: dict[int, int] = {}

    @settings(
        max_examples=60, deadline=None, database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(mutations(valid))
    def check(mutation: tuple[str, bytes]) -> None:
        label, weights = mutation
        before = snapshot(registry)
        resp = pusher.push("org/fuzz", weights=weights)
        seen[resp.status_code] = seen.get(resp.status_code, 0) + 1
        assert_known_refusal(resp)
        if resp.status_code >= 400:
            assert_nothing_stored(registry, before)
            return
        assert resp.status_code in (200, 201), (label, resp.status_code)
        number = resp.json()["version"]
        stored = pusher.http.get(f"/v1/adapters/org/fuzz/versions/{number}/files/adapter_model.safetensors")
        assert stored.status_code == 200 and stored.content == weights, label
        reference = safetensors.numpy.load(weights)  # raises if loreg accepted what safetensors refuses
        served = safetensors.numpy.load(stored.content)
        assert reference.keys() == served.keys()
        for key, value in reference.items():
            np.testing.assert_array_equal(value, served[key])

    check()
    assert any(code >= 400 for code in seen), seen  # the mutations do reach the parser
