"""What the serving side shares (the vLLM resolver and `loreg sync`): engine limits, the base check by
content, and verified version folders published whole by one rename.

Uses only the public client; imports no serving engine and nothing of the server.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loreg.registry.errors import BaseNotFoundError, NameInvalidError

if TYPE_CHECKING:
    from loreg.cli.client import RegistryClient, ResolvedVersion

MARKER = ".loreg.json"  # in each version folder: what it holds (written before the folder is published)
CHUNK = 1 << 20


class Refused(Exception):
    """A version that must not be served here; the message is the reason."""


def serving_refusal(version: ResolvedVersion, max_rank: int) -> str | None:
    """Why vLLM (started with ``--max-lora-rank max_rank``) would refuse this version, or None."""
    cfg, facts = version.config, version.facts
    pattern = cfg.get("rank_pattern") or {}
    ranks = [facts.get("r") or cfg.get("r") or 0, *facts.get("ranks", []), *(pattern.values() if isinstance(pattern, dict) else [])]
    rank = max(int(r) for r in ranks if isinstance(r, int | float))
    if rank > max_rank:
        return (f"rank {rank} exceeds the max LoRA rank {max_rank} (set LOREG_VLLM_MAX_LORA_RANK to vLLM's "
                f"--max-lora-rank, at least {rank})")
    if facts.get("use_dora") or cfg.get("use_dora"):
        return "it uses DoRA, which vLLM does not load"
    if facts.get("has_bias") or cfg.get("lora_bias") or cfg.get("bias", "none") != "none":
        return "it trains biases (bias / lora_bias), which vLLM does not load"
    return None


class BaseCheck:
    """Is a served base (an engine's ``--model``: a registered name or a local folder) this version's?

    A folder's layout is read once per process (the engine serves one base for its life); registered
    names are remembered once found (a name registered later must still be seen).
    """

    def __init__(self, client: Callable[[], RegistryClient]):
        self._client = client
        self._lock = threading.Lock()
        self._folder_layouts: dict[str, str] = {}
        self._bases: dict[str, tuple[str, str]] = {}

    def check(self, base_model_name: str, version: ResolvedVersion) -> None:
        """Raises Refused unless the base is the version's base or shares its layout."""
        if not version.base_layout_digest:
            raise Refused(f"{version.ref} records no base model")
        named = ", ".join(version.base_names) or "unnamed"
        if os.path.isdir(base_model_name):
            layout = self._folder_layout(base_model_name)
            if layout != version.base_layout_digest:
                raise Refused(
                    f"the base folder's layout {layout[:19]}… is not the adapter's base layout "
                    f"{version.base_layout_digest[:19]}… ({named})"
                )
            return
        known = self._bases.get(base_model_name)
        if known is None:
            try:
                base = self._client().base(base_model_name)
            except (BaseNotFoundError, NameInvalidError):
                raise Refused(
                    f"base {base_model_name!r} is not registered in loreg (loreg base register DIR --name "
                    f"{base_model_name}, or serve a local folder)"
                ) from None
            known = self._bases[base_model_name] = (base["weights_digest"], base["layout_digest"])
        weights, layout = known
        if weights != version.base_weights_digest and layout != version.base_layout_digest:
            raise Refused(f"base {base_model_name!r} is not the adapter's base ({named}) and does not share its layout")

    def _folder_layout(self, folder: str) -> str:
        from loreg.cli.checkpoint import layout_digest

        key = os.path.realpath(folder)
        with self._lock:
            cached = self._folder_layouts.get(key)
        if cached is None:
            try:
                cached = layout_digest(key)
            except Exception as exc:  # a folder without readable safetensors cannot be checked
                raise Refused(f"cannot read the base folder's safetensors headers: {exc}") from None
            with self._lock:
                self._folder_layouts[key] = cached
        return cached


class VersionFolders:
    """``root/<manifest hex>[-<base tag>]/``: a version's files, verified, each folder published whole.

    A folder is filled beside its final name (``Client.pull_resolved``, through the content-addressed cache
    and its per-digest locks) and renamed into place, so processes sharing ``root`` never see half a
    folder; the loser of a race uses the winner's. A published folder is verified again on use and
    rebuilt when damaged. With ``base_model_name_or_path`` the folder's adapter_config.json names
    that base instead (what vLLM's filesystem resolver compares with its ``--model``).
    """

    def __init__(self, root: Path, client: Callable[[], RegistryClient]):
        self.root = Path(root)
        self._client = client

    def folder(self, version: ResolvedVersion, base_model_name_or_path: str | None = None) -> Path:
        hexdigest = version.digest.removeprefix("sha256:")
        if len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest):
            raise Refused(f"invalid manifest digest {version.digest[:80]!r} from the registry")
        if _config_override(version, base_model_name_or_path) is None:
            return self.root / hexdigest
        tag = hashlib.sha256(str(base_model_name_or_path).encode()).hexdigest()[:16]
        return self.root / f"{hexdigest}-{tag}"

    def materialize(self, version: ResolvedVersion, base_model_name_or_path: str | None = None) -> Path:
        final = self.folder(version, base_model_name_or_path)
        override = _config_override(version, base_model_name_or_path)
        if final.is_dir():
            if _verified(final, version, override):
                return final
            # damaged in place (a linked file edited, a disk error): move it out of the way whole
            aside = self.root / f".damaged-{final.name}-{uuid.uuid4().hex}"
            try:
                os.rename(final, aside)
                shutil.rmtree(aside, ignore_errors=True)
            except FileNotFoundError:
                pass  # another process moved it already
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".staging-{final.name}-{uuid.uuid4().hex}"
        try:
            self._client().pull_resolved(version, staging)
            if override is not None:
                _replace_file(staging / "adapter_config.json", json.dumps(override, indent=2, sort_keys=True).encode())
            marker = {
                "name": version.name, "version": version.number, "digest": version.digest,
                "base_model_name_or_path": base_model_name_or_path if override is not None else None,
                "files": [[f.path, f.size, f.digest] for f in version.files],
            }
            (staging / MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True))
            try:
                os.rename(staging, final)
            except OSError:
                if not _verified(final, version, override):  # someone else published it first: theirs
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return final


def _config_override(version: ResolvedVersion, base: str | None) -> dict[str, Any] | None:
    if base is None or version.config.get("base_model_name_or_path") == base:
        return None
    return {**version.config, "base_model_name_or_path": base}


def _replace_file(path: Path, data: bytes) -> None:
    # a new file, never written through: the old one may be a hard link into the shared cache
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _verified(folder: Path, version: ResolvedVersion, override: dict[str, Any] | None = None) -> bool:
    for f in version.files:
        path = folder / f.path
        try:
            if override is not None and f.path == "adapter_config.json":
                if json.loads(path.read_bytes()) != override:
                    return False
                continue
            if path.stat().st_size != f.size:
                return False
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                while chunk := fh.read(CHUNK):
                    h.update(chunk)
        except (OSError, ValueError):
            return False
        if "sha256:" + h.hexdigest() != f.digest:
            return False
    return True
