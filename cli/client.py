"""RegistryClient: the Python API of a loreg server (the CLI is a thin layer over it).

    from loreg.cli.client import RegistryClient
    client = RegistryClient()                      # LOREG_URL / LOREG_TOKEN / credentials file
    result = client.push("./out", "org/support-bot", metrics={"eval_loss": 1.21}, aliases=["staging"])
    client.pull("org/support-bot:staging", "./adapter")

Errors are the server's typed errors (``loreg.registry.errors``), rebuilt from its error envelope.
"""

from __future__ import annotations

import base64
import errno
import fcntl
import hashlib
import json
import os
import queue
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
import urllib.request
from urllib.parse import quote

import httpx
import urllib3

from loreg.cli import config
from loreg.registry.errors import (
    BaseNotFoundError,
    BaseUnknownError,
    ERRORS,
    ConnectionFailedError,
    DigestInvalidError,
    DigestMismatchError,
    ExportTimeoutError,
    FolderInvalidError,
    InternalError,
    LoregError,
    RequestInvalidError,
    SizeMismatchError,
    UnsupportedFormatError,
    error_from_envelope,
)
from loreg.registry.formats import names

CHUNK = 4 << 20
DIRECT_PART_SIZE = 16 << 20  # presigned uploads: S3's minimum is 5 MiB
MAX_PARTS = 10_000
Progress = Callable[[str, int, int], None]  # (label, advance bytes, total bytes)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


@dataclass
class AdapterFolder:
    """The files of a PEFT adapter folder that loreg stores, and what it leaves out."""

    root: Path
    files: dict[str, Path]
    skipped: list[str] = field(default_factory=list)


class DigestCache:
    """The sha256 of local files, kept under LOREG_HOME so that pushing a folder again (a retry, a
    new alias, the same weights under another name) does not hash its gigabytes again.

    An entry is keyed by what any write to the file changes: device, inode, size, mtime and ctime
    in nanoseconds (ctime cannot be set back by a user). A digest is kept only for a file last
    written ``MARGIN_NS`` before it was hashed and unchanged while hashed: a write within the same
    timestamp tick as the hash would change the bytes and leave those fields as they were. A stale
    digest would be dangerous (a file the server already holds under that digest is not uploaded
    again, so the version would name the old bytes); a digest the upload's bytes do not match is
    refused by the server, and the entry is dropped then.
    """

    MARGIN_NS = 2_000_000_000

    def __init__(self, root: Path):
        self.root = root

    def _entry(self, st: os.stat_result) -> Path:
        key = f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
        name = hashlib.sha256(key.encode()).hexdigest()
        return self.root / name[:2] / name

    def digest(self, path: Path) -> str:
        """The file's sha256 digest (``sha256:<hex>``), from the cache when its entry still holds."""
        before = os.stat(path)
        entry = self._entry(before)
        try:
            cached = entry.read_text()
        except OSError:
            cached = ""
        if names.DIGEST.fullmatch(cached):
            return cached
        started = time.time_ns()
        digest = sha256_file(path)
        after = os.stat(path)
        if self._entry(after) == entry and max(after.st_mtime_ns, after.st_ctime_ns) < started - self.MARGIN_NS:
            try:
                entry.parent.mkdir(parents=True, exist_ok=True)
                temp = entry.with_name(f"{entry.name}.{secrets.token_hex(4)}.tmp")
                temp.write_text(digest)
                os.replace(temp, entry)
            except OSError:  # a read-only home: the digest is only not kept
                pass
        return digest

    def forget(self, path: Path) -> None:
        try:
            self._entry(os.stat(path)).unlink(missing_ok=True)
        except OSError:
            pass


@dataclass(frozen=True)
class FileEntry:
    """A file of a version: its path in the adapter folder, size and sha256 digest."""

    path: str
    size: int
    digest: str


@dataclass(frozen=True)
class ResolvedVersion:
    """What a reference names right now, pinned: a version never changes once made.

    ``ref`` (``ns/name@sha256:…``) names these bytes for good, whatever aliases do later.
    """

    name: str
    number: int
    digest: str
    base_weights_digest: str | None
    base_layout_digest: str | None
    base_names: tuple[str, ...]
    files: tuple[FileEntry, ...]
    config: dict[str, Any]
    facts: dict[str, Any]
    warnings: tuple[dict[str, Any], ...]

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.digest}"

    @classmethod
    def from_json(cls, v: dict[str, Any]) -> ResolvedVersion:
        base = v.get("base") or {}
        return cls(
            name=v["name"],
            number=int(v["version"]),
            digest=v["digest"],
            base_weights_digest=base.get("weights_digest"),
            base_layout_digest=base.get("layout_digest"),
            base_names=tuple(base.get("names") or ()),
            files=tuple(FileEntry(f["path"], int(f["size"]), f["digest"]) for f in v["files"]),
            config=dict(v.get("config") or {}),
            facts=dict(v.get("facts") or {}),
            warnings=tuple(v.get("warnings") or ()),
        )


def scan_adapter_folder(root: Path) -> AdapterFolder:
    """Pick the adapter's files; refuse pickle-only weights; fail fast on an invalid adapter."""
    from loreg.registry.formats import peft, safetensors

    root = Path(root)
    if not root.is_dir():
        raise FolderInvalidError(f"{root} is not a folder", hint="push the folder written by save_pretrained()")
    files: dict[str, Path] = {}
    skipped: list[str] = []
    for entry in sorted(root.iterdir()):
        if entry.name in names.ADAPTER_FILES and entry.is_file() and not entry.is_symlink():
            files[entry.name] = entry
        else:
            skipped.append(entry.name + ("/" if entry.is_dir() else ""))
    if "adapter_config.json" not in files:
        # a trainer's output folder holds the adapters one level down (checkpoint-500/)
        inner = sorted(p.parent.name for p in root.glob("*/adapter_config.json"))[:3]
        raise FolderInvalidError(
            f"no adapter_config.json in {root}",
            detail={"folder": str(root), "subfolders_with_adapters": inner},
            hint=f"push one of its subfolders: {', '.join(str(root / i) for i in inner)}" if inner
            else "push the folder written by PeftModel.save_pretrained()",
        )
    if "adapter_model.safetensors" not in files:
        pickled = [s for s in skipped if s.lower().endswith(names.PICKLE_SUFFIXES)]
        if pickled:
            raise UnsupportedFormatError(
                f"{root} holds weights only as pickle ({', '.join(pickled)}); loreg never stores pickle",
                detail={"files": pickled},
                hint="convert to safetensors: PeftModel.from_pretrained(base, DIR).save_pretrained(DIR, safe_serialization=True)",
            )
        raise FolderInvalidError(
            f"no adapter_model.safetensors in {root}", hint="push the folder written by PeftModel.save_pretrained()"
        )
    peft.parse_adapter_config(files["adapter_config.json"].read_bytes()[: 64 * 1024 + 1])
    safetensors.read_header_from_file(files["adapter_model.safetensors"])
    return AdapterFolder(root=root, files=files, skipped=skipped)


