"""`loreg sync DIR REF...`: a folder per reference, in the layout a serving engine reads, swapped atomically.

``DIR/<ref>`` (``DIR/org/bot:prod``, ``DIR/org/bot:3``, ``DIR/org/bot@sha256:…``) is a symlink to a
verified version folder ``DIR/.loreg/versions/<manifest hex>[-<base tag>]/`` (with its ``.loreg.json``
marker). That is the layout of vLLM's filesystem resolver (``VLLM_LORA_RESOLVER_CACHE_DIR=DIR``: it
joins the requested name to DIR). A new version is published whole first, then the link is
replaced by one rename, so a reader sees the old folder or the new one, never a mix. With
``watch`` each round asks the registry with If-None-Match, so an alias that did not move costs a 304.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loreg.cli.serving import BaseCheck, Refused, VersionFolders, serving_refusal
from loreg.registry.errors import LoregError, NameInvalidError
from loreg.registry.formats import names
from loreg.registry.formats.validate import VLLM_DEFAULT_MAX_LORA_RANK

if TYPE_CHECKING:
    from loreg.cli.client import RegistryClient

ENGINES = ("vllm", "plain")
STATE = ".loreg"


class Syncer:
    """Keeps ``root/<ref>`` on what each reference names.

    ``engine="vllm"`` refuses what vLLM cannot load (rank above ``max_rank``, DoRA, biases) and,
    with ``base_model`` (vLLM's ``--model``), checks the base by content and writes that name into
    each folder's adapter_config.json (vLLM's filesystem resolver compares the two).
    """

    def __init__(
        self,
        client: RegistryClient,
        root: str | Path,
        refs: list[str],
        *,
        engine: str = "plain",
        base_model: str | None = None,
        max_rank: int = VLLM_DEFAULT_MAX_LORA_RANK,
    ):
        if engine not in ENGINES:
            raise NameInvalidError(f"unknown engine {engine!r}", hint=f"choose one of {', '.join(ENGINES)}")
        for r in refs:  # malformed: refused before any work
            names.parse_reference(r)
        # kept as given: the link's name is what clients request (vLLM joins it to the folder)
        self.refs = list(dict.fromkeys(refs))
        self.client = client
        self.root = Path(root)
        self.engine = engine
        self.base_model = base_model
        self.max_rank = max_rank
        self.folders = VersionFolders(self.root / STATE / "versions", lambda: client)
        self.bases = BaseCheck(lambda: client)
        self._state_path = self.root / STATE / "state.json"
        self.state: dict[str, dict[str, Any]] = self._load_state()

    def link(self, ref: str) -> Path:
        """Where the folder for ``ref`` appears: ``root/<ref>``, the name a client requests."""
        names.parse_reference(ref)  # full-match rules: no '..', no separator but the one '/'
        namespace, rest = ref.split("/", 1)
        return self.root / namespace / rest

    def sync_once(self) -> list[dict[str, Any]]:
        """One round over every reference. Returns one result per reference: ``status`` is
        ``updated``, ``unchanged``, ``not-modified`` (a 304) or ``failed`` (with ``error``)."""
        results = []
        for ref in self.refs:
            try:
                results.append(self._sync(ref))
            except Refused as exc:
                results.append({"ref": ref, "status": "failed", "error": str(exc), "code": "REFUSED"})
            except LoregError as exc:
                results.append({"ref": ref, "status": "failed", "error": exc.message, "code": exc.code})
        self._save_state()
        return results

    def watch(
        self,
        interval_s: float,
        *,
        rounds: int | None = None,
        on_round: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> None:
        """Sync every ``interval_s`` seconds (``rounds`` times, or until interrupted)."""
        done = 0
        while rounds is None or done < rounds:
            if done:
                time.sleep(interval_s)
            results = self.sync_once()
            done += 1
            if on_round:
                on_round(results)

    def _sync(self, ref: str) -> dict[str, Any]:
        link = self.link(ref)
        known = self.state.get(ref) if link.is_symlink() and link.exists() else None
        version, etag = self.client.resolve_changed(ref, known.get("etag") if known else None)
        if version is None:  # 304: only asked with the ETag of a folder still in place
            return {"ref": ref, "status": "not-modified", **_public(known or {})}
        if self.engine == "vllm":
            refusal = serving_refusal(version, self.max_rank)
            if refusal:
                raise Refused(refusal)
            if self.base_model is not None:
                self.bases.check(self.base_model, version)
        folder = self.folders.materialize(version, self.base_model if self.engine == "vllm" else None)
        entry = {"etag": etag, "name": version.name, "version": version.number, "digest": version.digest, "path": str(link)}
        if known is not None and link.resolve() == folder.resolve():
            self.state[ref] = entry
            return {"ref": ref, "status": "unchanged", **_public(entry)}
        _swap_link(link, folder)
        self.state[ref] = entry
        return {"ref": ref, "status": "updated", **_public(entry)}

    def _load_state(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads(self._state_path.read_text())
        except (OSError, ValueError):
            return {}
        return {k: v for k, v in data.items() if isinstance(v, dict)} if isinstance(data, dict) else {}

    def _save_state(self) -> None:
        self._state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._state_path.with_name(f".state.{uuid.uuid4().hex}")
        tmp.write_text(json.dumps(self.state, indent=2, sort_keys=True))
        os.replace(tmp, self._state_path)


def _public(entry: dict[str, Any]) -> dict[str, Any]:
    return {k: entry[k] for k in ("name", "version", "digest", "path") if k in entry}


def _swap_link(link: Path, folder: Path) -> None:
    """Point ``link`` at ``folder`` by renaming a new symlink over it (atomic: never absent)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.exists() and not link.is_symlink():
        raise NameInvalidError(
            f"{link} exists and is not a link loreg sync made", hint="move it away, or sync into another folder"
        )
    tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex}")
    os.symlink(os.path.relpath(folder, link.parent), tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
