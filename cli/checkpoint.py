"""Reading a local base-model checkpoint: headers, per-tensor digests, layout and weights digests."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loreg.registry.errors import ConfigInvalidError, NameInvalidError, UnsupportedFormatError
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


def _weight_paths(root: Path) -> list[Path]:
    """The safetensors files of a checkpoint: those its index names, else every *.safetensors."""
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
        raise NameInvalidError(f"{root} has no .safetensors weights")
    for name in names:
        if "/" in name or name.startswith(".") or not (root / name).is_file():
            raise ConfigInvalidError(f"weight file {name!r} is missing or not a plain file name")
    return [root / n for n in names]


def layout_digest(root: str | os.PathLike[str]) -> str:
    """A checkpoint's layout digest from its safetensors headers alone (no weight is read)."""
    tensors: list[tuple[str, str, list[int]]] = []
    for path in _weight_paths(Path(root)):
        header = safetensors.read_header_from_file(path)
        tensors.extend((t.name, t.dtype, list(t.shape)) for t in header.tensors.values())
    return fingerprint.layout_digest(tensors)


def scan_checkpoint(root: Path, *, workers: int | None = None, progress: Callable[[int], None] | None = None) -> Checkpoint:
    """Read config.json and every safetensors file of a checkpoint folder (one file or shards).

    Files are hashed in parallel, each read once for both its own digest and its tensors' digests.
    """
    root = Path(root)
    if not (root / "config.json").is_file():
        raise NameInvalidError(f"{root} has no config.json", hint="register the folder written by save_pretrained()")
    config = _read_json(root / "config.json")
    paths = _weight_paths(root)
    workers = workers or min(8, max(1, (os.cpu_count() or 2)), len(paths))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(pool.map(lambda p: _hash_weights(p, progress), paths))
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