# A local base folder is hashed in full (every tensor) only up to this size (models up to ~2B
# parameters in bf16): sha256 runs at 0.5-2 GB/s per core and shards hash in parallel, so this
# costs seconds; above it the layout alone decides.
BASE_HASH_LIMIT = 4 << 30
BASE_HINT = "pass the base explicitly: --base ORG/MODEL (or its sha256 digest)"


@dataclass
class BaseChoice:
    """Which base a push or check validates against, and how it was chosen."""

    ref: str | None  # sent as the push's ``base``; None: the server takes the config's name
    source: str  # "explicit" (--base), "config" (the config's name), "weights" or "layout" (a local folder)
    name: str | None = None  # the base's name, for messages
    path: str | None = None  # the local folder matched by content

    @property
    def by_content(self) -> bool:
        return self.source in ("weights", "layout")

    def describe(self) -> dict[str, Any]:
        return {"ref": self.ref, "by": self.source, "name": self.name, "path": self.path}


def _local_folder(value: str) -> Path | None:
    """base_model_name_or_path as a folder on this machine (transformers tries a folder first too)."""
    try:
        path = Path(value).expanduser()
        return path if path.is_dir() else None
    except (OSError, ValueError):
        return None


def _looks_like_path(value: str) -> bool:
    return value.startswith(("/", ".", "~")) or "\\" in value or value.count("/") > 1


