"""`loreg sync DIR REF...`: a folder per reference, in the layout a serving engine reads, swapped atomically.

Folder names, one rule: the reference as given, its first ``/`` kept as a folder separator
(``DIR/org/bot:prod``, ``DIR/org/bot:3``, ``DIR/org/bot@sha256:…``), except for ``--engine nim``,
which reads one level only and gets ``DIR/org--bot:prod`` (a name part never holds ``--``, so the
mapping is one to one). A reference is parsed with the full-match naming rules first, so no name
holds ``..``, a second separator or an absolute path: the folder is always inside DIR.

Each name is a symlink to a verified version folder ``DIR/.loreg/versions/<manifest hex>[-<base tag>]/``
(with its ``.loreg.json`` marker). A new version is published whole first, then the link is
replaced by one rename, so a reader sees the old folder or the new one, never a mix; an
interrupted sync leaves the old link. Each round is ONE request for every reference
(``POST /v1/resolve`` with If-None-Match): 304 while nothing moved. A reference that the registry
stops serving (its alias removed, its version or adapter deleted, the token's access withdrawn)
has its link removed and is reported ``removed``: an engine never keeps loading a withdrawn version
from DIR. One process syncs a DIR at a time (``DIR/.loreg/lock``); a second is refused.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loreg.cli.serving import BaseCheck, Refused, VersionFolders, serving_refusal
from loreg.registry.errors import ConflictError, LoregError, RequestInvalidError
from loreg.registry.formats import names
from loreg.registry.formats.validate import VLLM_DEFAULT_MAX_LORA_RANK

if TYPE_CHECKING:
    from loreg.cli.client import RegistryClient, ResolvedVersion

ENGINES = ("vllm", "sglang", "lorax", "nim", "plain")
STATE = ".loreg"
MAX_REFS = 1000  # the batch resolve route's bound
# the registry no longer gives this reference to this token: its folder must stop being served
GONE = frozenset({"ADAPTER_NOT_FOUND", "VERSION_NOT_FOUND", "ALIAS_NOT_FOUND", "DENIED"})
OK = frozenset({"updated", "unchanged"})


class Syncer:
    """Keeps ``root/<ref>`` on what each reference names.

    ``engine="vllm"`` refuses what vLLM cannot load (rank above ``max_rank``, DoRA, biases) and,
    with ``base_name`` (vLLM's ``--model``), checks the base by content. With any engine but
    ``plain``, ``base_name`` is written as ``base_model_name_or_path`` in each folder's copy of
    adapter_config.json (vLLM's filesystem resolver requires it to equal the served model's name);
    the registry's copy is never changed. ``jobs`` references are downloaded at once.
    """

    def __init__(
        self,
        client: RegistryClient,
        root: str | Path,
        refs: list[str],
        *,
        engine: str = "plain",
        base_name: str | None = None,
        max_rank: int = VLLM_DEFAULT_MAX_LORA_RANK,
        jobs: int = 8,
    ):
        if engine not in ENGINES:
            raise RequestInvalidError(f"unknown engine {engine!r}", hint=f"choose one of {', '.join(ENGINES)}")
        if base_name is not None and engine == "plain":
            raise RequestInvalidError("--base-name rewrites the files, and --engine plain keeps them as pushed",
                                      hint="choose the engine that serves the folder")
        for r in refs:  # malformed: refused before any work
            names.parse_reference(r)
        # kept as given: the link's name is what clients request (vLLM joins it to the folder)
        self.refs = list(dict.fromkeys(refs))
        if len(self.refs) > MAX_REFS:
            raise RequestInvalidError(f"{len(self.refs)} references; one sync follows at most {MAX_REFS}",
                                      hint="split them over several folders")
        self.client = client
        self.root = Path(root)
        self.engine = engine
        self.base_name = base_name
        self.max_rank = max_rank
        self.jobs = max(1, jobs)
        self.folders = VersionFolders(self.root / STATE / "versions", lambda: client)
        self.bases = BaseCheck(lambda: client)
        self._state_path = self.root / STATE / "state.json"
        self._lock_fd: int | None = None
        self.etag, self.last = self._load_state()

    def link(self, ref: str) -> Path:
        """Where the folder for ``ref`` appears (the rule in the module docstring)."""
        return self.root / folder_name(self.engine, ref)

    def engine_args(self) -> dict[str, Any]:
        """How to point the engine at the folder (also printed by the command)."""
        root = os.path.abspath(self.root)
        return engine_args(self.engine, root, {ref: os.path.join(root, folder_name(self.engine, ref)) for ref in self.refs})

    def sync_once(self) -> list[dict[str, Any]]:
        """One round over every reference, with one request. Returns one result per reference:
        ``status`` is ``updated``, ``unchanged``, ``not-modified`` (the round was a 304),
        ``removed`` (the registry stopped serving it: its link is gone) or ``failed``; a result
        with ``error`` and ``code`` is a reference not being served from DIR."""
        with self._held():
            etag = self.etag if self._in_place() else None
            try:
                answer, new_etag = self.client.resolve_many(self.refs, etag)
            except LoregError as exc:
                return [{"ref": r, "status": "failed", "error": exc.message, "code": exc.code} for r in self.refs]
            if answer is None:
                return [{**_public(self.last[r]), "ref": r, "status": "not-modified"} for r in self.refs]
            with ThreadPoolExecutor(max_workers=min(self.jobs, len(self.refs))) as pool:
                results = list(pool.map(lambda r: self._apply(r, answer[r]), self.refs))
            # a download that failed is retried next round: the next question must not be answered 304
            retry = [r.pop("retry", False) for r in results]
            self.etag = None if any(retry) else new_etag
            self.last = {r["ref"]: {k: v for k, v in r.items() if k != "status"} | {"ok": r["status"] in OK}
                         for r in results}
            self._save_state()
            return results

    def watch(
        self,
        interval_s: float,
        *,
        rounds: int | None = None,
        on_round: Callable[[list[dict[str, Any]]], None] | None = None,
    ) -> None:
        """Sync every ``interval_s`` seconds (``rounds`` times, or until interrupted), holding DIR's lock."""
        with self._held():
            done = 0
            while rounds is None or done < rounds:
                if done:
                    time.sleep(interval_s)
                results = self.sync_once()
                done += 1
                if on_round:
                    on_round(results)

    def _apply(self, ref: str, found: ResolvedVersion | LoregError) -> dict[str, Any]:
        link = self.link(ref)
        if isinstance(found, LoregError):
            if found.code in GONE and link.is_symlink():
                link.unlink()  # one unlink: the name stops resolving; the version folder stays for readers
                return {"ref": ref, "status": "removed", "error": found.message, "code": found.code}
            return {"ref": ref, "status": "failed", "error": found.message, "code": found.code}
        version = found
        try:
            _check_answer(ref, version)
            if self.engine == "vllm":
                refusal = serving_refusal(version, self.max_rank)
                if refusal:
                    raise Refused(refusal)
                if self.base_name is not None:
                    self.bases.check(self.base_name, version)
        except Refused as exc:
            return {"ref": ref, "status": "failed", "error": str(exc), "code": "REFUSED"}
        except LoregError as exc:
            return {"ref": ref, "status": "failed", "error": exc.message, "code": exc.code}
        try:
            folder = self.folders.materialize(version, self.base_name)
            entry = {"name": version.name, "version": version.number, "digest": version.digest, "path": str(link)}
            if link.is_symlink() and link.resolve() == folder.resolve():
                return {"ref": ref, "status": "unchanged", **entry}
            _swap_link(link, folder)
        except Refused as exc:
            return {"ref": ref, "status": "failed", "error": str(exc), "code": "REFUSED", "retry": True}
        except LoregError as exc:
            return {"ref": ref, "status": "failed", "error": exc.message, "code": exc.code, "retry": True}
        except OSError as exc:  # this machine's disk (full, read-only): the other references go on
            return {"ref": ref, "status": "failed", "error": str(exc), "code": "LOCAL_IO", "retry": True}
        return {"ref": ref, "status": "updated", **entry}

    def _in_place(self) -> bool:
        """Is every reference's last answer still on disk? Only then may the round be answered 304."""
        for ref in self.refs:
            last = self.last.get(ref)
            if last is None:
                return False
            if last.get("ok") and not (self.link(ref).is_symlink() and self.link(ref).exists()):
                return False
        return True

    @contextmanager
    def _held(self) -> Iterator[None]:
        if self._lock_fd is not None:  # held by the watch loop around this round
            yield
            return
        path = self.root / STATE / "lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConflictError(
                f"another loreg sync is working in {self.root}",
                hint="one loreg sync per folder: give it every reference, or sync into another folder",
            ) from None
        self._lock_fd = fd
        try:
            yield
        finally:
            self._lock_fd = None
            os.close(fd)  # closing the descriptor releases the lock (a killed process's too)

    def _load_state(self) -> tuple[str | None, dict[str, dict[str, Any]]]:
        try:
            data = json.loads(self._state_path.read_text())
            etag, last = data["etag"], data["refs"]
        except (OSError, ValueError, KeyError, TypeError):
            return None, {}
        if not isinstance(etag, str | None) or not isinstance(last, dict):
            return None, {}
        return etag, {k: v for k, v in last.items() if isinstance(v, dict)}

    def _save_state(self) -> None:
        self._state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._state_path.with_name(f".state.{uuid.uuid4().hex}")
        tmp.write_text(json.dumps({"etag": self.etag, "refs": self.last}, indent=2, sort_keys=True))
        os.replace(tmp, self._state_path)


