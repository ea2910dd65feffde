"""Export workers: claim a queued job under a lease, merge, store the result's blobs, commit.

Claiming uses ``SELECT … FOR UPDATE SKIP LOCKED`` on Postgres (several `loreg worker` processes,
one per GPU); on SQLite, BEGIN IMMEDIATE serialises the claim (one process, worker threads).
A running job whose lease expired (its worker died) is claimed again by the next worker.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select, update

from loreg.registry.db.models import Blob, Export, ExportFile, ExportInput, Version, VersionFile
from loreg.registry.db.models import BaseModel as BaseRow
from loreg.registry.errors import ConflictError, InternalError, LoregError, MergeUnsupportedError
from loreg.registry.formats import peft, safetensors, validate
from loreg.registry.services.context import Registry

log = logging.getLogger("loreg.worker")
COPY_CHUNK = 8 << 20
DTYPE_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Claim:
    export_id: str
    owner: str


class LeaseLost(Exception):
    """Another worker took the job over (this one was too slow to renew its lease)."""


class ExportWorker:
    def __init__(
        self,
        registry: Registry,
        *,
        owner: str | None = None,
        lease_s: float | None = None,
        clock: Callable[[], datetime] = utcnow,
        device: str | None = None,
    ):
        self.registry = registry
        self.owner = owner or f"{os.uname().nodename[:40]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease_s = lease_s if lease_s is not None else registry.settings.export_lease_s
        self.clock = clock
        self.device = device or registry.settings.export_device

    # --- claiming -----------------------------------------------------------------------------

    def claim(self) -> Claim | None:
        """Take the oldest queued job, or a running one whose lease expired."""
        now = self.clock()
        with self.registry.sessions.begin() as session:
            row = session.scalar(
                select(Export)
                .where(
                    or_(
                        Export.state == "queued",
                        (Export.state == "running") & (Export.lease_expires_at < now),
                    )
                )
                .order_by(Export.created_at)
                .limit(1)
                .with_for_update(skip_locked=True)
            )
            if row is None:
                return None
            if row.state == "running":
                log.warning("export %s: lease of %s expired, taking over", row.id, row.lease_owner)
            row.state = "running"
            row.lease_owner = self.owner
            row.lease_expires_at = now + timedelta(seconds=self.lease_s)
            row.attempts += 1
            row.started_at = row.started_at or now
            return Claim(export_id=row.id, owner=self.owner)

    def renew(self, claim: Claim, progress: dict[str, Any] | None = None) -> None:
        values: dict[str, Any] = {"lease_expires_at": self.clock() + timedelta(seconds=self.lease_s)}
        if progress is not None:
            values["progress"] = progress
        with self.registry.sessions.begin() as session:
            n = session.execute(
                update(Export)
                .where(Export.id == claim.export_id, Export.lease_owner == claim.owner, Export.state == "running")
                .values(**values)
            ).rowcount
        if n != 1:
            raise LeaseLost(claim.export_id)

    # --- running ------------------------------------------------------------------------------

    def run_once(self) -> str | None:
        """Claim and run one job. Returns its id, or None when the queue is empty."""
        claim = self.claim()
        if claim is None:
            return None
        self.run(claim)
        return claim.export_id

    def run_forever(self, stop: threading.Event, wake: threading.Event | None = None, poll_s: float = 2.0) -> None:
        while not stop.is_set():
            try:
                ran = self.run_once()
            except Exception:  # noqa: BLE001 - a worker keeps going; the job records its own failure
                log.exception("export worker %s: unexpected error", self.owner)
                ran = None
            if ran is None:
                if wake is not None:
                    wake.wait(poll_s)
                    wake.clear()
                else:
                    stop.wait(poll_s)

    def run(self, claim: Claim) -> None:
        if self._reuse(claim):
            return
        progress: dict[str, Any] = {"tensors_done": 0, "tensors_total": 0, "bytes_done": 0, "bytes_total": 0}
        stop_beat = threading.Event()
        lost = threading.Event()

        def beat() -> None:
            interval = max(0.2, min(self.lease_s / 3, 2.0))
            while not stop_beat.wait(interval):
                try:
                    self.renew(claim, dict(progress))
                except LeaseLost:
                    lost.set()
                    return
                except Exception:  # noqa: BLE001 - a transient DB error: try again next beat
                    log.warning("export %s: lease renewal failed", claim.export_id, exc_info=True)

        heart = threading.Thread(target=beat, name=f"lease-{claim.export_id[:8]}", daemon=True)
        heart.start()
        scratch = Path(tempfile.mkdtemp(prefix="loreg-export-", dir=self.registry.settings.work_dir))
        try:
            files, device = self._merge(claim, scratch, progress, lost)
            stop_beat.set()
            heart.join()
            if lost.is_set():
                raise LeaseLost(claim.export_id)
            self._finish(claim, files, progress, device)
        except LeaseLost:
            log.warning("export %s: lease lost; another worker finishes it", claim.export_id)
        except Exception as exc:  # noqa: BLE001 - recorded on the job for the client
            stop_beat.set()
            heart.join()
            err = exc if isinstance(exc, LoregError) else InternalError(f"merge failed: {type(exc).__name__}: {exc}")
            if not isinstance(exc, LoregError):
                log.exception("export %s failed", claim.export_id)
            self._fail(claim, err)
        finally:
            stop_beat.set()
            shutil.rmtree(scratch, ignore_errors=True)

    def _reuse(self, claim: Claim) -> bool:
        """Finish the job with the files of a finished record of the same content (no merge), if there is one.

        Requests of identical bytes that were queued before either finished meet here.
        """
        from loreg.registry.services.exports import adopt_stored_result

        with self.registry.sessions.begin() as session:
            job = session.scalar(select(Export).where(Export.id == claim.export_id).with_for_update())
            if job is None or job.lease_owner != claim.owner or job.state != "running":
                return False
            if not adopt_stored_result(session, job, self.clock()):
                return False
        log.info("export %s: answered from a stored result of the same content", claim.export_id)
        return True

    def _local(self, digest: str, size: int, scratch: Path, name: str) -> Path:
        """A local path to a blob: the store's own file when it has one, else a verified download."""
        store = self.registry.store
        local = store.local_path(digest)
        if local is not None:
            return Path(local)
        dest = scratch / "in" / digest.removeprefix("sha256:")[:16] / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        with store.open(digest) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, COPY_CHUNK)
        if dest.stat().st_size != size:
            raise InternalError(f"download of {name} is short")
        return dest

    def _merge(
        self, claim: Claim, scratch: Path, progress: dict[str, Any], lost: threading.Event
    ) -> tuple[list[dict[str, Any]], str]:
        from loreg.registry.merge import engine

        with self.registry.sessions.begin() as session:
            job = session.get_one(Export, claim.export_id)
            base = session.get_one(BaseRow, job.base_model_id)
            base_files = {f["path"]: dict(f) for f in base.files}
            base_config = dict(base.config)
            base_tensors = [list(t) for t in base.tensors]
            inputs = []
            for i in session.scalars(select(ExportInput).where(ExportInput.export_id == job.id).order_by(ExportInput.position)):
                if i.version_id is None or session.get(Version, i.version_id) is None:
                    raise MergeUnsupportedError(f"adapter version {i.name or i.manifest_digest} was deleted")
                vfiles = {
                    f.path: {"size": f.size, "digest": f.digest}
                    for f in session.scalars(select(VersionFile).where(VersionFile.version_id == i.version_id))
                }
                inputs.append((vfiles, i.weight))
            dtype = job.dtype
        shard_names = list(dict.fromkeys(t[3] for t in base_tensors))
        shards = []
        headers = []
        for name in shard_names:
            f = base_files[name]
            path = self._local(f["digest"], f["size"], scratch, name)
            header = safetensors.read_header_from_file(path)
            headers.append(header)
            shards.append(engine.BaseShard(name=name, path=path, header=header))
        layout = validate.base_layout_from_headers(headers, base_config)
        adapters = []
        for n, (vfiles, weight) in enumerate(inputs):
            cfg_entry, st_entry = vfiles["adapter_config.json"], vfiles["adapter_model.safetensors"]
            config = peft.parse_adapter_config(self.registry.store.read_range(cfg_entry["digest"], 0, cfg_entry["size"]))
            st_path = self._local(st_entry["digest"], st_entry["size"], scratch, f"adapter-{n}.safetensors")
            header = safetensors.read_header_from_file(st_path)
            report = validate.validate_adapter(config, header, layout)
            adapters.append(engine.AdapterInput(config=config, header=header, path=st_path, report=report, weight=weight))
        out_dir = scratch / "out"
        out_dir.mkdir()

        def on_progress(t_done: int, t_total: int, b_done: int, b_total: int) -> None:
            progress.update(tensors_done=t_done, tensors_total=t_total, bytes_done=b_done, bytes_total=b_total)
            if lost.is_set():
                raise LeaseLost(claim.export_id)

        out_dtype = None if dtype == "auto" else dtype
        device = resolve_device(self.device)
        outputs = engine.merge_to_dir(shards, adapters, out_dir, dtype=out_dtype, device=device, progress=on_progress)
        files: list[dict[str, Any]] = [
            {"path": o.name, "size": o.size, "digest": o.digest, "local": out_dir / o.name} for o in outputs
        ]
        if "model.safetensors.index.json" in base_files:
            src = self._local(
                base_files["model.safetensors.index.json"]["digest"],
                base_files["model.safetensors.index.json"]["size"],
                scratch,
                "model.safetensors.index.json",
            )
            index = engine.write_index(out_dir, outputs, Path(src).read_bytes())
            files.append({"path": index.name, "size": index.size, "digest": index.digest, "local": out_dir / index.name})
        for name, f in base_files.items():
            if name in shard_names or name == "model.safetensors.index.json":
                continue
            if name == "config.json" and out_dtype is not None:
                cfg = dict(base_config)
                torch_name = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[out_dtype]
                if "torch_dtype" in cfg or "dtype" not in cfg:
                    cfg["torch_dtype"] = torch_name
                if "dtype" in cfg:
                    cfg["dtype"] = torch_name
                path = out_dir / "config.json"
                path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
                files.append(_file_entry(path))
            else:
                files.append({"path": name, "size": f["size"], "digest": f["digest"], "local": None})
        return files, device

    def _finish(self, claim: Claim, files: list[dict[str, Any]], progress: dict[str, Any], device: str) -> None:
        store = self.registry.store
        now = self.clock()
        for f in files:
            if f["local"] is None or store.exists(f["digest"]):
                continue
            if _adopt_local(store, f):
                continue
            with open(f["local"], "rb") as stream:
                store.put(stream, f["digest"], f["size"])
        with self.registry.sessions.begin() as session:
            job = session.scalar(select(Export).where(Export.id == claim.export_id).with_for_update())
            if job is None or job.lease_owner != claim.owner or job.state != "running":
                raise LeaseLost(claim.export_id)
            for f in files:
                touched = session.execute(
                    update(Blob).where(Blob.digest == f["digest"]).values(last_seen_at=now)
                ).rowcount
                if not touched:
                    session.add(Blob(digest=f["digest"], size=f["size"], created_at=now, last_seen_at=now))
                    session.flush()
                # GC deletes an object only while holding its row; this transaction holds it now
                if not store.exists(f["digest"]):
                    raise ConflictError(
                        f"garbage collection removed {f['path']} while the export was stored; request it again",
                        detail={"digest": f["digest"]},
                    )
            for f in files:
                session.add(ExportFile(export_id=job.id, path=f["path"], size=f["size"], digest=f["digest"]))
            job.state = "done"
            job.progress = dict(progress)
            job.device = device
            job.finished_at = self.clock()  # after the blobs are stored: the job's time includes storing them
            job.lease_owner = None
            job.lease_expires_at = None

    def _fail(self, claim: Claim, err: LoregError) -> None:
        with self.registry.sessions.begin() as session:
            session.execute(
                update(Export)
                .where(Export.id == claim.export_id, Export.lease_owner == claim.owner)
                .values(state="failed", error=err.to_dict(), finished_at=self.clock(), lease_owner=None, lease_expires_at=None)
            )


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _adopt_local(store: Any, f: dict[str, Any]) -> bool:
    """Publish a merged file into a local blob folder by rename: no second copy and no second hash.

    The engine hashed the bytes as it wrote them, so the digest is known; the file is fsynced, renamed
    to its blob path and the folder fsynced, as LocalBlobStore.put does. False (the caller puts it
    the usual way) for other stores or when the rename fails (another file system).
    """
    from loreg.registry.storage.base import blob_key
    from loreg.registry.storage.local import LocalBlobStore

    if not isinstance(store, LocalBlobStore):
        return False
    src = Path(f["local"])
    final = store.root / blob_key(f["digest"])
    try:
        fd = os.open(src, os.O_RDONLY)
        try:
            if os.fstat(fd).st_size != f["size"]:
                return False
            os.fsync(fd)
        finally:
            os.close(fd)
        created = not final.parent.is_dir()
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, final)
        for folder in (final.parent, final.parent.parent) if created else (final.parent,):
            dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    except OSError:
        log.debug("could not rename %s into the blob folder; copying it", src, exc_info=True)
        return final.is_file() and final.stat().st_size == f["size"] and not src.exists()
    return True


def _file_entry(path: Path) -> dict[str, Any]:
    import hashlib

    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(COPY_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"path": path.name, "size": size, "digest": "sha256:" + h.hexdigest(), "local": path}


class WorkerPool:
    """In-process export workers for `loreg serve` on the embedded default (threads)."""

    def __init__(self, registry: Registry, count: int):
        self.registry = registry
        self.count = max(1, count)
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        for n in range(self.count):
            worker = ExportWorker(self.registry)
            t = threading.Thread(target=worker.run_forever, args=(self.stop, self.wake), name=f"export-worker-{n}", daemon=True)
            t.start()
            self.threads.append(t)

    def notify(self) -> None:
        self.wake.set()

    def shutdown(self, timeout: float = 10.0) -> None:
        self.stop.set()
        self.wake.set()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
