"""Reading a local base-model checkpoint: headers, per-tensor digests, layout and weights digests."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loreg.registry.errors import ConfigInvalidError, FolderInvalidError, UnsupportedFormatError
from loreg.registry.formats import fingerprint, names, safetensors

READ_CHUNK = 8 << 20
MAX_JSON = 16 << 20
# files of a checkpoint folder that travel with the weights (config, tokenizer, templates)
SIDE_FILES = names.TOKENIZER_FILES | {
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "preprocessor_config.json",
}


@dataclass
class CheckpointFile:
    path: str
    size: int
    digest: str


@dataclass
class Checkpoint:
    root: Path
    config: dict[str, Any]
    weight_files: list[CheckpointFile]
    side_files: list[CheckpointFile]
    # [name, dtype, shape, file, tensor sha256] in file order
    tensors: list[list[Any]] = field(default_factory=list)

    @property
    def layout_digest(self) -> str:
        return fingerprint.layout_digest((t[0], t[1], t[2]) for t in self.tensors)

    @property
    def weights_digest(self) -> str:
        return fingerprint.weights_digest((t[0], t[1], t[2], t[4]) for t in self.tensors)

    @property
    def files(self) -> list[CheckpointFile]:
        return sorted(self.weight_files + self.side_files, key=lambda f: f.path)


def _read_json(path: Path) -> dict[str, Any]:
    if path.stat().st_size > MAX_JSON:
        raise ConfigInvalidError(f"{path.name} is larger than {MAX_JSON} bytes")
    try:
        data = json.loads(path.read_bytes())
    except ValueError as exc:
        raise ConfigInvalidError(f"{path.name} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigInvalidError(f"{path.name} is not a JSON object")
    return data


def _hash_plain(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def _hash_weights(path: Path, progress: Callable[[int], None] | None) -> tuple[safetensors.Header, fingerprint.SafetensorsHasher]:
    header = safetensors.read_header_from_file(path)
    hasher = fingerprint.SafetensorsHasher(header)
    with open(path, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            hasher.update(chunk)
            if progress:
                progress(len(chunk))
    return header, hasher


def list_weight_files(root: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder: the index's shards, else every *.safetensors."""
    root = Path(root)
    index_path = root / "model.safetensors.index.json"
    if index_path.is_file():
        index = _read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConfigInvalidError("model.safetensors.index.json has no weight_map")
        names = sorted(set(map(str, weight_map.values())))
    else:
        names = sorted(p.name for p in root.glob("*.safetensors"))
    if not names:
        pickled = sorted(p.name for p in root.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickled:
            raise UnsupportedFormatError(
                f"{root} holds weights only as pickle ({', '.join(pickled)}); loreg reads safetensors only",
                hint="convert: AutoModel.from_pretrained(DIR).save_pretrained(DIR, safe_serialization=True)",
            )
        raise FolderInvalidError(f"no .safetensors weights in {root}")
    for name in names:
        if "/" in name or name.startswith(".") or not (root / name).is_file():
            raise ConfigInvalidError(f"weight file {name!r} is missing or not a plain file name")
    return [root / n for n in names]


def layout_digest(root: str | os.PathLike[str]) -> str:
    """A checkpoint's layout digest from its safetensors headers alone (no weight is read)."""
    return read_layout(Path(root)).layout_digest


@dataclass
class LocalLayout:
    """A checkpoint read from its safetensors headers alone."""

    paths: list[Path]
    tensors: list[tuple[str, str, list[int]]]  # [name, dtype, shape]
    size: int  # bytes of the weight files

    @property
    def layout_digest(self) -> str:
        return fingerprint.layout_digest(self.tensors)


def read_layout(root: Path) -> LocalLayout:
    """The tensor layout of a checkpoint folder from its headers (no tensor bytes are read)."""
    paths = list_weight_files(root)
    tensors: list[tuple[str, str, list[int]]] = []
    seen: set[str] = set()
    for path in paths:
        for t in safetensors.read_header_from_file(path).tensors.values():
            if t.name in seen:
                raise ConfigInvalidError(f"tensor {t.name} appears in two shards", detail={"key": t.name})
            seen.add(t.name)
            tensors.append((t.name, t.dtype, list(t.shape)))
    return LocalLayout(paths=paths, tensors=tensors, size=sum(p.stat().st_size for p in paths))


def weights_digest(paths: list[Path], *, workers: int | None = None) -> str:
    """The weights digest of a checkpoint's safetensors files (every tensor hashed, files in parallel)."""
    workers = workers or min(8, max(1, (os.cpu_count() or 2)), len(paths))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda p: _hash_weights(p, None), paths))
    return fingerprint.weights_digest(
        (t.name, t.dtype, t.shape, hasher.tensor_digests[t.name]) for header, hasher in results for t in header.tensors.values()
    )


def scan_checkpoint(
    root: Path, *, workers: int | None = None, progress: Callable[[int, int], None] | None = None
) -> Checkpoint:
    """Read config.json and every safetensors file of a checkpoint folder (one file or shards).

    Files are hashed in parallel, each read once for both its own digest and its tensors' digests.
    ``progress(advance, total)`` is called as bytes are hashed (total: the weight files' sizes).
    """
    root = Path(root)
    if not (root / "config.json").is_file():
        raise FolderInvalidError(f"no config.json in {root}", hint="register the folder written by save_pretrained()")
    config = _read_json(root / "config.json")
    paths = list_weight_files(root)
    total = sum(p.stat().st_size for p in paths)
    advance = (lambda n: progress(n, total)) if progress else None
    workers = workers or min(8, max(1, (os.cpu_count() or 2)), len(paths))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda p: _hash_weights(p, advance), paths))
        side = [p for p in sorted(root.iterdir()) if p.name in SIDE_FILES and p.is_file()]
        side_digests = list(pool.map(_hash_plain, side))
    tensors: list[list[Any]] = []
    seen: set[str] = set()
    weight_files = []
    for path, (header, hasher) in zip(paths, results):
        weight_files.append(CheckpointFile(path.name, path.stat().st_size, hasher.file_digest))
        for t in header.tensors.values():
            if t.name in seen:
                raise ConfigInvalidError(f"tensor {t.name} appears in two shards", detail={"key": t.name})
            seen.add(t.name)
            tensors.append([t.name, t.dtype, list(t.shape), path.name, hasher.tensor_digests[t.name]])
    side_files = [CheckpointFile(p.name, p.stat().st_size, d) for p, d in zip(side, side_digests)]
    return Checkpoint(root=root, config=config, weight_files=weight_files, side_files=side_files, tensors=tensors)
