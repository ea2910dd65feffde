"""Content fingerprints: canonical JSON, manifest digests, base-model layout and weights digests.

Canonical JSON = json.dumps(x, sort_keys=True, separators=(",", ":"), ensure_ascii=True), UTF-8.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def manifest_digest(files: Iterable[tuple[str, int, str]]) -> str:
    """Digest of a version: the canonical JSON of ``[path, size, digest]`` sorted by path."""
    return sha256_digest(canonical_json(sorted([list(f) for f in files])))


def layout_digest(tensors: Iterable[tuple[str, str, Iterable[int]]]) -> str:
    """Digest of a base's tensor layout: ``[name, dtype, shape]`` sorted by name."""
    return sha256_digest(canonical_json(sorted([name, dtype, list(shape)] for name, dtype, shape in tensors)))


def weights_digest(tensors: Iterable[tuple[str, str, Iterable[int], str]]) -> str:
    """Digest of a base's exact weights: ``[name, dtype, shape, tensor sha256]`` sorted by name.

    Independent of how the checkpoint is sharded.
    """
    return sha256_digest(
        canonical_json(sorted([name, dtype, list(shape), digest] for name, dtype, shape, digest in tensors))
    )
