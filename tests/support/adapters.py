"""Variants of a real PEFT adapter folder: same layout, different weights (for many-version tests)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file, save_file


def variant(src: Path, dest: Path, seed: int) -> Path:
    """Copy the adapter folder with every lora_B perturbed deterministically by ``seed``."""
    shutil.copytree(src, dest)
    path = dest / "adapter_model.safetensors"
    tensors = load_file(path)
    rng = np.random.default_rng(seed)
    for key, value in tensors.items():
        if ".lora_B." in key:
            tensors[key] = (value + rng.standard_normal(value.shape).astype(value.dtype) * 0.01).astype(value.dtype)
    save_file(tensors, path)
    return dest


def with_header_length(data: bytes, n: int) -> bytes:
    """The same safetensors file with its header padded (metadata, then spaces) to exactly ``n`` bytes."""
    size = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8 : 8 + size]), data[8 + size :]
    header["__metadata__"] = {**header.get("__metadata__", {}), "pad": ""}
    j = json.dumps(header, separators=(",", ":")).encode()
    header["__metadata__"]["pad"] = "x" * max(n - len(j) - 8, 0)  # spaces after the object take the rest
    j = json.dumps(header, separators=(",", ":")).encode()
    assert len(j) <= n, "header already longer than the wanted length"
    return struct.pack("<Q", n) + j + b" " * (n - len(j)) + body


# header lengths whose little-endian prefix starts like pickle PROTO 2..5 (0x80 0x02..0x05)
PICKLE_LOOKING_LENGTHS = (640, 896, 1152, 1408)


def pickle_looking(data: bytes, *, plus: int = 0) -> bytes:
    """``data`` with a header length from PICKLE_LOOKING_LENGTHS (+ ``plus``, a multiple of 65,536)."""
    natural = struct.unpack("<Q", data[:8])[0]
    n = next(n for n in PICKLE_LOOKING_LENGTHS if n >= natural + 32) + plus
    out = with_header_length(data, n)
    assert out[0] == 0x80 and 2 <= out[1] <= 5, out[:8]
    return out