def folder_name(engine: str, ref: str) -> str:
    """The folder for ``ref`` under DIR, relative (the rule in the module docstring)."""
    names.parse_reference(ref)  # full-match rules: no '..', no separator but the one '/'
    namespace, rest = ref.split("/", 1)
    return f"{namespace}--{rest}" if engine == "nim" else f"{namespace}/{rest}"


def engine_args(engine: str, root: str, links: dict[str, str]) -> dict[str, Any]:
    """What to give ``engine`` so that it reads ``links`` (reference -> folder) under ``root``."""
    if engine == "vllm":
        return {"env": {"VLLM_LORA_RESOLVER_CACHE_DIR": root, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"},
                "model": {ref: ref for ref in links}}
    if engine == "sglang":
        return {"args": ["--lora-paths", *(f"{ref}={p}" for ref, p in links.items())], "model": {ref: ref for ref in links}}
    if engine == "nim":
        return {"env": {"NIM_PEFT_SOURCE": root}, "model": {ref: os.path.basename(p) for ref, p in links.items()}}
    if engine == "lorax":
        return {"request": {ref: {"adapter_id": p, "adapter_source": "local"} for ref, p in links.items()}}
    return {"path": dict(links)}


def _check_answer(ref: str, version: ResolvedVersion) -> None:
    """A server's answer is refused whole before any download if it names another adapter, a file
    name could leave the folder or a digest is malformed (a hostile or broken registry)."""
    r = names.parse_reference(ref)
    if version.name != f"{r.namespace}/{r.name}":
        raise Refused(f"the registry answered {version.name[:200]!r} for {ref}")
    if names.DIGEST.fullmatch(version.digest) is None:
        raise Refused(f"invalid manifest digest {version.digest[:80]!r} from the registry")
    for f in version.files:
        names.check_file_name(f.path)
        if names.DIGEST.fullmatch(f.digest) is None or f.size < 0:
            raise Refused(f"invalid digest or size for {f.path} from the registry")


def _public(last: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in last.items() if k != "ok"}


def _swap_link(link: Path, folder: Path) -> None:
    """Point ``link`` at ``folder`` by renaming a new symlink over it (atomic: never absent)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.exists() and not link.is_symlink():
        raise ConflictError(
            f"{link} exists and is not a link loreg sync made", hint="move it away, or sync into another folder"
        )
    tmp = link.with_name(f".{link.name}.{uuid.uuid4().hex}")
    os.symlink(os.path.relpath(folder, link.parent), tmp)
    try:
        os.replace(tmp, link)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