class RegistryClient:
    """A loreg server. Every method raises a ``LoregError`` subclass on failure."""

    def __init__(
        self, url: str | None = None, token: str | None = None, *, timeout: float = 60.0, http: httpx.Client | None = None
    ):
        self.url = config.server_url(url)
        self.token = token if token is not None else config.token_for(self.url)
        headers = {"User-Agent": "loreg-cli"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        if http is not None:  # e.g. an in-process ASGI test client
            http.headers.update(headers)
            http.follow_redirects = False  # a redirect to storage must not carry the token
            self._http = http
        else:
            self._http = httpx.Client(
                base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout, connect=10.0), follow_redirects=False
            )
        self._headers = headers
        # file downloads from the server itself go through urllib3 too (see _open_download), unless
        # the client was handed its own transport or httpx would send the request through a proxy
        self._bulk = http is None and not _proxied(self.url)
        self._timeout = timeout
        self._api: urllib3.PoolManager | None = None  # the server's file downloads, with the token
        self._direct: urllib3.PoolManager | None = None  # presigned storage URLs: no loreg headers

    def close(self) -> None:
        self._http.close()
        for pool in (self._api, self._direct):
            if pool is not None:
                pool.clear()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- plumbing -----------------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            resp = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise ConnectionFailedError(
                f"cannot reach {self.url}: {exc.__class__.__name__}",
                hint="is `loreg serve` running there? set LOREG_URL to point elsewhere",
            ) from exc
        if resp.status_code >= 400:
            try:
                body = resp.json()
            except ValueError:
                body = None
            raise error_from_envelope(resp.status_code, body, request_id=resp.headers.get("x-request-id"))
        return resp

    def get_json(self, path: str, **kwargs: Any) -> Any:
        return self.request("GET", path, **kwargs).json()

    @contextmanager
    def _open_download(self, url: str, headers: dict[str, str]) -> Iterator[_Download]:
        """GET a file; when the server redirects to a presigned storage URL, follow it with a
        separate connection pool that carries no loreg token (the URL is its own credential).

        Both are fetched with urllib3 (botocore's HTTP library): its reads land in large buffers
        straight from the socket, where httpx reads 64 KiB at a time and parses each piece in Python
        (17 of 24 s of a 1 GB pull over a 1 Gbit/s link were httpx's reads).
        """
        if self._bulk:
            with self._api_download(url, headers) as (download, location):
                if location is None:
                    yield download
                    return
        else:
            with self._http.stream("GET", url, headers={**headers, "X-Loreg-Direct": "1"}) as resp:
                if resp.status_code != 307 or "location" not in resp.headers:
                    yield _Download(resp.status_code, resp.iter_bytes(CHUNK), lambda: _api_error(resp))
                    return
                location = resp.headers["location"]
        if not location.startswith(("http://", "https://")):
            raise ConnectionFailedError("the server redirected a download to an unsupported URL")
        direct = self._direct_pool().request("GET", location, headers=headers, preload_content=False, redirect=False)
        try:
            # the stored bytes as they are: no content decoding, the digest is over these bytes
            yield _Download(direct.status, direct.stream(CHUNK, decode_content=False), lambda: _storage_error(direct.status))
        except BaseException:
            direct.close()  # a body left half read: the connection is not reused
            raise
        direct.release_conn()

    @contextmanager
    def _api_download(self, url: str, headers: dict[str, str]) -> Iterator[tuple[_Download, str | None]]:
        """GET a file from the server with urllib3: the download, or the redirect's location."""
        if self._api is None:
            tls = httpx.create_ssl_context() if self.url.startswith("https://") else None  # httpx's CAs
            self._api = urllib3.PoolManager(
                timeout=urllib3.Timeout(connect=10.0, read=self._timeout), retries=False, maxsize=2, ssl_context=tls
            )
        resp = self._api.request(
            "GET", self.url + url, headers={**self._headers, **headers, "X-Loreg-Direct": "1"},
            preload_content=False, redirect=False,
        )
        try:
            location = resp.headers.get("location") if resp.status == 307 else None
            if location is not None:
                resp.drain_conn()
                yield _Download(resp.status, iter(()), lambda: _storage_error(resp.status)), location
            else:
                chunks = resp.stream(CHUNK, decode_content=False)  # the digest is over the bytes as sent
                yield _Download(resp.status, chunks, lambda: _pool_error(resp)), None
        except BaseException:
            resp.close()  # a body left half read: the connection is not reused
            raise
        resp.release_conn()

    @staticmethod
    def _path(namespace: str, name: str) -> str:
        names.check_name(namespace, name)
        return f"/v1/adapters/{namespace}/{name}"

    # --- blobs --------------------------------------------------------------------------------
    # Blobs belong to an adapter (``name``, ``ns/name``): checks, uploads and mounts name it. With no
    # ``name`` they are a base model's weights (an admin token for every namespace).

    def _blobs_path(self, name: str | None) -> str:
        if name is None:
            return "/v1/base-models/blobs"
        return f"{self._path(*names.split_name(name))}/blobs"

    def missing_blobs(self, digests: list[str], name: str | None = None) -> list[str]:
        """Which digests ``name`` does not hold yet (or, without a name, storage lacks)."""
        return self._check_blobs(digests, name)[0]

    def _check_blobs(self, digests: list[str], name: str | None = None) -> tuple[list[str], bool]:
        """The missing digests, and whether the server takes direct (presigned) uploads."""
        if not digests:
            return [], False
        answer = self.request("POST", self._blobs_path(name) + ":check", json={"digests": digests}).json()
        return list(answer["missing"]), bool(answer.get("direct_upload", False))

    def upload_blob_direct(
        self, path: Path, digest: str, size: int, name: str, progress: Progress | None = None
    ) -> dict[str, Any] | None:
        """Upload a file for adapter ``name`` straight to storage through presigned part URLs, then
        have the server adopt it (it reads and verifies the bytes there). None when storage cannot
        be reached from here or refuses the URLs: upload through the API then."""
        base = self._blobs_path(name)
        part_size = max(DIRECT_PART_SIZE, -(-size // MAX_PARTS))
        checksums = _part_checksums(path, part_size)
        stage = {"digest": digest, "size": size, "part_size": part_size, "part_sha256": checksums}
        staged = self.request("POST", base + ":stage", json=stage).json()
        direct = self._direct_pool()
        with open(path, "rb") as f:
            for url, checksum in zip(staged["urls"], checksums, strict=True):
                if not url.startswith(("http://", "https://")):
                    return None
                part = f.read(staged["part_size"])
                # signed into the URL: storage refuses a part whose bytes changed since they were hashed
                headers = {"Content-Length": str(len(part)), "x-amz-checksum-sha256": checksum,
                           "x-amz-sdk-checksum-algorithm": "SHA256"}
                try:
                    resp = direct.request("PUT", url, body=part, headers=headers, redirect=False)
                except urllib3.exceptions.HTTPError:
                    return None  # storage unreachable from here (the staged upload is left to gc)
                if resp.status >= 300:
                    return None
                if progress:
                    progress(path.name, len(part), size)
        adopt = {"digest": digest, "size": size, "nonce": staged["nonce"], "upload_id": staged["upload_id"]}
        return dict(self.request("POST", base + ":adopt", json=adopt).json())

    def _direct_pool(self) -> urllib3.PoolManager:
        if self._direct is None:
            self._direct = urllib3.PoolManager(
                timeout=urllib3.Timeout(connect=10.0, read=self._timeout), retries=False, maxsize=2
            )
        return self._direct

    def upload_blob(
        self, path: Path, digest: str, size: int, progress: Progress | None = None, name: str | None = None
    ) -> dict[str, Any]:
        """Upload a file for adapter ``name`` (or as base weights); the server reads and verifies it."""

        def body() -> Iterator[bytes]:
            with open(path, "rb") as f:
                while chunk := f.read(CHUNK):
                    if progress:
                        progress(path.name, len(chunk), size)
                    yield chunk

        return self.request(
            "PUT",
            f"{self._blobs_path(name)}/{digest}",
            content=body(),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
        ).json()

    # --- base choice --------------------------------------------------------------------------

    def choose_base(self, config: Any, base: str | None = None) -> BaseChoice:
        """The base to validate an adapter against: ``base`` when given; else the config's
        ``base_model_name_or_path``, and when that is a folder here, the registered base with the
        same content (the same weights first, else the only base with the same layout).

        Raises:
            BaseUnknownError: no name, a folder that does not exist, no registered base with the
                folder's layout, or several with it and none with its weights.
        """
        if base is not None:
            return BaseChoice(base, "explicit", name=base)
        name = config.base_model_name_or_path
        if not name:
            raise BaseUnknownError(
                "adapter_config.json names no base model (base_model_name_or_path is empty)", hint=BASE_HINT
            )
        folder = _local_folder(name)
        if folder is not None:
            return self._base_by_content(folder)
        try:
            names.check_base_name(name)
        except LoregError:
            if _looks_like_path(name):
                raise BaseUnknownError(
                    f"base_model_name_or_path {name[:200]!r} is a folder that does not exist on this machine",
                    detail={"base": name[:200]},
                    hint=BASE_HINT + ", or run this where that folder exists to match it by content",
                ) from None
            raise BaseUnknownError(
                f"base_model_name_or_path {name[:200]!r} is not a registered base model name",
                detail={"base": name[:200]},
                hint=BASE_HINT,
            ) from None
        ref = f"{name}@{config.revision}" if config.revision and config.revision != "main" else name
        return BaseChoice(None, "config", name=ref)

    def _base_by_content(self, folder: Path) -> BaseChoice:
        from loreg.cli.checkpoint import read_layout, weights_digest

        try:
            local = read_layout(folder)
        except LoregError as exc:
            raise BaseUnknownError(
                f"base_model_name_or_path is the folder {folder}, and it cannot be read as a checkpoint: {exc.message}",
                detail={"path": str(folder)},
                hint=BASE_HINT,
            ) from None
        layout = local.layout_digest
        candidates = self.get_json("/v1/base-models", params={"layout_digest": layout})["items"]
        if not candidates:
            raise BaseUnknownError(
                f"no registered base model has the tensor layout of {folder} ({layout[:19]})",
                detail={"path": str(folder), "layout_digest": layout},
                hint=f"register it (loreg base register {folder} --name ORG/MODEL), or {BASE_HINT}",
            )
        chosen, by = None, "layout"
        if local.size <= BASE_HASH_LIMIT:
            weights = weights_digest(local.paths)
            chosen = next((c for c in candidates if c["weights_digest"] == weights), None)
            by = "weights" if chosen is not None else "layout"
        if chosen is None and len(candidates) == 1:
            chosen = candidates[0]
        if chosen is None:
            labels = [", ".join(c["names"]) or c["weights_digest"][:19] for c in candidates]
            refs = [c["names"][0] if c["names"] else c["weights_digest"][:19] for c in candidates]
            why = "none has its exact weights" if local.size <= BASE_HASH_LIMIT else "its weights are too large to hash here"
            raise BaseUnknownError(
                f"{len(candidates)} registered base models have the tensor layout of {folder} and {why}: "
                + "; ".join(labels),
                detail={
                    "path": str(folder),
                    "layout_digest": layout,
                    "candidates": [{"digest": c["weights_digest"], "names": c["names"]} for c in candidates],
                },
                hint="pass the one it was trained on: " + " or ".join(f"--base {r}" for r in refs),
            )
        label = chosen["names"][0] if chosen["names"] else chosen["weights_digest"][:19]
        return BaseChoice(chosen["weights_digest"], by, name=label, path=str(folder))

    def mount_blob(self, name: str, digest: str, source: str) -> dict[str, Any]:
        """Link a blob that adapter ``source`` holds to ``name`` without sending it (needs read on ``source``)."""
        names.split_name(source)
        return self.request("POST", self._blobs_path(name) + ":mount", json={"digest": digest, "from": source}).json()

    def validate(self, folder: str | Path, name: str, *, base: str | None = None) -> dict[str, Any]:
        """Ask the server to validate an adapter folder for ``name`` from its config and safetensors
        header alone (a few KiB sent, nothing stored): the refusal a commit would give, or the base
        and warnings."""
        return self._preflight(scan_adapter_folder(Path(folder)), name, base)

    def _preflight(self, scanned: AdapterFolder, name: str, base: str | None) -> dict[str, Any]:
        from loreg.registry.formats import preflight, safetensors

        namespace, short = names.split_name(name)
        weights = scanned.files["adapter_model.safetensors"]
        with open(weights, "rb") as f:
            first = f.read(8)
            prefix = first + f.read(safetensors.header_length(first))
        config = scanned.files["adapter_config.json"].read_bytes()
        params: dict[str, Any] = {"size": weights.stat().st_size}
        if base is not None:
            params["base"] = base
        return self.request(
            "POST",
            f"{self._path(namespace, short)}/versions:validate",
            params=params,
            content=preflight.pack(config, prefix),
            headers={"Content-Type": "application/octet-stream"},
        ).json()

    # --- adapters -----------------------------------------------------------------------------

    def push(
        self,
        folder: str | Path,
        name: str,
        *,
        metrics: dict[str, float] | None = None,
        aliases: list[str] | None = None,
        message: str | None = None,
        base: str | None = None,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """Push a PEFT adapter folder as the next version of ``name`` (``ns/name``).

        The server validates the config and header first; then only the files this adapter does
        not hold yet are uploaded (the server reads and verifies each). Returns the version (the server's JSON) plus
        ``bytes_uploaded``, ``files_uploaded`` and ``skipped``.

        Raises:
            LoregError: invalid adapter, name or base; server-side refusal.
        """
        namespace, short = names.split_name(name)
        for a in aliases or []:
            names.check_alias(a)
        scanned = scan_adapter_folder(Path(folder))
        from loreg.registry.formats import peft

        choice = self.choose_base(peft.parse_adapter_config(scanned.files["adapter_config.json"].read_bytes()), base)
        # refused before a byte of the files is sent: an unknown base or wrong shapes upload nothing
        self._preflight(scanned, name, choice.ref)
        entries = []
        digests = DigestCache(config.cache_dir() / "digests")
        for rel, path in scanned.files.items():
            entries.append({"path": rel, "size": path.stat().st_size, "digest": digests.digest(path)})
        missing_list, direct = self._check_blobs(sorted({e["digest"] for e in entries}), name)
        missing = set(missing_list)
        uploaded = 0
        files_uploaded = []
        done: set[str] = set()
        for e in entries:
            if e["digest"] in missing and e["digest"] not in done:
                path = scanned.files[e["path"]]
                try:
                    sent = direct and self.upload_blob_direct(path, e["digest"], e["size"], name, progress) is not None
                    if not sent:
                        direct = False  # storage is not reachable from here: the API for the rest
                        self.upload_blob(path, e["digest"], e["size"], progress, name=name)
                except (DigestMismatchError, SizeMismatchError) as exc:
                    digests.forget(path)
                    exc.detail["hint"] = f"{e['path']} changed while it was pushed (or since it was hashed): push again"
                    raise
                uploaded += e["size"]
                files_uploaded.append(e["path"])
                done.add(e["digest"])
        body: dict[str, Any] = {"files": entries, "metrics": metrics or {}, "aliases": aliases or []}
        if message is not None:
            body["message"] = message
        if choice.ref is not None:
            body["base"] = choice.ref
        if choice.by_content:
            body["base_source"] = choice.source
        resp = self.request("POST", f"{self._path(namespace, short)}/versions", json=body)
        out = resp.json()
        out["created"] = resp.status_code == 201
        if choice.by_content:
            out["base_match"] = choice.describe()
        out["bytes_uploaded"] = uploaded
        out["files_uploaded"] = files_uploaded
        out["skipped"] = scanned.skipped
        return out

    def version(self, ref: str) -> dict[str, Any]:
        r = names.parse_reference(ref)
        return self.get_json(f"{self._path(r.namespace, r.name)}/versions/{quote(r.tag, safe=':')}")

    def diff(self, first: str, second: str) -> dict[str, Any]:
        """Compare two versions on one base, per module (the server's DiffPublic as a dict).

        Raises:
            ReferenceInvalidError: a reference is malformed (checked before any request).
            BaseMismatchError: the versions are not on the same base model.
        """
        one, two = names.parse_reference(first), names.parse_reference(second)
        sep = "@" if two.tag.startswith("sha256:") else ":"
        other = f"{two.namespace}/{two.name}{sep}{two.tag}"
        path = f"{self._path(one.namespace, one.name)}/versions/{quote(one.tag, safe=':')}/diff/{quote(other, safe='/:@')}"
        return self.get_json(path)

    def adapter(self, name: str) -> dict[str, Any]:
        namespace, short = names.split_name(name)
        return self.get_json(self._path(namespace, short))

    def list(self, **params: Any) -> dict[str, Any]:
        clean = {k: v for k, v in params.items() if v is not None}
        return self.get_json("/v1/adapters", params=clean)

    def list_all(self, **params: Any) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        cursor = None
        while True:
            page = self.list(cursor=cursor, **params)
            items.extend(page["items"])
            cursor = page.get("next_cursor")
            if not cursor:
                return items

    def resolve(self, ref: str) -> ResolvedVersion:
        """Pin a reference (``ns/name``, ``:3``, ``:ALIAS``, ``@sha256:…``) to the version it names now.

        Returns:
            The immutable version: number, manifest digest, base fingerprint, files.

        Raises:
            ReferenceInvalidError, NameInvalidError, VersionInvalidError: a malformed reference.
            AdapterNotFoundError, VersionNotFoundError: nothing by that name.
            UnauthorizedError, DeniedError: the token may not read it.
            ConnectionFailedError: the server is unreachable.
        """
        return ResolvedVersion.from_json(self.version(ref))

    def resolve_changed(self, ref: str, etag: str | None = None) -> tuple[ResolvedVersion | None, str | None]:
        """Resolve ``ref`` again only if its answer changed since ``etag`` (a conditional GET).

        Returns:
            ``(None, etag)`` when nothing changed (304), else the version and the answer's ETag,
            to pass back on the next call. For following an alias cheaply.
        """
        r = names.parse_reference(ref)
        headers = {"If-None-Match": etag} if etag else {}
        resp = self.request(
            "GET", f"{self._path(r.namespace, r.name)}/versions/{quote(r.tag, safe=':')}", headers=headers
        )
        if resp.status_code == 304:
            return None, etag
        return ResolvedVersion.from_json(resp.json()), resp.headers.get("etag")

    def resolve_many(
        self, refs: list[str], etag: str | None = None
    ) -> tuple[dict[str, ResolvedVersion | LoregError] | None, str | None]:
        """Pin many references in one request (at most 1000), again only if the answer changed since ``etag``.

        Returns:
            ``(None, etag)`` when nothing changed (304), else ``{ref: version or its error}`` (a
            reference that does not resolve, or that the token may not read, maps to the error a
            ``resolve`` of it alone would raise) and the answer's ETag, to pass back next time.

        Raises:
            RequestInvalidError: no references, or more than 1000.
            UnauthorizedError, DeniedError: the token may not read at all.
        """
        headers = {"If-None-Match": etag} if etag else {}
        resp = self.request("POST", "/v1/resolve", json={"refs": list(refs)}, headers=headers)
        if resp.status_code == 304:
            return None, etag
        out: dict[str, ResolvedVersion | LoregError] = {}
        for item in resp.json()["items"]:
            if item.get("error"):
                code = item["error"].get("code")
                status = ERRORS[code].status if code in ERRORS else 500
                out[item["ref"]] = error_from_envelope(status, {"errors": [item["error"]]})
            else:
                out[item["ref"]] = ResolvedVersion.from_json(item["version"])
        missing = set(refs) - set(out)
        if missing:
            raise InternalError(f"the registry did not answer for {len(missing)} reference(s)")
        return out, resp.headers.get("etag")

    def versions(self, name: str) -> list[dict[str, Any]]:
        """Every live version of ``ns/name``, newest first (number, digest, rank, targets, metrics, aliases).

        Raises:
            AdapterNotFoundError: no such adapter; UnauthorizedError, DeniedError.
        """
        return list(self.adapter(name)["versions"])

    def lookup(
        self,
        *,
        base: str | None = None,
        namespace: str | None = None,
        target: str | None = None,
        min_rank: int | None = None,
        max_rank: int | None = None,
        dora: bool | None = None,
        task_type: str | None = None,
        metric: str | None = None,
        metric_min: float | None = None,
        metric_max: float | None = None,
        q: str | None = None,
        order: str | None = None,
        all_versions: bool | None = None,
    ) -> list[dict[str, Any]]:
        """Find adapters: each adapter's newest version matching every filter given, all pages.

        ``base`` is a base name, ``name@revision`` or weights digest; versions validated against
        another base of the same layout come back with ``match: "layout"``. ``metric`` with
        ``metric_min``/``metric_max`` filters (and orders) on a metric's latest value.

        Raises:
            RequestInvalidError: a filter the server refuses; UnauthorizedError.
        """
        return self.list_all(
            base=base, namespace=namespace, target=target, min_rank=min_rank, max_rank=max_rank, dora=dora,
            task_type=task_type, metric=metric, metric_min=metric_min, metric_max=metric_max, q=q, order=order,
            all_versions=all_versions,
        )

    def set_alias(self, ref: str, alias: str) -> dict[str, Any]:
        r = names.parse_reference(ref)
        names.check_alias(alias)
        return self.request("PUT", f"{self._path(r.namespace, r.name)}/aliases/{alias}", json={"version": r.tag}).json()

    def remove_alias(self, name: str, alias: str) -> dict[str, Any]:
        namespace, short = names.split_name(name)
        names.check_alias(alias)
        return self.request("DELETE", f"{self._path(namespace, short)}/aliases/{alias}").json()

    def add_metrics(self, ref: str, metrics: dict[str, float]) -> dict[str, Any]:
        r = names.parse_reference(ref)
        return self.request(
            "POST", f"{self._path(r.namespace, r.name)}/versions/{quote(r.tag, safe=':')}/metrics", json={"metrics": metrics}
        ).json()

    def delete(self, ref: str) -> dict[str, Any]:
        r = names.parse_reference(ref)
        return self.request("DELETE", f"{self._path(r.namespace, r.name)}/versions/{quote(r.tag, safe=':')}").json()

    def delete_adapter(self, name: str) -> dict[str, Any]:
        """Delete every version and alias of ``name`` (``ns/name``); its numbers are never given again."""
        namespace, short = names.split_name(name)
        return self.request("DELETE", self._path(namespace, short)).json()

    # --- base models --------------------------------------------------------------------------

    def register_base(
        self,
        folder: str | Path,
        name: str,
        *,
        revision: str | None = None,
        upload_weights: bool = False,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """Register a local checkpoint as a base model (by content: layout and weights digests).

        Reads every safetensors file once (in parallel), hashing each tensor. With
        ``upload_weights`` the shards, config and tokenizer files are uploaded as blobs (only
        those the server lacks), so the server can merge into them.
        """
        from loreg.cli.checkpoint import scan_checkpoint

        names.check_base_name(name)
        if revision:
            names.check_base_revision(revision)
        ckpt = scan_checkpoint(Path(folder), progress=(lambda n, total: progress("hashing", n, total)) if progress else None)
        files = ckpt.files
        uploaded = 0
        if upload_weights:
            missing = set(self.missing_blobs(sorted({f.digest for f in files})))
            done: set[str] = set()
            for f in files:
                if f.digest in missing and f.digest not in done:
                    self.upload_blob(ckpt.root / f.path, f.digest, f.size, progress)
                    uploaded += f.size
                    done.add(f.digest)
        body = {
            "name": name,
            "revision": revision,
            "config": ckpt.config,
            "tensors": [{"name": t[0], "dtype": t[1], "shape": t[2], "file": t[3], "digest": t[4]} for t in ckpt.tensors],
            "files": [{"path": f.path, "size": f.size, "digest": f.digest} for f in files],
            "weights_uploaded": upload_weights,
        }
        resp = self.request("POST", "/v1/base-models", json=body)
        out = resp.json()
        out["created"] = resp.status_code == 201
        out["bytes_uploaded"] = uploaded
        return out

    def base(self, ref: str) -> dict[str, Any]:
        return self.get_json(f"/v1/base-models/{_base_path(ref)}")

    def base_layout(self, ref: str) -> dict[str, Any]:
        return self.get_json(f"/v1/base-models/{_base_path(ref)}/layout")

    def bases(self) -> list[dict[str, Any]]:
        return list(self.get_json("/v1/base-models")["items"])

    def check(self, folder: str | Path, base: str | None = None) -> dict[str, Any]:
        """Validate an adapter folder against a registered base locally (a dry run: uploads nothing)."""
        from loreg.registry.formats import peft, safetensors, validate

        scanned = scan_adapter_folder(Path(folder))
        config = peft.parse_adapter_config(scanned.files["adapter_config.json"].read_bytes())
        header = safetensors.read_header_from_file(scanned.files["adapter_model.safetensors"])
        choice = self.choose_base(config, base)
        ref = choice.ref or choice.name or ""
        try:
            lay = self.base_layout(ref)
        except BaseNotFoundError as exc:  # what the push would answer
            raise BaseUnknownError(exc.message, detail=exc.detail) from None
        # the same layout the server validates against (model_type, architectures, tying from config.json)
        layout = validate.base_layout({t[0]: (t[1], t[2]) for t in lay["tensors"]}, lay["config"])
        base_name = ref.split("@")[0] if choice.source == "config" and not ref.startswith("sha256:") else None
        report = validate.validate_adapter(config, header, layout, base_name=base_name)
        out = report.to_dict()
        out["facts"]["base_source"] = choice.source
        out["base"] = {"weights_digest": lay["weights_digest"], "layout_digest": lay["layout_digest"], "ref": ref}
        if choice.by_content:
            out["base_match"] = choice.describe()
        out["valid"] = True
        return out

    # --- exports ------------------------------------------------------------------------------

    def export(
        self,
        refs: list[str],
        dest: str | Path,
        *,
        weights: list[float] | None = None,
        base: str | None = None,
        dtype: str = "auto",
        poll_s: float = 0.5,
        timeout_s: float | None = None,
        on_state: Callable[[dict[str, Any]], None] | None = None,
        progress: Progress | None = None,
        link: bool = False,
        combination: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Ask the server to merge ``refs`` (weighted) into their base, wait, and download the result.

        ``combination``: ``{"method": ..., "density": ..., ...}`` (the parameters of ``combine``): the
        adapters are combined with that method first; default the weighted sum of their changes.
        An identical request is answered from the stored result. Files are copied out of the
        local cache (``link``: hard-linked, see ``pull``). Returns the export (the server's JSON)
        plus ``path`` and ``bytes_downloaded``.
        """
        import time

        weighted = _weighted(refs, weights)
        body: dict[str, Any] = {"adapters": weighted, "dtype": dtype}
        if base is not None:
            body["base"] = base
        body.update({k: v for k, v in (combination or {}).items() if v is not None})
        job = self.request("POST", "/v1/exports", json=body).json()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while job["state"] in ("queued", "running"):
            if on_state:
                on_state(job)
            if deadline is not None and time.monotonic() > deadline:
                raise ExportTimeoutError(
                    f"export {job['id']} is still {job['state']}", detail={"id": job["id"]}, hint="loreg export resumes it"
                )
            time.sleep(poll_s)
            job = self.get_json(f"/v1/exports/{job['id']}")
        if on_state:
            on_state(job)
        if job["state"] == "failed":
            err = job.get("error") or {}
            raise error_from_envelope(500, {"errors": [err]} if err else None)
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        cache = BlobCache(config.cache_dir())
        downloaded = 0
        for f in job["files"]:
            path = names.check_file_name(f["path"])
            cached = cache.get(f["digest"], f["size"])
            if cached is None:
                downloaded += cache.fetch(
                    self, f"/v1/exports/{job['id']}/files/{quote(path)}", f["digest"], f["size"], label=path, progress=progress
                )
                cached = cache.path(f["digest"])
            _place(cached, dest / path, link=link)
        job["path"] = str(dest)
        job["bytes_downloaded"] = downloaded
        return job

    def combine(
        self,
        refs: list[str],
        to: str,
        *,
        method: str,
        weights: list[float] | None = None,
        density: float | None = None,
        majority_sign_method: str | None = None,
        svd_rank: int | None = None,
        svd_clamp: float | None = None,
        seed: int | None = None,
        aliases: list[str] | None = None,
        poll_s: float = 0.5,
        timeout_s: float | None = None,
        on_state: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Ask the server to combine ``refs`` (PEFT's ``add_weighted_adapter`` methods) into the next version
        of ``to``, and wait. An identical request answers its stored job. Returns the job (the server's
        JSON) plus ``pushed``: the new version.

        Raises:
            RequestInvalidError (weights), the server's refusal (COMBINATION_INVALID, RANK_MISMATCH,
            MERGE_UNSUPPORTED, DENIED), ExportTimeoutError, the job's error when it failed
        """
        import time

        weighted = _weighted(refs, weights)
        body: dict[str, Any] = {
            "inputs": weighted, "method": method, "to": to,
            "aliases": list(aliases or []),
        }
        optional = {"density": density, "majority_sign_method": majority_sign_method, "svd_rank": svd_rank,
                    "svd_clamp": svd_clamp, "seed": seed}
        body.update({k: v for k, v in optional.items() if v is not None})
        job = self.request("POST", "/v1/combinations", json=body).json()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while job["state"] in ("queued", "running"):
            if on_state:
                on_state(job)
            if deadline is not None and time.monotonic() > deadline:
                raise ExportTimeoutError(
                    f"combination {job['id']} is still {job['state']}", detail={"id": job["id"]},
                    hint="run the same loreg combine again to wait for it",
                )
            time.sleep(poll_s)
            job = self.get_json(f"/v1/combinations/{job['id']}")
        if on_state:
            on_state(job)
        if job["state"] == "failed":
            err = job.get("error") or {}
            raise error_from_envelope(500, {"errors": [err]} if err else None)
        job["pushed"] = self.version(f"{job['to']}:{job['version']}")
        return job

    # --- pull ---------------------------------------------------------------------------------

    def pull(self, ref: str, dest: str | Path, *, progress: Progress | None = None, link: bool = False) -> dict[str, Any]:
        """Download a version into ``dest``: every file verified before an atomic move into place.

        A local content-addressed cache (LOREG_HOME/cache) makes a second pull of the same bytes
        download nothing. The files in ``dest`` are the caller's own copies (made in the kernel,
        or reflinked where the file system can); with ``link`` they are hard links to the cache
        instead, for folders that are never edited in place (an edit would change every folder
        linked to the same bytes, until the cache's re-verification drops the entry).
        Returns the version plus ``bytes_downloaded`` and ``path``.
        """
        r = names.parse_reference(ref)
        version = self.version(ref)
        files = [FileEntry(f["path"], int(f["size"]), f["digest"]) for f in version["files"]]
        adapter = f"{r.namespace}/{r.name}"
        version["bytes_downloaded"] = self._fetch(adapter, version["version"], files, dest, progress, link)
        version["path"] = str(dest)
        return version

    def pull_resolved(self, version: ResolvedVersion, dest: str | Path, *, link: bool = False) -> int:
        """``pull`` of a version already pinned (by ``resolve`` or ``resolve_many``), without asking
        the registry again. Returns the bytes downloaded."""
        return self._fetch(version.name, version.number, list(version.files), dest, None, link)

    def _fetch(
        self, adapter: str, number: int, files: list[FileEntry], dest: str | Path, progress: Progress | None, link: bool
    ) -> int:
        r = names.parse_reference(adapter)
        # pin the exact version: an alias moving mid-pull must not mix two versions' files
        pinned = f"{self._path(r.namespace, r.name)}/versions/{int(number)}"
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        for f in files:
            names.check_file_name(f.path)  # a server-supplied name never leaves dest: check all first
        cache = BlobCache(config.cache_dir())
        downloaded = 0
        for f in files:
            target = dest / f.path
            cached = cache.get(f.digest, f.size)
            if cached is None:
                # the user's copy is written while the file downloads, not copied from the cache after
                tee = None if link else _Tee(target)
                try:
                    downloaded += cache.fetch(
                        self, f"{pinned}/files/{quote(f.path)}", f.digest, f.size, label=f.path, progress=progress,
                        tee=tee,
                    )
                    if tee is not None and tee.complete:
                        tee.publish()
                        continue
                finally:
                    if tee is not None:
                        tee.discard()
                cached = cache.path(f.digest)
            _place(cached, target, link=link)
        return downloaded


def _base_path(ref: str) -> str:
    """A base reference as a URL path: names keep their slash, everything else is quoted."""
    if ref.startswith("sha256:"):
        if names.DIGEST_PREFIX.fullmatch(ref) is None:
            raise DigestInvalidError(f"invalid digest {ref[:80]!r}", hint=names.DIGEST_PREFIX_HINT)
        return ref
    name, _, revision = ref.partition("@")
    names.check_base_name(name)
    if revision:
        names.check_base_revision(revision)
        return f"{name}@{quote(revision, safe='')}"
    return name


def _place(src: Path, target: Path, *, link: bool = False) -> None:
    """Put a verified cache file at ``target`` atomically (through a temporary name beside it).

    By default the file is the user's own copy: editing it changes neither the cache nor another
    folder pulled from the same bytes. With ``link`` it is a hard link to the cache entry (no second
    copy on disk), for folders whose owner never edits files in place; a linked file edited anyway
    is caught by the cache's re-verification on its next use.
    """
    if link:
        try:
            if os.path.samefile(src, target):
                # rename() onto another name of the same inode does nothing and would leave the
                # temporary name behind: the file is already in place
                return
        except FileNotFoundError:
            pass
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.link")
        try:
            os.link(src, tmp)
        except OSError:
            pass  # another file system, or one without hard links: a copy is just as correct
        else:
            try:
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)  # left only if target became the same inode meanwhile
            return
    _copy_atomic(src, target)


class _Tee:
    """The user's copy of a file, written beside ``target`` while the file downloads; published
    (fsync, rename) only once the download was verified, else removed."""

    def __init__(self, target: Path):
        self.target = target
        self.tmp, fd = _temp_beside(target)
        self.file = os.fdopen(fd, "wb")
        self.complete = self.published = False

    def publish(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())  # a pulled file is not re-verified later: no torn file after a crash
        self.file.close()
        os.replace(self.tmp, self.target)
        self.published = True

    def discard(self) -> None:
        self.file.close()
        if not self.published:
            self.tmp.unlink(missing_ok=True)


def _temp_beside(target: Path) -> tuple[Path, int]:
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(8)}.partial")
        try:
            # mode 0o666 under the user's umask, like any file they create (mkstemp would give 0600)
            return tmp, os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {target}")


def _copy_atomic(src: Path, target: Path) -> None:
    """Copy ``src`` to a new file beside ``target``, fsync it (a pulled file is not re-verified
    later, so it must not be torn by a crash), then rename it over ``target``."""
    tmp, fd = _temp_beside(target)
    try:
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            _copy_contents(inp, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _copy_contents(inp: Any, out: Any) -> None:
    """Copy in the kernel with copy_file_range (a reflink on btrfs/XFS, a server-side copy on NFS,
    no round trip through user space elsewhere); fall back to reads and writes where it is refused."""
    size = os.fstat(inp.fileno()).st_size
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < size and (n := os.copy_file_range(inp.fileno(), out.fileno(), size - done)):
                done += n
        except OSError as exc:
            if exc.errno not in _NO_KERNEL_COPY:
                raise
    if done < size:
        inp.seek(done)
        out.seek(done)
        shutil.copyfileobj(inp, out, CHUNK)


# copy_file_range is refused across file systems on older kernels, and by some file systems
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}


class BlobCache:
    """A content-addressed cache of downloaded files: ``blobs/sha256/ab/<hex>``."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, digest: str) -> Path:
        return self._path(digest)

    def _path(self, digest: str) -> Path:
        hexdigest = digest.removeprefix("sha256:")
        if len(hexdigest) != 64 or any(c not in "0123456789abcdef" for c in hexdigest):
            raise DigestMismatchError(f"invalid digest {digest[:80]!r} from server")
        return self.root / "blobs" / "sha256" / hexdigest[:2] / hexdigest

    def get(self, digest: str, size: int) -> Path | None:
        """The cached file, re-verified (size and sha256): a corrupted cache entry is dropped."""
        path = self._path(digest)
        try:
            if path.stat().st_size != size:
                path.unlink(missing_ok=True)
                return None
        except FileNotFoundError:
            return None
        if sha256_file(path) != digest:
            path.unlink(missing_ok=True)
            return None
        return path

    @contextmanager
    def lock(self, digest: str) -> Iterator[None]:
        """Hold the digest's lock file (flock) while one process downloads it; others wait here.

        Lock files stay: removing one while another process waits on it would let a third lock a
        new file beside it (huggingface_hub's cache keeps its .lock files too).
        """
        final = self._path(digest)
        path = final.with_name(final.name + ".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def fetch(
        self, client: RegistryClient, url: str, digest: str, size: int, *, label: str, progress: Progress | None,
        tee: _Tee | None = None,
    ) -> int:
        """Download into the cache, resuming a partial file with a Range request; verify, then publish.

        Several processes may share one cache: the first takes the digest's lock and downloads, the
        others wait and then find the file published (returns 0 bytes for them). A whole body
        (not a resumed one) is written to ``tee`` too, which is marked complete once verified.
        """
        with self.lock(digest):
            if self.get(digest, size) is not None:
                return 0
            return self._fetch_locked(client, url, digest, size, label=label, progress=progress, tee=tee)

    def _fetch_locked(
        self, client: RegistryClient, url: str, digest: str, size: int, *, label: str, progress: Progress | None,
        tee: _Tee | None = None,
    ) -> int:
        final = self._path(digest)
        final.parent.mkdir(parents=True, exist_ok=True)
        partial = final.with_name(final.name + ".partial")
        have = partial.stat().st_size if partial.exists() else 0
        if have > size:
            partial.unlink()
            have = 0
        got = 0
        hasher = hashlib.sha256()
        if have:
            with open(partial, "rb") as f:  # resume: the bytes already here count toward the digest
                while chunk := f.read(CHUNK):
                    hasher.update(chunk)
        headers = {"Range": f"bytes={have}-"} if 0 < have < size else {}
        if have < size or size == 0:
            try:
                with client._open_download(url, headers) as resp:
                    if resp.status_code >= 400:
                        raise resp.error()
                    if resp.status_code != 206:
                        hasher = hashlib.sha256()
                    mode = "ab" if resp.status_code == 206 else "wb"
                    teeing = tee if resp.status_code != 206 else None
                    with open(partial, mode) as out:
                        got = _receive(
                            resp.chunks, out, hasher, lambda n: progress(label, n, size) if progress else None,
                            also=teeing.file if teeing else None,
                        )
                    # no fsync: every use of a cache file re-verifies its digest, so a file torn by
                    # a crash is caught and fetched again
            except (httpx.TransportError, urllib3.exceptions.HTTPError) as exc:  # the API, or storage
                raise ConnectionFailedError(
                    f"download of {label} broke off: {exc.__class__.__name__}",
                    hint="run the pull again: it resumes where it stopped",
                ) from exc
        if "sha256:" + hasher.hexdigest() != digest or partial.stat().st_size != size:
            partial.unlink(missing_ok=True)
            raise DigestMismatchError(
                f"{label}: downloaded bytes do not match {digest}", detail={"path": label, "digest": digest}
            )
        os.replace(partial, final)
        if tee is not None and have == 0 and got == size:
            tee.complete = True
        return got


@dataclass
class _Download:
    """An open download: its status, its body in chunks, and the error to raise for a status >= 400."""

    status_code: int
    chunks: Iterator[bytes]
    error: Callable[[], LoregError]


def _api_error(resp: httpx.Response) -> LoregError:
    resp.read()
    try:
        body = resp.json()
    except ValueError:
        body = None
    return error_from_envelope(resp.status_code, body, request_id=resp.headers.get("x-request-id"))


def _weighted(refs: list[str], weights: list[float] | None) -> list[dict[str, Any]]:
    """``[{"ref", "weight"}]`` for an export or combination request (weight 1 each by default).

    Raises:
        RequestInvalidError: not one weight per reference, or a malformed reference.
    """
    weights = list(weights or [1.0] * len(refs))
    if len(weights) != len(refs):
        raise RequestInvalidError(
            f"{len(weights)} weights for {len(refs)} references", hint="give one --weight per adapter reference, in order"
        )
    for r in refs:
        names.parse_reference(r)
    return [{"ref": r, "weight": float(w)} for r, w in zip(refs, weights, strict=True)]


def _pool_error(resp: urllib3.BaseHTTPResponse) -> LoregError:
    try:
        body = json.loads(resp.read())
    except ValueError:
        body = None
    return error_from_envelope(resp.status, body, request_id=resp.headers.get("x-request-id"))


def _part_checksums(path: Path, part_size: int) -> list[str]:
    """The base64 sha256 of each ``part_size`` part of the file (at least one, for an empty file)."""
    out = []
    with open(path, "rb") as f:
        while True:
            h = hashlib.sha256()
            left = part_size
            while left and (chunk := f.read(min(CHUNK, left))):
                h.update(chunk)
                left -= len(chunk)
            if left == part_size and out:
                return out
            out.append(base64.b64encode(h.digest()).decode())
            if left:
                return out


def _proxied(url: str) -> bool:
    """Whether httpx would send requests for ``url`` through a proxy (the *_PROXY variables)."""
    proxies = urllib.request.getproxies()
    scheme, _, rest = url.partition("://")
    host = rest.split("/", 1)[0]
    return bool(proxies.get(scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(host)


def _storage_error(status: int) -> LoregError:
    return ConnectionFailedError(
        f"storage answered HTTP {status} to a presigned download",
        detail={"status": status},
        hint="run the pull again (the server signs a fresh URL); if it persists, the server's S3 settings are off",
    )


def _receive(
    chunks: Iterator[bytes], out: Any, hasher: Any, advanced: Callable[[int], None], also: Any = None
) -> int:
    """Hash and write ``chunks`` in two more threads while this one receives the next: socket reads,
    sha256 and file writes all release the GIL, so they overlap (on a loopback S3 the download then
    takes about as long as hashing alone). Returns the bytes received."""
    failed: list[BaseException] = []
    sinks = [hasher.update, out.write] + ([also.write] if also is not None else [])
    queues: list[queue.Queue[bytes | None]] = [queue.Queue(maxsize=4) for _ in sinks]

    def consume(q: queue.Queue[bytes | None], sink: Callable[[bytes], Any]) -> None:
        try:
            while (chunk := q.get()) is not None:
                sink(chunk)
        except BaseException as exc:  # handed to the receiving thread
            failed.append(exc)
            while q.get() is not None:  # keep taking, so the receiving thread never blocks
                pass

    threads = [
        threading.Thread(target=consume, args=(q, sink), name=f"loreg-download-{name}", daemon=True)
        for q, sink, name in zip(queues, sinks, ("hash", "write", "copy"), strict=False)
    ]
    for t in threads:
        t.start()
    got = 0
    try:
        for chunk in chunks:
            if failed:
                break
            for q in queues:
                q.put(chunk)
            got += len(chunk)
            advanced(len(chunk))
    finally:
        for q in queues:
            q.put(None)
        for t in threads:
            t.join()
    if failed:
        raise failed[0]
    return got


__all__ = [
    "RegistryClient",
    "ResolvedVersion",
    "FileEntry",
    "AdapterFolder",
    "BaseChoice",
    "scan_adapter_folder",
    "BlobCache",
    "LoregError",
]
