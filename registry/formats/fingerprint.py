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


class SafetensorsHasher:
    """Hashes a safetensors file streamed once: the whole file and each tensor's bytes.

    Feed the file's bytes in order with ``update``; ``file_digest`` and ``tensor_digests`` are ready
    after the last byte. Tensors are contiguous in the data section (the strict parser checked it),
    so one pass splits each chunk at tensor boundaries.
    """

    def __init__(self, header: Any):
        self._file = hashlib.sha256()
        self._pos = 0
        self._data_offset = header.data_offset
        # (absolute start, absolute end, name) in data order
        self._spans = [(header.data_offset + t.start, header.data_offset + t.end, t.name) for t in header.tensors.values()]
        self._idx = 0
        self._current = hashlib.sha256()
        self.tensor_digests: dict[str, str] = {}
        self._skip_empty()

    def _skip_empty(self) -> None:
        while self._idx < len(self._spans) and self._spans[self._idx][0] == self._spans[self._idx][1]:
            self.tensor_digests[self._spans[self._idx][2]] = "sha256:" + hashlib.sha256(b"").hexdigest()
            self._idx += 1

    def update(self, chunk: bytes | memoryview) -> None:
        self._file.update(chunk)
        view = memoryview(chunk)
        pos = self._pos
        self._pos += len(view)
        while view and self._idx < len(self._spans):
            start, end, name = self._spans[self._idx]
            if pos + len(view) <= start:
                return
            if pos < start:
                view = view[start - pos :]
                pos = start
            take = min(len(view), end - pos)
            self._current.update(view[:take])
            view = view[take:]
            pos += take
            if pos == end:
                self.tensor_digests[name] = "sha256:" + self._current.hexdigest()
                self._current = hashlib.sha256()
                self._idx += 1
                self._skip_empty()

    @property
    def file_digest(self) -> str:
        return "sha256:" + self._file.hexdigest()
